"""The scaling ladder: compute-optimal rungs from a small model up to the budget, as a table and a plot.

Each rung has ~4x the compute of the one below it: twice the parameters and twice the tokens,
so every rung stays on the (approximately 20 tokens per parameter) compute-optimal line and the
top rung is the budget's own allocation. Time and cost use LLM Foundry's model FLOPs with the
attention term of the nearest preset's shape (``plan.cost``); loss is Chinchilla's parametric law.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Sequence

import numpy as np

from jaxtrain.metrics.hardware import Hardware
from jaxtrain.plan import chinchilla
from jaxtrain.plan.cost import ModelShape, RunCost

PRESET_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs" / "mpt"
PRESET_NAMES = ("125m", "350m", "760m", "1b", "3b", "7b", "30b", "70b")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model preset (``configs/mpt/<name>.yaml``) and what planning needs from it."""

    name: str
    path: pathlib.Path
    params: int
    shape: ModelShape


def preset_from_config(name: str, path: pathlib.Path) -> Preset:
    """Read one preset file: its parameter count and shape (training ``max_seq_len``)."""
    from jaxtrain.config import load_config
    from jaxtrain.models.mpt_config import mpt_param_count

    cfg = load_config(str(path))
    model = cfg.model
    shape = ModelShape(n_layers=model.n_layers, d_model=model.d_model, seq_len=cfg.max_seq_len, name=name)
    return Preset(name=name, path=path, params=int(mpt_param_count(model)), shape=shape)


def load_presets(preset_dir: pathlib.Path = PRESET_DIR) -> list[Preset]:
    """The MPT presets that exist under ``preset_dir``, smallest first."""
    paths = [(name, preset_dir / f"{name}.yaml") for name in PRESET_NAMES]
    presets = [preset_from_config(name, path) for name, path in paths if path.exists()]
    if not presets:
        raise ValueError(f"no model presets found in {preset_dir}; expected files like 7b.yaml")
    return sorted(presets, key=lambda p: p.params)


def nearest_preset(n_params: float, presets: Sequence[Preset]) -> Preset:
    """The preset closest to ``n_params`` on a log scale."""
    return min(presets, key=lambda p: abs(math.log(p.params / n_params)))


def scaled_shape(preset: Preset, n_params: float) -> ModelShape:
    """The preset's shape, with depth and width each scaled by ``(n_params / preset.params)**(1/3)``."""
    factor = (n_params / preset.params) ** (1.0 / 3.0)
    if 0.8 <= factor <= 1.25:
        return preset.shape
    n_layers = max(2, round(preset.shape.n_layers * factor))
    d_model = max(64, 64 * round(preset.shape.d_model * factor / 64))
    return dataclasses.replace(preset.shape, n_layers=n_layers, d_model=d_model, name=f"~{preset.name}")


def shape_lookup(presets: Sequence[Preset], seq_len: int | None = None):
    """``params -> ModelShape``: the nearest preset's, scaled beyond the smallest and largest presets.

    Inside the preset range the nearest preset's shape is close enough for the attention term;
    outside it (a 10M-parameter rung, a 300B one) depth and width are scaled with the size.
    """
    smallest, largest = presets[0], presets[-1]

    def shape_for_params(n_params: float) -> ModelShape:
        if n_params < smallest.params:
            shape = scaled_shape(smallest, n_params)
        elif n_params > largest.params:
            shape = scaled_shape(largest, n_params)
        else:
            shape = nearest_preset(n_params, presets).shape
        return dataclasses.replace(shape, seq_len=seq_len) if seq_len else shape

    return shape_for_params


@dataclasses.dataclass(frozen=True)
class Rung:
    """One rung: a compute-optimal model size and token count, and its cost on the hardware."""

    run: RunCost
    preset: str  # the preset whose shape sets the attention FLOPs ("~125m": scaled from it)


def build_ladder(
    top: chinchilla.Allocation,
    *,
    hardware: Hardware,
    devices: int,
    mfu: float,
    presets: Sequence[Preset],
    rungs: int = 6,
    min_params: float = 1e6,
    seq_len: int | None = None,
    precision: str = "amp_bf16",
) -> list[Rung]:
    """Rungs below and up to ``top``, smallest first: rung k has ``top / 2**(rungs-1-k)`` params and tokens."""
    if rungs < 1:
        raise ValueError(f"the ladder needs at least one rung, got {rungs}")
    shape_for_params = shape_lookup(presets, seq_len)
    ladder = []
    for k in range(rungs - 1, -1, -1):
        params, tokens = top.params / 2**k, top.tokens / 2**k
        if params < min_params and k > 0:
            continue  # rungs below min_params are left out
        shape = shape_for_params(params)
        run = RunCost(params, tokens, shape, hardware, devices, mfu, precision)
        ladder.append(Rung(run=run, preset=shape.name))
    return ladder


# ----------------------------------------------------------------------------- formatting


def format_count(n: float) -> str:
    """6.7e9 -> '6.7B', 1e12 -> '1T', 5e8 -> '500M'."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g}{suffix}" if value < 1000 else f"{value:,.0f}{suffix}"
    return f"{n:.3g}"


def format_usd(usd: float) -> str:
    return f"${usd:,.0f}" if usd >= 100 else f"${usd:,.2f}"


def format_duration(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:.1f} days"
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.1f} min"


def format_ladder(ladder: Sequence[Rung]) -> str:
    """The ladder as a text table, one rung per line."""
    header = ("rung", "params", "tokens", "6ND FLOPs", "model FLOPs", "time", "cost", "loss", "shape of")
    rows = [header]
    for i, rung in enumerate(ladder, 1):
        run = rung.run
        rows.append((
            str(i),
            format_count(run.params),
            format_count(run.tokens),
            f"{run.scaling_flops:.2e}",
            f"{run.model_flops:.2e}",
            format_duration(run.hours),
            format_usd(run.cost_usd),
            f"{run.loss:.3f}",
            rung.preset,
        ))
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def plot_ladder(ladder: Sequence[Rung], path: str | pathlib.Path, *, title: str = "") -> pathlib.Path:
    """Write a PNG of predicted loss against cost (log x) with each rung marked and labelled."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plotting the ladder needs matplotlib: pip install matplotlib (or pass --no-plot)") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    by_cost = all(r.run.cost_usd > 0 for r in ladder)
    xs = [r.run.cost_usd if by_cost else r.run.model_flops for r in ladder]
    losses = [r.run.loss for r in ladder]

    # The compute-optimal frontier through the rungs, half a rung beyond each end, for context:
    # cost is interpolated between rungs and grows with params * tokens outside them.
    log_params = [math.log(r.run.params) for r in ladder]
    log_x = [math.log(x) for x in xs]
    frontier_x, frontier_y = [], []
    for i in range(81):
        lp = log_params[0] - math.log(2) + (log_params[-1] - log_params[0] + 2 * math.log(2)) * i / 80
        if lp < log_params[0]:
            lx = log_x[0] + 2 * (lp - log_params[0])
        elif lp > log_params[-1]:
            lx = log_x[-1] + 2 * (lp - log_params[-1])
        else:
            lx = float(np.interp(lp, log_params, log_x))
        params = math.exp(lp)
        frontier_x.append(math.exp(lx))
        frontier_y.append(chinchilla.predicted_loss(params, params * ladder[0].run.tokens / ladder[0].run.params))

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    ax.plot(frontier_x, frontier_y, color="0.75", linewidth=1.5, zorder=1, label="compute-optimal frontier")
    ax.plot(xs, losses, "o", color="tab:blue", markersize=7, zorder=2, label="rungs (~4x compute each)")
    for x, y, rung in zip(xs, losses, ladder):
        label = f"{format_count(rung.run.params)} / {format_count(rung.run.tokens)} tok"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("cost (USD, prices are editable assumptions)" if by_cost else "model FLOPs")
    ax.set_ylabel("predicted loss (Chinchilla fit, nats/token)")
    ax.set_title(title or "Scaling ladder")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path

"""What ``jaxtrain plan`` reads from its user: counts like ``20B``, and ``jaxtrain bench`` results.

``--mfu from:FILE`` takes a JSON file written by ``jaxtrain bench``::

    {
      "mfu": 0.46,                          # required: model FLOPs utilisation, a fraction in (0, 1]
      "hardware": "h100",                   # required: a name in jaxtrain.metrics.hardware.HARDWARE
      "tokens_per_second_per_device": 10643.0,  # required: measured training throughput
      "model": "7b", "seq_len": 2048, "devices": 8, "precision": "amp_bf16"   # optional context
    }

MFU there is LLM Foundry's (``jaxtrain.metrics.flops``), so it plugs straight into the time
formula.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re

from jaxtrain.config.validate import PRECISIONS
from jaxtrain.metrics.hardware import HARDWARE
from jaxtrain.tempfiles import probe_write

BENCH_KEYS = {"mfu": (int, float), "hardware": (str,), "tokens_per_second_per_device": (int, float)}
_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


class PlanError(ValueError):
    """A user error: printed as one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """The figures ``--mfu from:FILE`` reads from a ``jaxtrain bench`` JSON file."""

    mfu: float
    hardware: str
    tokens_per_second_per_device: float
    path: str
    precision: str | None = None  # the run's precision, which says which peak its MFU is against


def parse_count(text: str, what: str = "count") -> float:
    """'1T' -> 1e12, '20B' -> 2e10, '500M' -> 5e8, '6.7B', '1.5e12', '2k'; positive only."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtTpP]?)\s*", str(text))
    if not match:
        raise PlanError(f"{what} {text!r} is not a number; use e.g. 1T, 20B, 500M or 1.5e12")
    value = float(match.group(1)) * _SUFFIXES.get(match.group(2).lower(), 1.0)
    if value <= 0:
        raise PlanError(f"{what} must be positive, got {text!r}")
    if not math.isfinite(value):
        raise PlanError(f"{what} {text!r} is too large to be a number here; use e.g. 1T, 20B, 500M or 1.5e12")
    return value


def parse_usd(text: str, what: str = "--budget-usd") -> float:
    """Dollars as people write them: '50000', '50,000', '$50k', '1.5M', '2e6'; positive only."""
    cleaned = str(text).strip().removeprefix("$").replace(",", "").replace("_", "")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbB]?)", cleaned)
    if not match:
        raise PlanError(f"{what} {text!r} is not an amount of dollars; use e.g. 50000, 50k or 1.5M")
    value = float(match.group(1)) * _SUFFIXES.get(match.group(2).lower(), 1.0)
    if not value > 0:
        raise PlanError(f"{what} must be positive, got {text!r}")
    return value


def load_bench(path: str) -> BenchResult:
    """Read a ``jaxtrain bench`` result (schema in the module docstring); one-line errors."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise PlanError(f"--mfu from:{path}: no such file; run jaxtrain bench to write one, or pass --mfu 0.4") \
            from None
    except (OSError, UnicodeDecodeError) as err:
        raise PlanError(f"--mfu from:{path}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise PlanError(f"--mfu from:{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(doc, dict):
        raise PlanError(f"--mfu from:{path}: expected a JSON object with keys {', '.join(BENCH_KEYS)}")
    for key, types in BENCH_KEYS.items():
        if key not in doc:
            raise PlanError(f"--mfu from:{path}: missing key {key!r} (needs {', '.join(BENCH_KEYS)})")
        if isinstance(doc[key], bool) or not isinstance(doc[key], types):
            raise PlanError(f"--mfu from:{path}: {key!r} has the wrong type ({doc[key]!r})")
    if not 0 < doc["mfu"] <= 1:
        raise PlanError(f"--mfu from:{path}: 'mfu' must be a fraction in (0, 1], got {doc['mfu']}")
    if doc["hardware"] not in HARDWARE:
        valid = ", ".join(sorted(HARDWARE))
        raise PlanError(f"--mfu from:{path}: unknown hardware {doc['hardware']!r}; valid: {valid}")
    precision = doc.get("precision")
    if precision is not None and precision not in PRECISIONS:
        raise PlanError(f"--mfu from:{path}: unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return BenchResult(float(doc["mfu"]), doc["hardware"], float(doc["tokens_per_second_per_device"]), str(path),
                       precision)  # fmt: skip


def parse_mesh(text: str) -> dict[str, int]:
    mesh = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if not value.strip().isdigit() or int(value) < 1:
            raise PlanError(f"--mesh {text!r}: expected data=D,fsdp=F,tensor=T with positive integers")
        mesh[name.strip()] = int(value)
    return mesh


def plot_path(plot: str | None, out: str | None) -> tuple[pathlib.Path, str]:
    """Where the ladder plot goes, and the option that said so: ``--plot FILE``, else ``plan.png`` in
    ``--out`` (or the working folder). A path that cannot take the file is a one-line error, before the work."""
    if plot:
        if os.path.isdir(plot):
            raise PlanError(f"--plot {plot}: is a folder; pass a PNG file path such as "
                            f"{os.path.join(plot, 'plan.png')}, or --no-plot")
        path, flag = plot, f"--plot {plot}"
    else:
        if out and os.path.exists(out) and not os.path.isdir(out):
            raise PlanError(f"--out {out}: is a file; --out takes a folder for the plot (plan.png is written "
                            "there): pass a folder, or --plot FILE.png, or --no-plot")
        path = os.path.join(out or ".", "plan.png")
        flag = f"--out {out}" if out else "plan.png (the plot's default path)"
        if os.path.isdir(path):
            raise PlanError(f"{flag}: {path} is a folder; pass another --out folder, or --plot FILE.png, or --no-plot")
    folder = os.path.dirname(os.path.abspath(path))
    above = folder
    while not os.path.exists(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    if os.path.exists(above) and not os.path.isdir(above):
        raise PlanError(f"{flag}: {above} is a file, not a folder; pass a path in a folder, or --no-plot")
    try:
        probe_write(path)
    except OSError as err:
        raise PlanError(f"{flag}: cannot write the plot in {folder} ({err.strerror or err}); "
                        "pass a path in a writable folder, or --no-plot") from None
    return pathlib.Path(path), flag

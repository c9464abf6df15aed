"""``jaxtrain plan``: what a budget buys, what a run costs, and whether it fits in memory.

Three questions, one command::

    jaxtrain plan --budget-usd 50000 --hardware h100            # budget -> model, tokens, loss, ladder
    jaxtrain plan --budget-flops 1e21 | --hours 72 --devices 64 # the same from FLOPs or a deadline
    jaxtrain plan --preset 7b --tokens 1T --devices 440 --hardware a100-40gb   # run -> FLOPs, time, cost
    jaxtrain plan --config configs/mpt/7b.yaml --hardware h100 --devices 8 --memory

``--budget-flops`` counts scaling-law FLOPs (``6*N*D``, as Chinchilla's tables do). Dollars and
hours are turned into LLM Foundry model FLOPs (attention included) at the given MFU; see
``plan.cost`` for which count is used where.

``--mfu`` takes a fraction, or ``from:FILE`` with a JSON file written by ``jaxtrain bench``
(``plan.inputs`` reads it). Without ``--hardware`` the bench file's hardware is used; a
different one is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys

from jaxtrain.config.validate import PRECISIONS
from jaxtrain.metrics.hardware import HARDWARE, PRICE_NOTE, Hardware, get_hardware, load_price_overrides
from jaxtrain.plan import chinchilla
from jaxtrain.plan.cost import (
    RunCost, allocation_for_model_flops, check_mfu, device_hours_for_budget, model_flops_for_device_hours,
    model_flops_per_token,
)
from jaxtrain.plan.ladder import (
    Preset, build_ladder, format_count, format_duration, format_ladder, format_usd, load_presets, nearest_preset,
    plot_ladder, preset_from_config, shape_lookup,
)
from jaxtrain.plan.inputs import (
    BenchResult, PlanError, load_bench, parse_count, parse_usd, plot_path,
)

DEFAULT_MFU = 0.40
DEFAULT_MFU_SOURCE = (
    "default assumption; LLM Foundry's MPT tables: 36-64% on A100, 26-46% on H100; "
    "measure with jaxtrain bench, then --mfu from:FILE"
)
PRICE_LINE = (
    "prices: " + PRICE_NOTE.split(" Put your own")[0]
    + " Override with --price-per-hour USD or --prices FILE (YAML {hardware_name: usd_per_hour})."
)
DEFAULT_DEVICES = 8
MAX_RUNGS = 40


def _precision(args, bench: BenchResult | None, hardware: Hardware) -> str:
    """The precision whose peak the MFU is against: --precision, else the bench run's, else amp_bf16."""
    measured = bench.precision if bench else None
    if args.precision and measured and args.precision != measured:
        raise PlanError(f"--mfu from:{bench.path} was measured in {measured}, whose MFU is against the "
                        f"{hardware.peak_kind(measured)} peak; drop --precision {args.precision} or bench that precision")
    precision = args.precision or measured or "amp_bf16"
    if precision == "amp_fp8" and args.mfu is None and hardware.peak_kind(precision) == "fp8":
        raise PlanError(f"--precision amp_fp8 has no default MFU (it is taken against {hardware.name}'s fp8 peak): "
                        "run jaxtrain bench with precision amp_fp8, then --mfu from:FILE, or give --mfu")
    return precision


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise PlanError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jaxtrain plan", description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = p.add_argument_group("budget (choose one)")
    budget.add_argument("--budget-usd", help="dollars to spend, e.g. 50000, 50k or 1.5M")
    budget.add_argument("--budget-flops", help="scaling-law FLOPs 6*N*D, e.g. 1e21")
    budget.add_argument("--hours", type=float, help="wall-clock deadline in hours (with --devices)")
    run = p.add_argument_group("a given run (reverse question)")
    run.add_argument("--preset", help="model preset name (configs/mpt/NAME.yaml), e.g. 7b")
    run.add_argument("--config", help="a config file for the model (and, with --memory, batch and mesh)")
    run.add_argument("--params", help="parameter count instead of a preset, e.g. 6.7B")
    run.add_argument("--tokens", help="training tokens, e.g. 1T, 20B, 500M")
    hw = p.add_argument_group("hardware and efficiency")
    hw.add_argument("--hardware", help=f"one of {', '.join(HARDWARE)} (default h100, or the bench file's)")
    hw.add_argument("--devices", type=int, help=f"number of devices (default {DEFAULT_DEVICES})")
    hw.add_argument("--price-per-hour", type=float, help="USD per device-hour, replacing the table's assumption")
    hw.add_argument("--prices", help="YAML file of price overrides {hardware_name: usd_per_hour}")
    hw.add_argument("--mfu", help=f"model FLOPs utilisation, a fraction, or from:FILE (default {DEFAULT_MFU})")
    hw.add_argument("--precision", choices=PRECISIONS,
                    help="selects the peak MFU is taken against (amp_fp8: the fp8 peak where the device has one); "
                         "default: the bench file's, else amp_bf16")  # fmt: skip
    hw.add_argument("--seq-len", type=int, help="training sequence length for attention FLOPs (default 2048)")
    out = p.add_argument_group("output")
    out.add_argument("--allocation", default="approach1", choices=tuple(chinchilla.ALLOCATIONS),
                     help="how a budget is split into params and tokens (default approach1)")
    out.add_argument("--rungs", type=int, default=6, help="ladder rungs, each ~4x the compute of the last")
    out.add_argument("--plot", help="PNG path for the ladder plot (default plan.png in --out or the cwd)")
    out.add_argument("--out", help="folder for the plot")
    out.add_argument("--no-plot", action="store_true", help="print only")
    mem = p.add_argument_group("memory (--memory)")
    mem.add_argument("--memory", action="store_true", help="estimate per-device memory of a training step")
    mem.add_argument("--global-batch", type=int, help="sequences per step (default: the config's)")
    mem.add_argument("--microbatch", type=int, help="sequences per device per pass (default: the config's)")
    mem.add_argument("--mesh", help="data=D,fsdp=F,tensor=T (default: the config's parallelism)")
    mem.add_argument("--remat", choices=("none", "full", "dots_saveable", "auto"), help="default: the config's")
    mem.add_argument("--optimizer", choices=("adam", "lion", "sgd"), help="default: from the config")
    return p


# ----------------------------------------------------------------------------- resolution


def _hardware(args, bench: BenchResult | None) -> tuple[Hardware, str]:
    name = args.hardware.strip().lower() if args.hardware else (bench.hardware if bench else "h100")  # H100 = h100
    if bench and bench.hardware != name:
        raise PlanError(f"--mfu from:{bench.path} was measured on {bench.hardware}, not {name}; "
                        f"pass --hardware {bench.hardware} or a bench file from {name}")
    table = HARDWARE
    source = "table default, an editable assumption"
    if args.prices:
        try:
            table = load_price_overrides(args.prices)
        except FileNotFoundError:
            raise PlanError(f"--prices {args.prices}: no such file") from None
        except OSError as err:
            raise PlanError(f"--prices {args.prices}: cannot read it ({err.strerror or err}); "
                            "pass a readable YAML file {hardware_name: usd_per_hour}") from None
        source = f"from {args.prices}"
    try:
        hardware = get_hardware(name) if table is HARDWARE else table[name]
    except (KeyError, ValueError):
        raise PlanError(f"unknown hardware {name!r}; valid names: {', '.join(sorted(HARDWARE))}") from None
    if args.price_per_hour is not None:
        if args.price_per_hour < 0:
            raise PlanError(f"--price-per-hour must not be negative, got {args.price_per_hour}")
        hardware = dataclasses.replace(hardware, price_per_hour_usd=args.price_per_hour)
        source = "from --price-per-hour"
    return hardware, source


def _mfu(args) -> tuple[float, str, BenchResult | None]:
    if args.mfu is None:
        return DEFAULT_MFU, DEFAULT_MFU_SOURCE, None
    if args.mfu.startswith("from:"):
        bench = load_bench(args.mfu[len("from:"):])
        return bench.mfu, f"measured by jaxtrain bench ({bench.path})", bench
    try:
        return check_mfu(float(args.mfu)), "from --mfu", None
    except ValueError:
        raise PlanError(f"--mfu must be a fraction in (0, 1] or from:FILE, got {args.mfu!r}") from None


def _devices(args) -> int:
    devices = DEFAULT_DEVICES if args.devices is None else args.devices
    if devices < 1:
        raise PlanError(f"--devices must be at least 1, got {devices}")
    return devices


_MODEL_FLAGS = ("preset", "config", "params")


def _check_model_source(args) -> None:
    """A model is named one way: two of --preset, --config and --params would leave one of them unused."""
    given = [f"--{name} {getattr(args, name)}" for name in _MODEL_FLAGS if getattr(args, name) is not None]
    if len(given) > 1:
        raise PlanError(f"{' and '.join(given)}: give only one model source (--preset NAME, --config FILE "
                        "or --params N)")


def _model_preset(args, presets: list[Preset]) -> Preset | None:
    if args.config:
        path = pathlib.Path(args.config)
        if not path.exists():
            raise PlanError(f"--config {args.config}: no such file")
        return preset_from_config(path.stem, path)
    if args.preset:
        for preset in presets:
            if preset.name == args.preset:
                return preset
        raise PlanError(f"unknown preset {args.preset!r}; valid: {', '.join(p.name for p in presets)}")
    return None


# The smallest models the Chinchilla fits were made on (Hoffmann et al. 2022: 44M to 16B parameters).
SMALLEST_FITTED_PARAMS = 44e6


def _below_the_fits(params: float, smallest, allocation: str) -> list[str]:
    """A note when the budget's model is far below the sizes the scaling laws were fitted on: its
    allocation, loss and shape are then extrapolations (a loss above a uniform guess, a 125m shape
    for thousands of parameters)."""
    if params >= SMALLEST_FITTED_PARAMS / 4:
        return []
    optimal = chinchilla.compute_optimal_for_params(smallest.params, allocation)
    return [f"  note          {format_count(params)} parameters is far below the 44M to 16B the scaling laws were "
            f"fitted on: the allocation, loss and shape above are extrapolations; the smallest preset "
            f"({smallest.name}) takes {6 * optimal.params * optimal.tokens:.2g} scaling-law FLOPs compute-optimally"]


def _header(
    hardware: Hardware, price_source: str, devices: int, mfu: float, mfu_source: str, precision: str
) -> list[str]:
    peak = hardware.peak_flops(precision)
    peak_text = f"{peak / 1e12:,.0f} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:,.0f} GFLOP/s"
    dtype = hardware.peak_kind(precision)
    return [
        f"  hardware      {devices} x {hardware.name}: {peak_text} dense {dtype} peak, "
        f"{hardware.memory_bytes / 2**30:.0f} GiB each",
        f"  price         ${hardware.price_per_hour_usd:.2f} per device-hour ({price_source})",
        f"  MFU           {mfu:.1%} ({mfu_source})",
    ]


# ----------------------------------------------------------------------------- the three questions


def _plan_budget(args, hardware, price_source, mfu, mfu_source, presets) -> str:
    chosen = [x for x in ("budget_usd", "budget_flops", "hours") if getattr(args, x) is not None]
    if len(chosen) != 1:
        raise PlanError("give exactly one budget: --budget-usd, --budget-flops, or --hours with --devices")
    plot = None if args.no_plot else plot_path(args.plot, args.out)  # checked before any figures are worked out
    devices = _devices(args)
    seq_len = args.seq_len or 2048
    shape_for_params = shape_lookup(presets, seq_len)
    if args.budget_usd is not None:
        if not args.budget_usd > 0:
            raise PlanError(f"--budget-usd must be positive, got {args.budget_usd:g}")
        device_hours = device_hours_for_budget(args.budget_usd, hardware)
        budget_line = f"{format_usd(args.budget_usd)} = {device_hours:,.0f} device-hours"
        budget_flag = f"--budget-usd {args.budget_usd:g}"
    elif args.hours is not None:
        if not args.hours > 0:
            raise PlanError(f"--hours must be positive, got {args.hours:g}")
        device_hours = args.hours * devices
        budget_line = f"{args.hours:g} h on {devices} devices = {device_hours:,.0f} device-hours"
        budget_flag = f"--hours {args.hours:g} on {devices} devices"
    else:
        scaling = parse_count(args.budget_flops, "--budget-flops")
        top = chinchilla.compute_optimal(scaling, args.allocation)
        shape = shape_for_params(top.params)
        device_hours = None
        budget_line = f"{scaling:.3g} scaling-law FLOPs (6*N*D)"
        budget_flag = f"--budget-flops {args.budget_flops}"
    if device_hours is not None:
        budget_model_flops = model_flops_for_device_hours(device_hours, hardware, mfu, args.precision)
        _check_finite(budget_flag, budget_model_flops)
        top, shape = allocation_for_model_flops(budget_model_flops, shape_for_params, args.allocation)
    run = RunCost(top.params, top.tokens, shape, hardware, devices, mfu, args.precision)
    _check_finite(budget_flag, run.model_flops, run.hours, run.cost_usd)

    preset = nearest_preset(top.params, presets)
    preset_shape = dataclasses.replace(preset.shape, seq_len=seq_len)
    preset_tokens = run.model_flops / model_flops_per_token(preset.params, preset_shape)
    preset_optimal = chinchilla.compute_optimal_for_params(preset.params, args.allocation).tokens
    lines = [
        f"jaxtrain plan: {budget_line} on {hardware.name}",
        *_header(hardware, price_source, devices, mfu, mfu_source, args.precision),
        f"  allocation    {chinchilla.APPROACH_DESCRIPTIONS[args.allocation]}",
        f"  compute-optimal model  {format_count(top.params)} parameters on {format_count(top.tokens)} tokens "
        f"({top.tokens_per_param:.1f} tokens/parameter)",
        f"  FLOPs         {run.scaling_flops:.3g} scaling-law (6*N*D); {run.model_flops:.3g} model FLOPs "
        f"(LLM Foundry, attention at seq {seq_len}, shape {shape.name})",
        f"  predicted loss  {run.loss:.3f} nats/token (Chinchilla Approach 3 fit: "
        f"{chinchilla.E} + {chinchilla.A}/N^{chinchilla.ALPHA} + {chinchilla.B}/D^{chinchilla.BETA}; MassiveText)",
        f"  wall time     {format_duration(run.hours)} on {devices} x {hardware.name}",
        f"  cost          {format_usd(run.cost_usd)}",
        f"  nearest preset  {preset.name} ({format_count(preset.params)} params, {preset.path.name}): "
        f"the budget trains it on {format_count(preset_tokens)} tokens "
        f"(compute-optimal for its size: {format_count(preset_optimal)})",
        *_below_the_fits(top.params, min(presets, key=lambda p: p.params), args.allocation),
        "",
        f"ladder (up to {args.rungs} rungs, ~4x compute each: 2x params, 2x tokens; "
        f"{devices} x {hardware.name}, MFU {mfu:.0%})",
    ]
    ladder = build_ladder(top, hardware=hardware, devices=devices, mfu=mfu, presets=presets, rungs=args.rungs,
                          seq_len=seq_len, precision=args.precision)
    lines.append(format_ladder(ladder))
    lines.append(PRICE_LINE)
    if plot is not None:
        path, flag = plot
        title = f"{budget_line} on {hardware.name}, MFU {mfu:.0%}"
        try:
            lines.append(f"plot: {plot_ladder(ladder, path, title=title)}")
        except OSError as err:
            raise PlanError(f"{flag}: cannot write the plot {path} ({err.strerror or err}); "
                            "pass a path in a writable folder, or --no-plot") from None
    return "\n".join(lines)


def _plan_run(args, hardware, price_source, mfu, mfu_source, presets) -> str:
    tokens = parse_count(args.tokens, "--tokens")
    preset = _model_preset(args, presets)
    if args.params:
        params = parse_count(args.params, "--params")
        near = nearest_preset(params, presets)
        shape, label = near.shape, f"{format_count(params)} parameters (shape of {near.name})"
    elif preset:
        params, shape, label = preset.params, preset.shape, f"{preset.name} ({format_count(preset.params)} parameters)"
    else:
        raise PlanError("--tokens needs a model: --preset NAME, --config FILE or --params N")
    if args.seq_len:
        shape = dataclasses.replace(shape, seq_len=args.seq_len)
    devices = _devices(args)
    run = RunCost(params, tokens, shape, hardware, devices, mfu, args.precision)
    _check_finite(" ".join(f"--{name} {getattr(args, name)}" for name in ("params", "tokens") if getattr(args, name)),
                  run.model_flops, run.hours, run.cost_usd)
    optimal = chinchilla.compute_optimal_for_params(params, args.allocation)
    return "\n".join([
        f"jaxtrain plan: {label} on {format_count(tokens)} tokens",
        *_header(hardware, price_source, devices, mfu, mfu_source, args.precision),
        f"  FLOPs         {run.scaling_flops:.3g} scaling-law (6*N*D); {run.model_flops:.3g} model FLOPs "
        f"(LLM Foundry, attention at seq {shape.seq_len}) used for time",
        f"  throughput    {run.tokens_per_second_per_device:,.0f} tokens/s per device",
        f"  wall time     {run.days:.2f} days ({run.hours:,.0f} h) on {devices} x {hardware.name}",
        f"  cost          {format_usd(run.cost_usd)} ({run.device_hours:,.0f} device-hours)",
        f"  predicted loss  {run.loss:.3f} nats/token (Chinchilla Approach 3 fit; MassiveText)",
        f"  Chinchilla    {format_count(params)} parameters is compute-optimal at "
        f"{format_count(optimal.tokens)} tokens "
        f"by {args.allocation}; this run is {tokens / optimal.tokens:.1f}x that",
        PRICE_LINE,
    ])


def _plan_memory(args, hardware, presets) -> str:
    from jaxtrain.plan.memory_plan import plan_memory

    if args.config:
        if not pathlib.Path(args.config).exists():
            raise PlanError(f"--config {args.config}: no such file")
        path = args.config
    elif args.preset:
        path = str(_model_preset(args, presets).path)
    else:
        raise PlanError("--memory needs a model: --config FILE or --preset NAME")
    return plan_memory(path, args, hardware, _devices(args))


_FLOAT_FLAGS = ("budget_usd", "hours", "price_per_hour")
_COUNT_FLAGS = ("devices", "seq_len", "rungs", "global_batch", "microbatch")


def _check_numbers(args) -> None:
    """inf/nan in a float flag and a count below 1 are errors here, before any arithmetic."""
    for name in _FLOAT_FLAGS:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise PlanError(f"--{name.replace('_', '-')} must be a finite number, got {value:g}")
    for name in _COUNT_FLAGS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise PlanError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.rungs > MAX_RUNGS:  # each rung ~4x the compute of the last: 4**40 spans any budget
        raise PlanError(f"--rungs {args.rungs}: at most {MAX_RUNGS} (each rung has about 4x the compute of the last)")


def _check_finite(what: str, *values: float) -> None:
    """A budget or run so large that its FLOPs, time or cost overflow a float is an error, not inf."""
    if not all(math.isfinite(value) for value in values):
        raise PlanError(f"{what} is too large to plan (its FLOPs, time or cost overflow); give a smaller one")


def main(argv: list[str]) -> int:
    """Run ``jaxtrain plan``; prints the answer and returns 0, or one error line and returns 2."""
    try:
        args = build_parser().parse_args(argv)
        if args.no_plot and (args.plot or args.out):
            raise PlanError(f"{'--plot' if args.plot else '--out'} and --no-plot: one asks for the plot, the other "
                            f"not; keep one")
        if args.budget_usd is not None:
            args.budget_usd = parse_usd(args.budget_usd)
        _check_numbers(args)
        _check_model_source(args)
        mfu, mfu_source, bench = _mfu(args)
        hardware, price_source = _hardware(args, bench)
        args.precision = _precision(args, bench, hardware)
        presets = load_presets()
        budgets = [f"--{name.replace('_', '-')}" for name in ("budget_usd", "budget_flops", "hours")
                   if getattr(args, name) is not None]
        models = [f"--{name}" for name in _MODEL_FLAGS if getattr(args, name) is not None]
        if budgets and (args.tokens is not None or args.memory):  # one question at a time
            other = "--tokens" if args.tokens is not None else "--memory"
            raise PlanError(f"{budgets[0]} and {other}: ask one question: a budget (the ladder of models it "
                            f"buys), or one model's run (--tokens) or memory (--memory)")
        if budgets and models:
            raise PlanError(f"{budgets[0]} and {models[0]}: a budget plans the ladder of model sizes it buys; to "
                            f"cost one model, give its --tokens instead of a budget")
        if args.memory:
            text = _plan_memory(args, hardware, presets)
        elif args.tokens is not None:
            text = _plan_run(args, hardware, price_source, mfu, mfu_source, presets)
        else:
            text = _plan_budget(args, hardware, price_source, mfu, mfu_source, presets)
    except (PlanError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0

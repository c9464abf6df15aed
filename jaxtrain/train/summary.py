"""What a training run reports when it ends: ``FitResult``, its ``summary.json`` and the printed summary."""

from __future__ import annotations

import dataclasses
import json
import os


@dataclasses.dataclass
class FitResult:
    step: int
    interrupted: bool
    stop_signal: str | None
    stopped_unhealthy: str | None
    incidents: dict[str, int]
    train_loss: float | None
    eval_loss: float | None
    first_eval_loss: float | None
    tokens_per_second: float | None  # over the speed monitor's last window, of window_steps steps
    mfu: float | None
    wall_seconds: float
    seconds_to_first_step: float | None
    window_steps: int = 0
    # over every timed step of this process: all but its first, evaluations left out
    mean_tokens_per_second: float | None = None
    mean_mfu: float | None = None
    timed_steps: int = 0
    # tokens trained on through ``step``, padding left out, over the whole run (resumed parts included)
    tokens: int = 0
    # resumed at its last step: nothing was trained (the command was run again after the run ended)
    already_complete: bool = False


# Incidents recorded in metrics.jsonl by processes whose state did not survive (no checkpoint holds them).
OUT_OF_LINEAGE = ("restart", "hang")


def is_out_of_lineage(record: dict) -> bool:
    """Whether a metrics.jsonl record is an ``OUT_OF_LINEAGE`` incident: a resumed run keeps it
    whatever its step, as no replayed step records it again."""
    return record.get("incident") in OUT_OF_LINEAGE


def out_of_lineage_incidents(metrics_path: str) -> list[str]:
    """Restarts and hangs: recorded in ``metrics.jsonl`` by processes whose state did not survive."""
    kinds = []
    if not os.path.exists(metrics_path):
        return kinds
    with open(metrics_path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and is_out_of_lineage(record):
                kinds.append(record["incident"])
    return kinds


def read_summary(path: str) -> FitResult | None:
    """The ``FitResult`` a finished run wrote to ``path``; None if there is none or it cannot be read."""
    try:
        with open(path) as f:
            stored = json.load(f)
        names = {field.name for field in dataclasses.fields(FitResult)}
        return FitResult(**{key: value for key, value in stored.items() if key in names})
    except (OSError, ValueError, TypeError):
        return None


def write_summary(path: str, result: FitResult) -> None:
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=2)


def format_summary(result, total_seconds: float) -> str:
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    def rate(tokens_per_second, mfu):
        return f"{fmt(tokens_per_second, ',.0f')} tokens/s, MFU {'n/a' if mfu is None else f'{100 * mfu:.2f}%'}"

    if result.stopped_unhealthy:
        status = f"stopped: {result.stopped_unhealthy}"
    elif result.interrupted:
        status = f"interrupted by {result.stop_signal}: checkpoint saved; run the same command to continue"
    else:
        status = "done"
    incidents = ", ".join(f"{kind} x{count}" for kind, count in result.incidents.items()) or "none"
    first_step = ("no step trained" if result.seconds_to_first_step is None
                  else f"first step done {result.seconds_to_first_step:.1f}s after start")
    lines = [
        status,
        f"  steps: {result.step} ({result.tokens:,} tokens)",
        f"  wall time: {total_seconds:.1f}s ({first_step})",
        f"  final train loss: {fmt(result.train_loss, '.4f')}",
        f"  held-out loss: {fmt(result.first_eval_loss, '.4f')} (first) -> {fmt(result.eval_loss, '.4f')} (final)",
        f"  incidents: {incidents}",
        f"  throughput: {rate(result.tokens_per_second, result.mfu)}"
        + (f" (last {_steps(result.window_steps)})" if result.window_steps else ""),
    ]
    if result.timed_steps:
        lines.append(f"              {rate(result.mean_tokens_per_second, result.mean_mfu)} "
                     f"(mean of {_steps(result.timed_steps)}; compiling and evaluating left out)")
    return "\n".join(lines)


def _steps(count: int) -> str:
    return f"{count} step" + ("" if count == 1 else "s")

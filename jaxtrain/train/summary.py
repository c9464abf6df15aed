"""What a training run reports when it ends: ``FitResult``, its ``summary.json`` and the printed summary."""

from __future__ import annotations

import dataclasses
import json


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
    tokens_per_second: float | None
    mfu: float | None
    wall_seconds: float
    seconds_to_first_step: float | None


def write_summary(path: str, result: FitResult) -> None:
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=2)


def format_summary(result, total_seconds: float) -> str:
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

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
        f"  steps: {result.step}",
        f"  wall time: {total_seconds:.1f}s ({first_step})",
        f"  final train loss: {fmt(result.train_loss, '.4f')}",
        f"  held-out loss: {fmt(result.first_eval_loss, '.4f')} (first) -> {fmt(result.eval_loss, '.4f')} (final)",
        f"  incidents: {incidents}",
        f"  throughput: {fmt(result.tokens_per_second, ',.0f')} tokens/s, MFU {fmt(None if result.mfu is None else 100 * result.mfu, '.2f')}%",
    ]
    return "\n".join(lines)

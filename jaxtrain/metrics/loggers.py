"""Metric loggers: JSONL file, TensorBoard, and the console (live progress bar or plain lines).

Every logger has ``log_metrics(step, metrics)``, ``log_text(msg)`` and ``close()``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import IO, Any, Protocol

from jaxtrain.metrics.tfevents import EventFileWriter, scalar_value, text_value

# Names the console looks for, in order: the train loop's short names, then Composer's.
LOSS_KEYS = ("loss", "train/loss", "loss/train/total")
TOKENS_PER_SECOND_KEYS = ("tokens_per_second", "train/tokens_per_second", "throughput/tokens_per_sec")
MFU_KEYS = ("mfu", "train/mfu", "throughput/device/mfu")


class Logger(Protocol):
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_text(self, msg: str) -> None: ...

    def close(self) -> None: ...


def _to_float(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def _first(metrics: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        if key in metrics and metrics[key] is not None:
            return _to_float(metrics[key])
    return None


def _console_fields(metrics: dict[str, Any]) -> dict[str, str]:
    """The console's loss / tok/s / MFU fields, formatted, for those present in ``metrics``."""
    fields = {}
    loss, tokens_per_second, mfu = (_first(metrics, k) for k in (LOSS_KEYS, TOKENS_PER_SECOND_KEYS, MFU_KEYS))
    if loss is not None:
        fields["loss"] = f"{loss:.3f}"
    if tokens_per_second is not None:
        fields["tok/s"] = f"{tokens_per_second:.0f}"
    if mfu is not None:
        fields["MFU"] = f"{100 * mfu:.1f}%"
    return fields


class JSONLLogger:
    """One JSON object per call, ``{"step": N, "time": unix_seconds, **metrics}``, flushed each line."""

    def __init__(self, path: str | os.PathLike):
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        self.path = os.fspath(path)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError(f"JSONLLogger({self.path!r}) is closed")
        # Non-finite floats are written as null so every line stays strict JSON.
        line = json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()})
        self._file.write(line + "\n")
        self._file.flush()

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._write({"step": int(step), "time": time.time(), **{k: _to_float(v) for k, v in metrics.items()}})

    def log_record(self, step: int, record: dict[str, Any]) -> None:
        """A structured record (strings, lists, numbers), e.g. an incident."""
        self._write({"step": int(step), "time": time.time(), **record})

    def log_text(self, msg: str) -> None:
        self._write({"time": time.time(), "text": str(msg)})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardLogger:
    """Scalars (and text) in a TensorBoard event file under ``logdir``."""

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = os.fspath(logdir)
        self._writer = EventFileWriter(self.logdir)
        self._last_step = 0

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._last_step = int(step)
        self._writer.write(int(step), [scalar_value(name, _to_float(value)) for name, value in metrics.items()])

    def log_text(self, msg: str) -> None:
        self._writer.write(self._last_step, [text_value("log/text_summary", str(msg))])

    def close(self) -> None:
        self._writer.close()


def format_duration(seconds: float) -> str:
    """``"42s"``, ``"1m02s"``, ``"3h04m"``; ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_console_line(step: int, total_steps: int, metrics: dict[str, float], eta_seconds: float | None) -> str:
    """``step 10/100 loss 5.123 tok/s 1234 MFU 12.3% eta 1m02s`` (parts without data are left out)."""
    parts = [f"step {step}/{total_steps}"]
    parts += [f"{name} {value}" for name, value in _console_fields(metrics).items()]
    if eta_seconds is not None:
        parts.append(f"eta {format_duration(eta_seconds)}")
    return " ".join(parts)


class ConsoleProgress:
    """A live tqdm bar (step, loss, tokens/s, MFU, ETA) or plain lines, one per log step.

    The bar is shown when ``enabled`` and the stream is a terminal; otherwise, unless ``lines`` is
    False (Composer's ``log_to_console: false``), each step that is a multiple of ``log_every``
    (and the last) prints ``step 10/100 loss 5.123 tok/s 1234 MFU 12.3% eta 1m02s``.
    ``print_line`` prints above the bar without garbling it. ETA extrapolates the time per step
    measured from the first logged step, so compilation and a resumed run's earlier steps do not
    count.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        *,
        enabled: bool = True,
        log_every: int = 1,
        stream: IO[str] | None = None,
        lines: bool = True,
    ):
        self.total_steps = int(total_steps)
        self.lines = lines
        self.initial_step = int(initial_step)
        self.log_every = max(int(log_every), 1)
        self._stream = stream if stream is not None else sys.stdout
        self._step = self.initial_step
        self._first_log: tuple[float, int] | None = None  # (monotonic time, step)
        self._bar = None
        if enabled and getattr(self._stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total_steps,
                initial=self.initial_step,
                file=self._stream,
                unit="ba",
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
            )

    @property
    def live(self) -> bool:
        """Whether a live progress bar is shown (else plain lines)."""
        return self._bar is not None

    def eta_seconds(self, step: int, now: float | None = None) -> float | None:
        """Seconds left at the pace since the first logged step; None until two steps are logged."""
        if self._first_log is None:
            return None
        start_time, start_step = self._first_log
        done = step - start_step
        if done <= 0:
            return None
        now = time.monotonic() if now is None else now
        return (now - start_time) / done * max(self.total_steps - step, 0)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        step = int(step)
        if self._first_log is None:
            self._first_log = (time.monotonic(), step)
        if self._bar is not None:
            self._bar.update(max(step - self._step, 0))
            self._bar.set_postfix(_console_fields(metrics), refresh=True)
        elif self.lines and (step % self.log_every == 0 or step == self.total_steps):
            self.print_line(format_console_line(step, self.total_steps, metrics, self.eta_seconds(step)))
        self._step = max(self._step, step)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """The same as ``log_metrics`` (the train loop's name for it)."""
        self.log_metrics(step, metrics)

    def print_line(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(str(msg), file=self._stream)
        else:
            self._stream.write(str(msg) + "\n")
            self._stream.flush()

    def log_text(self, msg: str) -> None:
        self.print_line(msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

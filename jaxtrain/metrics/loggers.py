"""Metric loggers: JSONL file, TensorBoard, and the console (live progress bar or plain lines).

Every logger has ``log_metrics(step, metrics)``, ``log_text(msg)`` and ``close()``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

from jaxtrain.metrics.tfevents import EventFileWriter, scalar_value, text_value
from jaxtrain.tempfiles import is_temp_of, temp_path

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


def _strict_json(value: Any) -> Any:
    """``value`` with NumPy/JAX scalars as Python numbers and every non-finite float as null, at any
    depth, so the record is strict JSON (no NaN or Infinity literals)."""
    if isinstance(value, dict):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:  # a NumPy or JAX scalar
        return _strict_json(value.item())
    if hasattr(value, "tolist"):
        return _strict_json(value.tolist())
    return str(value)


def _drop_partial_last_line(path: str) -> None:
    """Cut a trailing record that a killed process left without its newline (it cannot be
    parsed, and a record appended after it would be glued to it)."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            end = size
            while end > 0:  # back to the last newline, a block at a time
                start = max(end - 65536, 0)
                f.seek(start)
                block = f.read(end - start)
                cut = block.rfind(b"\n")
                if cut >= 0:
                    f.truncate(start + cut + 1)
                    return
                end = start
            f.truncate(0)
    except FileNotFoundError:
        return


def _beyond(line: bytes, step: int, keep: Callable[[dict], bool] | None) -> bool:
    """Whether the JSONL ``line`` is a record of a step after ``step`` that ``keep`` does not keep."""
    try:
        record = json.loads(line)
    except ValueError:  # not a record: left as it is
        return False
    at = record.get("step") if isinstance(record, dict) else None
    if type(at) is not int:  # no step (a text line), or not a number of one
        return False
    return at > step and not (keep is not None and keep(record))


def _remove_leftovers(path: str) -> None:
    """Remove the temporary files that a process killed while rewriting ``path`` left beside it."""
    folder, name = os.path.split(os.path.abspath(path))
    for entry in os.listdir(folder) if os.path.isdir(folder) else ():
        if is_temp_of(name, entry):
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:
                pass


def _sync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (where the system allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def drop_records_after(path: str | os.PathLike, step: int, *, keep: Callable[[dict], bool] | None = None) -> int:
    """Remove from a JSONL file the records of steps after ``step`` (``keep(record)`` true: kept)
    and return how many. Records without a step and lines that are no record stay.

    The file is rewritten beside itself and renamed into place, so a process killed meanwhile
    leaves it whole; what such a process left under a temporary name is removed by the next call.
    Nothing is written when no record goes."""
    path = os.fspath(path)
    _remove_leftovers(path)
    _drop_partial_last_line(path)
    try:
        with open(path, "rb") as source:
            lines = source.readlines()
    except FileNotFoundError:
        return 0
    kept = [line for line in lines if not _beyond(line, step, keep)]
    if len(kept) == len(lines):
        return 0
    target = temp_path(path)
    try:
        with open(target, "wb") as out:
            out.writelines(kept)
            out.flush()
            os.fsync(out.fileno())
        os.replace(target, path)
        _sync_folder(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        try:
            os.remove(target)
        except OSError:
            pass
        raise
    return len(lines) - len(kept)


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(_strict_json(record), allow_nan=False) + "\n"


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record to a JSONL file as strict JSON, first cutting a partial last line."""
    path = os.fspath(path)
    _drop_partial_last_line(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(_json_line(record))


class JSONLLogger:
    """One JSON object per call, ``{"step": N, "time": unix_seconds, **metrics}``, flushed each line.

    Records are strict JSON: a non-finite number (a NaN loss, say) is written as null. Opening an
    existing file appends to it, after cutting a last line that a killed process left unfinished;
    a run resuming from a checkpoint first removes what was logged past it (``drop_after``).
    """

    def __init__(self, path: str | os.PathLike):
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        self.path = os.fspath(path)
        _drop_partial_last_line(self.path)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError(f"JSONLLogger({self.path!r}) is closed")
        self._file.write(_json_line(record))
        self._file.flush()

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._write({"step": int(step), "time": time.time(), **{k: _to_float(v) for k, v in metrics.items()}})

    def log_record(self, step: int, record: dict[str, Any]) -> None:
        """A structured record (strings, lists, numbers), e.g. an incident."""
        self._write({"step": int(step), "time": time.time(), **record})

    def log_text(self, msg: str) -> None:
        self._write({"time": time.time(), "text": str(msg)})

    def drop_after(self, step: int, *, keep: Callable[[dict], bool] | None = None) -> int:
        """Remove the records of steps after ``step`` (``drop_records_after``), as a run that
        resumes from a checkpoint at ``step`` does before logging: the steps it replays are then
        in the file once, with their new values. Returns how many records went."""
        if self._file is None:
            raise RuntimeError(f"JSONLLogger({self.path!r}) is closed")
        self._file.close()  # the rename replaces the file: append to the new one
        try:
            return drop_records_after(self.path, step, keep=keep)
        finally:
            self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardLogger:
    """Scalars (and text) in a TensorBoard event file under ``logdir``.

    A run that resumes from a checkpoint (a new process, so a new event file in the same
    ``logdir``) or rolls back within a process logs some steps again. So that TensorBoard shows
    each step once, with the values of the run that went on, the logger writes a
    ``SessionLog.START`` event at ``purge_step`` when given (else at the first step passed to
    ``log_metrics``) and again whenever a step lower than the last one logged comes; TensorBoard
    drops what it read earlier at that step or later.
    """

    def __init__(self, logdir: str | os.PathLike, purge_step: int | None = None):
        self.logdir = os.fspath(logdir)
        self._writer = EventFileWriter(self.logdir)
        self._started = False  # whether this writer's START event is written
        self._last_step: int | None = None  # the last step logged
        if purge_step is not None:
            self.purge_from(purge_step)

    def purge_from(self, step: int) -> None:
        """Mark that this process logs ``step`` and later afresh: TensorBoard hides the events
        logged before at ``step`` or later (by an earlier process or before a rollback). A run
        that resumed from a checkpoint at step S calls it with S + 1 before logging anything."""
        self._writer.write_session_start(int(step))
        self._started = True

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        step = int(step)
        if not self._started or (self._last_step is not None and step < self._last_step):
            self.purge_from(step)
        self._last_step = step
        self._writer.write(step, [scalar_value(name, _to_float(value)) for name, value in metrics.items()])

    def log_text(self, msg: str) -> None:
        step = 0 if self._last_step is None else self._last_step
        self._writer.write(step, [text_value("log/text_summary", str(msg))])

    def close(self) -> None:
        self._writer.close()


def tensorboard_log_dir(options: dict[str, Any] | None, run_folder: str, run_name: str) -> str:
    """Where ``loggers.tensorboard`` writes: ``{log_dir}/{run_name}`` when the section sets
    ``log_dir`` (as Composer's TensorboardLogger names the run's folder, so one ``tensorboard
    --logdir`` shows every run), else ``{run_folder}/tensorboard``."""
    log_dir = (options or {}).get("log_dir")
    if log_dir:
        return os.path.join(os.path.expanduser(os.fspath(log_dir)), run_name)
    return os.path.join(run_folder, "tensorboard")


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

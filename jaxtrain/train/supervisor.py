"""Rerun a failed training run with backoff; the run itself resumes from its newest checkpoint.

``jaxtrain train --max-restarts N ...`` (or ``python -m jaxtrain.main --max_restarts N ...``)
starts the run as a child process. A crash, a hang exit or a preemption restarts it after a
backoff; success, a config error, a health stop, a failed checkpoint save (exit 4: disk full or
storage unreachable, which a restart would only run into again) or Ctrl-C end supervision. The same failure
at the same step twice in a row means retrying will not help, and supervision gives up. Ctrl-C or
SIGTERM while waiting to restart ends supervision at once (exit 130 or 143).

The child tells the supervisor which step it has reached through a small file named by
``JAXTRAIN_SUPERVISOR_STEP_FILE`` (rewritten in place as each step starts, so it survives the
child being killed), so a failure is reported at the step it happened at, not at the last one
whose metrics were logged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from jaxtrain.metrics.loggers import append_jsonl
from jaxtrain.train.health import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_PREEMPTED, NO_RESTART

STEP_FILE_ENV = "JAXTRAIN_SUPERVISOR_STEP_FILE"


class ReachedStep:
    """The child's side of the step file: the step the run has reached, rewritten in place (one
    small write, kept by the operating system if the process is killed right after)."""

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_WRONLY)

    @classmethod
    def from_env(cls) -> ReachedStep | None:
        """The writer for the file the supervisor named, or None when not supervised."""
        path = os.environ.get(STEP_FILE_ENV)
        if not path:
            return None
        try:
            return cls(path)
        except OSError:
            return None

    def write(self, step: int) -> None:
        try:
            os.pwrite(self._fd, f"{step:>20}\n".encode(), 0)  # fixed width: no stale digits remain
        except OSError:  # only the supervisor's report would be less exact; training goes on
            pass


def _read_reached(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):  # missing, or empty: the child reached no step
        return None


def last_step(run_folder: str) -> int | None:
    """The last training step recorded in the run's metrics.jsonl."""
    path = os.path.join(run_folder, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    step = None
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if "train/loss" in record:
                step = record["step"]
    return step


def _at(step: int | None) -> str:
    return "during start-up" if step is None else f"at step {step}"


def _describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return {75: "hang (watchdog)", 143: "preempted (SIGTERM)", 4: "checkpoint save failed", 1: "error"}.get(
        code, f"exit code {code}")


def supervise(
    config_path: str | None,
    overrides: Sequence[str],
    *,
    max_restarts: int,
    backoff_seconds: float = 5.0,
    max_backoff_seconds: float = 300.0,
    extra_args: Sequence[str] = (),
) -> int:
    """Run training in a child process, restarting it up to ``max_restarts`` times."""
    from jaxtrain.config import ConfigError, load_config
    from jaxtrain.train.paths import expand_run_paths, resolve_run_name

    try:
        cfg = load_config(config_path, overrides, notices=[])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    cfg = expand_run_paths(cfg, resolve_run_name(cfg, config_path))
    if not cfg.save_folder or not cfg.autoresume:
        print("error: --max-restarts needs save_folder and autoresume: true, so a restarted run continues",
              file=sys.stderr)
        return EXIT_CONFIG

    command = [sys.executable, "-m", "jaxtrain.main", *extra_args]
    if config_path:
        command += ["--config", config_path]
    for item in overrides:
        command += ["--set", item]

    fd, step_file = tempfile.mkstemp(prefix="jaxtrain-step-")
    os.close(fd)
    env = dict(os.environ, **{STEP_FILE_ENV: step_file})

    child: subprocess.Popen | None = None
    stop_signal: int | None = None  # the supervisor's own stop request, if any
    forwarded = False  # whether the running child was sent it

    def forward(signum, frame):  # a stop request goes to the run, or, between runs, ends supervision
        nonlocal stop_signal, forwarded
        stop_signal = signum
        if child is not None and child.poll() is None:
            child.send_signal(signum)
            forwarded = True

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    attempts: list[tuple[int, int | None]] = []
    stopped_waiting = False
    try:
        while True:
            open(step_file, "w").close()
            child = subprocess.Popen(command, env=env)
            if stop_signal is not None and not forwarded:  # it came while the run was being started
                child.send_signal(stop_signal)
                forwarded = True
            code = child.wait()
            step = _read_reached(step_file)
            attempts.append((code, step))
            if code in NO_RESTART or forwarded:
                break
            restarts = len(attempts) - 1
            repeated = len(attempts) >= 2 and attempts[-1] == attempts[-2]
            if repeated or restarts >= max_restarts:
                why = "the same failure repeated at the same step" if repeated else f"{max_restarts} restarts used"
                print(f"supervisor: giving up: {why}", file=sys.stderr, flush=True)
                break
            if stop_signal is not None:  # it came after the run had ended
                stopped_waiting = True
                break
            delay = min(max_backoff_seconds, backoff_seconds * 2**restarts)
            print(f"supervisor: run ended with {_describe(code)} {_at(step)}; restarting in {delay:.1f}s "
                  f"(restart {restarts + 1} of {max_restarts})", file=sys.stderr, flush=True)
            # In short sleeps: a signal handler returns into time.sleep, which then sleeps on.
            deadline = time.monotonic() + delay
            while stop_signal is None and (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, 0.1))
            if stop_signal is not None:
                stopped_waiting = True
                break
            _record_restart(cfg.run_folder, step, code, len(attempts))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            os.remove(step_file)
        except OSError:
            pass
    summary = "; ".join(f"attempt {i + 1}: {_describe(c) if c else 'done'} {_at(s)}" for i, (c, s) in enumerate(attempts))
    print(f"supervisor: {summary}", file=sys.stderr, flush=True)
    if stopped_waiting:
        name = signal.Signals(stop_signal).name
        print(f"supervisor: stopped by {name} while waiting to restart; the run resumes from its last checkpoint "
              "when the same command is run again", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED if stop_signal == signal.SIGINT else EXIT_PREEMPTED
    return attempts[-1][0] if attempts[-1][0] >= 0 else 128 - attempts[-1][0]


def _record_restart(run_folder: str, step: int | None, code: int, attempt: int) -> None:
    if step is None:  # it failed before reaching a step: the last one the run logged
        step = last_step(run_folder)
    record = {"step": step or 0, "time": time.time(), "incident": "restart", "exit": _describe(code), "attempt": attempt}
    append_jsonl(os.path.join(run_folder, "metrics.jsonl"), record)  # after a line the child left cut short

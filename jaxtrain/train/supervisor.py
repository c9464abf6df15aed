"""Rerun a failed training run with backoff; the run itself resumes from its newest checkpoint.

``jaxtrain train --max-restarts N ...`` (or ``python -m jaxtrain.main --max_restarts N ...``)
starts the run as a child process. A crash, a hang exit or a preemption restarts it after a
backoff; success, a config error, a health stop, a failed checkpoint save (exit 4: disk full or
storage unreachable, which a restart would only run into again) or Ctrl-C end supervision. The same failure
at the same step twice in a row means retrying will not help, and supervision gives up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Sequence

from jaxtrain.train.health import EXIT_CONFIG, NO_RESTART


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

    child: subprocess.Popen | None = None
    stopping = False

    def forward(signum, frame):  # the supervisor's own stop request goes to the run, then ends supervision
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    attempts: list[tuple[int, int | None]] = []
    try:
        while True:
            child = subprocess.Popen(command)
            code = child.wait()
            step = last_step(cfg.run_folder)
            attempts.append((code, step))
            if code in NO_RESTART or stopping:
                break
            restarts = len(attempts) - 1
            repeated = len(attempts) >= 2 and attempts[-1] == attempts[-2]
            _record_restart(cfg.run_folder, step, code, len(attempts))
            if repeated or restarts >= max_restarts:
                why = "the same failure repeated at the same step" if repeated else f"{max_restarts} restarts used"
                print(f"supervisor: giving up: {why}", file=sys.stderr, flush=True)
                break
            delay = min(max_backoff_seconds, backoff_seconds * 2**restarts)
            print(f"supervisor: run ended with {_describe(code)} at step {step}; restarting in {delay:.1f}s "
                  f"(restart {restarts + 1} of {max_restarts})", file=sys.stderr, flush=True)
            time.sleep(delay)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary = "; ".join(f"attempt {i + 1}: {_describe(c) if c else 'done'} at step {s}" for i, (c, s) in enumerate(attempts))
    print(f"supervisor: {summary}", file=sys.stderr, flush=True)
    return attempts[-1][0] if attempts[-1][0] >= 0 else 128 - attempts[-1][0]


def _record_restart(run_folder: str, step: int | None, code: int, attempt: int) -> None:
    record = {"step": step or 0, "time": time.time(), "incident": "restart", "exit": _describe(code), "attempt": attempt}
    with open(os.path.join(run_folder, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")

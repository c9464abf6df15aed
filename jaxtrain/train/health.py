"""Host-side health: policy decisions on bad steps, the hang watchdog, and rehearsed faults.

The train step itself never applies a non-finite update and skips loss spikes; this module
decides what happens next (keep going, roll back to the last checkpoint, or stop), watches for
hangs, and injects deliberate faults when the config asks for them.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import statistics
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

# Process exit codes (documented in the README).
EXIT_OK = 0
EXIT_CONFIG = 2  # a user error in the config or command line
EXIT_UNHEALTHY = 3  # stopped by a health policy (NaN/spike with policy stop, too many rollbacks)
EXIT_CHECKPOINT = 4  # a checkpoint could not be saved (disk full, storage unreachable); earlier ones are intact
EXIT_HANG = 75  # the watchdog saw no progress; restart the run
EXIT_INTERRUPTED = 130  # SIGINT: a checkpoint was saved; the user asked to stop
EXIT_PREEMPTED = 143  # SIGTERM: a checkpoint was saved; the machine is being taken away

# A failed save needs a person (free space, fix credentials): restarting would only retrain to the same failure.
NO_RESTART = (EXIT_OK, EXIT_CONFIG, EXIT_UNHEALTHY, EXIT_CHECKPOINT, EXIT_INTERRUPTED)


def install_stop_handlers(on_signal: Callable[[int], None], *, sigterm: bool = True) -> dict:
    """Route SIGINT (and SIGTERM, when ``sigterm``) to ``on_signal(signum)``; returns the handlers
    they replace, for ``signal.signal`` to put back. Off the main thread nothing is installed."""
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM) if sigterm else (signal.SIGINT,):
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: on_signal(signum))
        except ValueError:  # not the main thread
            pass
    return previous


class HealthMonitor:
    """Reads each step's metrics and says what to do: "ok", "rollback" or "stop"."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.consecutive_spikes = 0
        self.skipped = 0
        self.rollbacks = 0

    def observe(self, metrics: dict[str, float]) -> tuple[str, str | None]:
        """(action, incident kind or None) for one step's metrics."""
        health = self.cfg
        if not metrics.get("applied", 1.0):
            self.skipped += 1
        if not metrics.get("finite", 1.0):
            self.consecutive_spikes = 0
            if health.nan_policy in ("rollback", "stop"):
                return self._escalate(health.nan_policy), "nonfinite"
            return "ok", "nonfinite"
        if metrics.get("spike", 0.0):
            self.consecutive_spikes += 1
            if health.spike_policy in ("rollback", "stop") and self.consecutive_spikes >= health.spike_patience:
                self.consecutive_spikes = 0
                return self._escalate(health.spike_policy), "spike"
            return "ok", "spike"
        self.consecutive_spikes = 0
        return "ok", None

    def _escalate(self, policy: str) -> str:
        if policy == "rollback":
            if self.rollbacks >= self.cfg.max_rollbacks:
                return "stop"
            self.rollbacks += 1
        return policy


class Watchdog:
    """Exits the process with EXIT_HANG, after dumping every thread's stack, when ``beat`` has
    not been called for ``timeout`` seconds. Armed by the first ``beat``, after the first step
    (compilation is slow); ``pause`` disarms it until the next ``beat``. The loop beats after
    every step and every held-out evaluation batch."""

    def __init__(self, *, timeout: float | None, factor: float, minimum: float, stacks_path: str,
                 on_hang: Callable[[float], None] | None = None):
        self.fixed_timeout = timeout
        self.factor = factor
        self.minimum = minimum
        self.stacks_path = stacks_path
        self.on_hang = on_hang
        self.step_times: list[float] = []
        self._last = time.monotonic()
        self._armed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="jaxtrain-watchdog", daemon=True)
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def beat(self, step_seconds: float | None = None) -> None:
        with self._lock:
            self._last = time.monotonic()
            self._armed = True
            if step_seconds is not None:
                self.step_times = (self.step_times + [step_seconds])[-200:]

    def pause(self) -> None:
        with self._lock:
            self._armed = False

    @contextlib.contextmanager
    def paused(self):
        """Unwatched for the ``with`` block (compiling, work that takes no set time); then armed
        again, counting from the block's end, if it was armed before (before the first step it
        stays unarmed: that step may take its time)."""
        with self._lock:
            was_armed, self._armed = self._armed, False
        try:
            yield
        finally:
            if was_armed:
                self.beat()

    @property
    def timeout(self) -> float:
        if self.fixed_timeout:
            return float(self.fixed_timeout)
        if len(self.step_times) < 5:
            return max(self.minimum, 1800.0)
        return max(self.minimum, self.factor * statistics.median(self.step_times))

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                idle = time.monotonic() - self._last
                armed = self._armed
            if armed and idle > self.timeout:
                self._hang(idle)

    def _hang(self, idle: float) -> None:
        message = f"watchdog: no progress for {idle:.0f}s (timeout {self.timeout:.0f}s); stacks of all threads follow"
        print(message, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        try:
            with open(self.stacks_path, "w") as f:
                print(message, file=f, flush=True)
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            pass
        if self.on_hang is not None:
            self.on_hang(idle)
        os._exit(EXIT_HANG)


class FaultInjector:
    """Deliberate failures from the ``faults`` config section. A crash or hang happens once per
    run folder (a marker file remembers it), so the restarted run gets past it."""

    def __init__(self, cfg: Any, run_folder: str):
        self.cfg = cfg
        self.run_folder = run_folder
        self.nan_steps = {int(s) for s in cfg.nan_at_steps}
        self.spike_steps = {int(s) for s in cfg.spike_at_steps}
        self.poisoned: dict[tuple, float] = {}  # data position -> loss multiplier
        self.bound_steps: set[int] = set()

    @property
    def active(self) -> bool:
        cfg = self.cfg
        events = (cfg.crash_at_step, cfg.hang_at_step, cfg.sigterm_at_step)
        return bool(self.nan_steps or self.spike_steps or any(step is not None for step in events))

    def loss_multiplier(self, step: int, position: tuple) -> float:
        """Multiplier for the loss of the step that will become ``step`` (1-based), whose batch
        comes from data ``position``. A fault sticks to the batch it first hit, like bad data:
        replaying that batch fails again, and skipping it avoids the fault."""
        if step not in self.bound_steps:
            if step in self.nan_steps:
                self.poisoned[position] = float("nan")
            elif step in self.spike_steps:
                self.poisoned[position] = float(self.cfg.spike_factor)
            self.bound_steps.add(step)
        return self.poisoned.get(position, 1.0)

    def once(self, kind: str, step: int) -> bool:
        """True the first time ``kind`` fires at ``step`` in this run folder, False after."""
        marker = os.path.join(self.run_folder, f".fault-{kind}-{step}")
        if os.path.exists(marker):
            return False
        os.makedirs(self.run_folder, exist_ok=True)
        open(marker, "w").close()
        return True

    def kill(self, message: str) -> None:
        print(f"faults: {message}; sending SIGKILL", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def during_step(self, step: int) -> None:
        """Called once ``step`` is dispatched, while the device still computes it."""
        if self.cfg.kill_during_step == step and self.once("kill-step", step):
            self.kill(f"killed while step {step} computes")

    def during_eval(self, step: int) -> None:
        """Called after the first batch of the held-out eval at ``step``."""
        if self.cfg.kill_during_eval_step == step and self.once("kill-eval", step):
            self.kill(f"killed during the held-out eval at step {step}")

    def after_step(self, step: int) -> None:
        if self.cfg.crash_at_step == step and self.once("crash", step):
            print(f"faults: crashing after step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.cfg.sigterm_at_step == step and self.once("sigterm", step):
            print(f"faults: sending SIGTERM after step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        if self.cfg.hang_at_step == step and self.once("hang", step):
            print(f"faults: hanging after step {step}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)


def control_array(multiplier: float, skip: bool) -> np.ndarray:
    """The train step's optional ``control`` input: [loss multiplier, force skip]."""
    return np.asarray([multiplier, 1.0 if skip else 0.0], dtype=np.float32)

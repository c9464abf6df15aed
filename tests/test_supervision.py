"""Supervision of unattended runs: stopping the supervisor while it waits to restart, the step a
failure is reported at, and the hang watchdog during held-out evaluation (and its callbacks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_end_to_end import ROOT, command, run
from test_unattended import incidents

# Rehearses trouble inside held-out evaluation, which no ``faults`` key reaches: a sitecustomize
# (found first on PYTHONPATH) wraps Trainer.evaluate once jaxtrain.train.loop is imported. The
# JSON in JAXTRAIN_TEST_EVAL says at which step's evaluation (once per run folder) and what:
#   hang_at_batch: k  - the read of eval batch k never returns (0: hangs as evaluation starts)
#   slow_compile: s   - compiling the eval step takes s more seconds
#   slow_batch: s     - reading each eval batch takes s seconds
#   slow_eval_end: s  - an EVAL_END callback (as ICL scoring is) takes s seconds
EVAL_HOOK = r'''
import importlib.abc, importlib.util, json, os, sys, time

SPEC = json.loads(os.environ["JAXTRAIN_TEST_EVAL"])


def hang(what):
    print(f"hook: {what} never returns", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


class Loader:
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def batches(self, batch_size, **kwargs):
        for index, batch in enumerate(self.loader.batches(batch_size, **kwargs)):
            if SPEC.get("hang_at_batch") == index:
                hang(f"reading eval batch {index}")
            time.sleep(SPEC.get("slow_batch", 0))
            yield batch


class SlowCompile:
    """A jitted function whose compile (ahead of time or in its first call) takes longer."""

    def __init__(self, jitted):
        self.jitted, self.compiled = jitted, False

    def _compile(self):
        if not self.compiled:
            self.compiled = True
            time.sleep(SPEC.get("slow_compile", 0))

    def __call__(self, *args):
        self._compile()
        return self.jitted(*args)

    def lower(self, *args):
        lowered, outer = self.jitted.lower(*args), self

        class Lowered:
            def compile(self):
                outer._compile()
                return lowered.compile()

        return Lowered()


class SlowEvalEnd:
    def run_event(self, event, loop):
        if event.name == "EVAL_END":
            time.sleep(SPEC.get("slow_eval_end", 0))


def patch(loop):
    evaluate = loop.Trainer.evaluate

    def patched(self):
        marker = os.path.join(self.cfg.run_folder, ".hook-eval-%d" % self.step)
        if self.step != SPEC["step"] or os.path.exists(marker):
            return evaluate(self)
        open(marker, "w").close()
        print(f"hook: evaluation at step {self.step}", file=sys.stderr, flush=True)
        parts, callbacks = self.parts, list(self.events.callbacks)
        if SPEC.get("hang_at_batch") == 0:
            hang("evaluation")
        eval_loader, eval_step = parts.eval_loader, parts.eval_step
        parts.eval_loader, parts.eval_step = Loader(eval_loader), SlowCompile(eval_step)
        self.events.callbacks.append(SlowEvalEnd())
        try:
            return evaluate(self)
        finally:
            parts.eval_loader, parts.eval_step, self.events.callbacks[:] = eval_loader, eval_step, callbacks

    loop.Trainer.evaluate = patched
    if SPEC.get("slow_save"):  # the first checkpoint save takes this long (a large upload)
        save = loop.Trainer.save

        def slow_save(self, *, force=False):
            checkpointer = self.checkpointer
            if checkpointer is not None and not getattr(checkpointer, "slowed", False):
                inner = checkpointer.save

                def slow(*args, **kwargs):
                    checkpointer.save = inner
                    time.sleep(SPEC["slow_save"])
                    return inner(*args, **kwargs)

                checkpointer.save, checkpointer.slowed = slow, True
            return save(self, force=force)

        loop.Trainer.save = slow_save


class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "jaxtrain.train.loop":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, Finder())
'''


def hooked_env(tmp_path: Path, spec: dict) -> dict:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(EVAL_HOOK)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, JAXTRAIN_TEST_EVAL=json.dumps(spec))


def run_hooked(tmp_path: Path, args: list[str], spec: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=hooked_env(tmp_path, spec))


def supervised(tmp_path: Path, *overrides: str, restarts: int, backoff: float) -> list[str]:
    return command(tmp_path, *overrides) + ["--max_restarts", str(restarts), "--restart_backoff", str(backoff)]


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_while_waiting_to_restart_ends_supervision_at_once(tmp_path, sig, status):
    args = supervised(tmp_path, "max_duration=6ba", "eval_interval=0", "save_interval=2ba", "faults.crash_at_step=3",
                      restarts=2, backoff=30)
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "restarting in" in line:
                break
        assert "restarting in 30.0s" in lines[-1], "".join(lines[-30:])
        sent = time.time()
        process.send_signal(sig)
        rest = process.communicate(timeout=20)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == status, rest[-3000:]
    assert time.time() - sent < 10
    last = rest.strip().splitlines()[-1]
    assert f"stopped by {sig.name} while waiting to restart" in last, rest
    assert "resumes from its last checkpoint when the same command is run again" in last
    assert "attempt 2" not in rest and "resumed from" not in rest
    assert "restart" not in {record["incident"] for record in incidents(tmp_path / "run")}  # none happened


def test_supervisor_reports_the_step_a_run_failed_at(tmp_path):
    """Metrics are logged a step late, so the last logged step is not where a run failed: a kill
    during step 3 and a crash after step 5 are reported at steps 3 and 5."""
    args = supervised(tmp_path, "max_duration=6ba", "eval_interval=0", "save_interval=2ba",
                      "faults.kill_during_step=3", "faults.crash_at_step=5", restarts=3, backoff=0.1)
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run ended with killed by SIGKILL at step 3;" in result.stderr
    assert "run ended with killed by SIGKILL at step 5;" in result.stderr
    summary = [line for line in result.stderr.splitlines() if line.startswith("supervisor: attempt 1")]
    assert summary == ["supervisor: attempt 1: killed by SIGKILL at step 3; attempt 2: killed by SIGKILL at step 5; "
                       "attempt 3: done at step 6"], result.stderr[-3000:]
    restarts = [record for record in incidents(tmp_path / "run") if record["incident"] == "restart"]
    assert [record["step"] for record in restarts] == [3, 5]


@pytest.mark.parametrize("overrides, spec", [
    # the first evaluation of the process, mid-training: its compile is let be, the rest is watched
    (("max_duration=6ba", "eval_interval=2ba", "eval_first=false"), {"step": 2, "hang_at_batch": 1}),
    # the evaluation before the first step
    (("max_duration=4ba", "eval_interval=0", "eval_first=true"), {"step": 0, "hang_at_batch": 2}),
    # the evaluation after the last step
    (("max_duration=4ba", "eval_interval=0", "eval_first=false"), {"step": 4, "hang_at_batch": 0}),
], ids=["stuck-eval-batch", "stuck-first-eval", "stuck-final-eval"])
def test_hang_in_evaluation_exits_75_with_stacks(tmp_path, overrides, spec):
    args = command(tmp_path, *overrides, "save_interval=100ba", "health.watchdog_timeout=3")
    started = time.time()
    try:
        result = run_hooked(tmp_path, args, spec, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("a hang in evaluation was never caught by the watchdog")
    assert result.returncode == 75, result.stderr[-3000:]
    assert "hook: " in result.stderr and "watchdog: no progress" in result.stderr
    stacks = (tmp_path / "run" / "hang-stacks.txt").read_text()
    # where the main thread was stuck: in evaluation (the hook's wrapper of it, when it hangs at the start)
    assert " in hang" in stacks and (" in evaluate" in stacks or " in patched" in stacks)
    assert "hang" in {record["incident"] for record in incidents(tmp_path / "run")}
    assert time.time() - started < 90


def test_long_but_progressing_evaluation_and_icl_callbacks_are_not_hangs(tmp_path):
    """Watched evaluation raises no false alarm: a slow compile of the eval step, an evaluation
    longer than the timeout whose batches keep coming, and an EVAL_END callback (as ICL scoring
    is) longer than the timeout."""
    args = command(tmp_path, "max_duration=4ba", "eval_interval=2ba", "eval_first=false", "save_interval=100ba",
                   "health.watchdog_timeout=3")
    spec = {"step": 2, "slow_compile": 4, "slow_batch": 1.2, "slow_eval_end": 4}  # 4 batches: about 5 s
    result = run_hooked(tmp_path, args, spec, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hook: evaluation at step 2" in result.stderr and "watchdog" not in result.stderr
    assert "step 2: held-out loss" in result.stdout and "step 4: held-out loss" in result.stdout


def test_a_checkpoint_save_longer_than_the_timeout_is_not_a_hang(tmp_path):
    """Saves wait for the previous write and upload it: as long as the checkpoint is large, not a step's time."""
    args = command(tmp_path, "max_duration=4ba", "eval_interval=0", "save_interval=2ba", "health.watchdog_timeout=3")
    result = run_hooked(tmp_path, args, {"step": -1, "slow_save": 4}, timeout=300)  # the save at step 2
    assert result.returncode == 0, result.stderr[-3000:]
    assert "watchdog" not in result.stderr
    assert sorted(int(name) for name in os.listdir(tmp_path / "checkpoints") if name.isdigit())[-2:] == [2, 4]


def test_a_pause_rearms_only_a_watchdog_that_was_armed(tmp_path):
    from jaxtrain.train.health import Watchdog

    watchdog = Watchdog(timeout=5, factor=20, minimum=1, stacks_path=str(tmp_path / "stacks"))
    with watchdog.paused():  # before the first step: unarmed, and it stays so (that step may take its time)
        pass
    assert not watchdog._armed
    watchdog.beat()
    before = watchdog._last
    with watchdog.paused():
        assert not watchdog._armed
        time.sleep(0.01)
    assert watchdog._armed and watchdog._last > before  # counting from the block's end

"""Unattended runs: NaN and spike handling, rollback, the watchdog, SIGTERM, unreadable
checkpoints, and the supervisor getting a faulty run to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtrain.checkpoint.load import load_checkpoint
from jaxtrain.config.schema import ParallelismConfig
from jaxtrain.parallel.logical import DEFAULT_RULES
from jaxtrain.parallel.mesh import batch_sharding, build_mesh, replicated
from jaxtrain.train.health import control_array
from jaxtrain.train.state import create_train_state
from jaxtrain.train.step import HealthRules, compile_train_step, make_train_step
from test_end_to_end import ROOT, command, run
from test_train_step import random_batch, tiny_model


def build_controlled_step(health: HealthRules):
    mesh = build_mesh(ParallelismConfig())
    tx = optax.adam(1e-2)
    state, model_def, shardings = create_train_state(tiny_model(), tx, seed=0, mesh=mesh, rules=DEFAULT_RULES, spike_window=4)
    step = make_train_step(model_def, tx, lambda count: jnp.asarray(1e-2), health=health)
    compiled = compile_train_step(step, shardings, batch_sharding(mesh), donate=False, control_sharding=replicated(mesh))
    return state, compiled


def test_nan_step_applies_no_update_and_spike_is_skipped():
    state, step = build_controlled_step(HealthRules(spike_ratio=2.0, spike_min_steps=2))
    batch = random_batch()
    state1, metrics = step(state, batch, control_array(1.0, False))
    assert bool(metrics["applied"]) and bool(metrics["finite"])
    state2, metrics = step(state1, batch, control_array(float("nan"), False))
    assert not bool(metrics["finite"]) and not bool(metrics["applied"])
    for before, after in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state2.params)):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    for before, after in zip(jax.tree.leaves(state1.opt_state), jax.tree.leaves(state2.opt_state)):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    state3, metrics = step(state2, batch, control_array(1.0, False))
    assert bool(metrics["applied"]) and int(state3.window_count) == 2
    state4, metrics = step(state3, batch, control_array(10.0, False))  # loss x10 against a window mean
    assert bool(metrics["spike"]) and not bool(metrics["applied"])
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(state4.params)[0]), np.asarray(jax.tree.leaves(state3.params)[0]))
    _, metrics = step(state4, batch, control_array(1.0, True))  # a forced skip
    assert bool(metrics["finite"]) and not bool(metrics["applied"])


def final_params(folder: Path):
    return jax.tree.leaves(load_checkpoint(str(folder)).params)


def incidents(run_folder: Path) -> list[dict]:
    lines = (run_folder / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "incident" in record]


def test_supervised_run_survives_crash_nan_spike_and_sigterm(tmp_path):
    """The 'go to sleep' run: every fault at once under the supervisor, compared with a clean
    run told to skip the same batches."""
    common = ("max_duration=16ba", "eval_interval=0", "save_interval=2ba", "health.spike_min_steps=2", "health.spike_ratio=3")
    clean = run(command(tmp_path / "clean", *common, "health.skip_steps=[4, 9]"))
    assert clean.returncode == 0, clean.stderr[-3000:]

    faulty = command(
        tmp_path / "faulty",
        *common,
        "faults.nan_at_steps=[4]",
        "faults.spike_at_steps=[9]",
        "faults.spike_factor=20",
        "faults.crash_at_step=6",
        "faults.sigterm_at_step=11",
    )
    faulty += ["--max_restarts", "4", "--restart_backoff", "0.1"]
    result = run(faulty)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "killed by SIGKILL" in result.stderr and "preempted (SIGTERM)" in result.stderr
    kinds = {record["incident"] for record in incidents(tmp_path / "faulty" / "run")}
    assert {"nonfinite", "spike", "restart"} <= kinds
    summary = json.loads((tmp_path / "faulty" / "run" / "summary.json").read_text())
    assert summary["step"] == 16 and summary["incidents"]["restart"] == 2
    for ours, reference in zip(final_params(tmp_path / "faulty" / "checkpoints"), final_params(tmp_path / "clean" / "checkpoints")):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def test_nan_rollback_skips_the_offending_batch_and_finishes(tmp_path):
    args = command(
        tmp_path, "max_duration=10ba", "eval_interval=0", "save_interval=2ba",
        "health.nan_policy=rollback", "faults.nan_at_steps=[5]",
    )
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rolled back to step 4" in result.stdout
    records = incidents(tmp_path / "run")
    assert [r["incident"] for r in records] == ["nonfinite", "rollback"]
    assert records[1]["skipped_steps"] == [5]
    # the steps replayed after the rollback are logged once, with the values of the run that went on
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in logged if "train/loss" in record]
    assert steps == list(range(1, 11))


def test_nan_stop_policy_exits_3(tmp_path):
    result = run(command(tmp_path, "max_duration=10ba", "eval_interval=0", "health.nan_policy=stop", "faults.nan_at_steps=[3]"))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "health policy stopped the run at step 3" in result.stdout


def test_watchdog_dumps_stacks_and_exits_75(tmp_path):
    args = command(tmp_path, "max_duration=10ba", "eval_interval=0", "faults.hang_at_step=3", "health.watchdog_timeout=3")
    started = time.time()
    result = run(args)
    assert result.returncode == 75, result.stderr[-3000:]
    assert "watchdog: no progress" in result.stderr and "Thread" in result.stderr
    stacks = (tmp_path / "run" / "hang-stacks.txt").read_text()
    assert "hang_at_step" in stacks or "after_step" in stacks  # the main thread's stack shows where it hung
    assert time.time() - started < 120
    assert "hang" in {r["incident"] for r in incidents(tmp_path / "run")}


def test_sigterm_saves_within_bound_and_exits_143(tmp_path):
    args = command(tmp_path, "max_duration=400ba", "eval_interval=0", "save_interval=1000ba")
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        time.sleep(0.2)
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    assert time.time() - sent < 30
    assert "interrupted by SIGTERM" in out
    assert any(name.isdigit() for name in os.listdir(tmp_path / "checkpoints"))


def test_unreadable_latest_checkpoint_falls_back_to_previous(tmp_path):
    first = run(command(tmp_path, "max_duration=6ba", "eval_interval=0", "save_interval=2ba"))
    assert first.returncode == 0, first.stderr[-3000:]
    latest = tmp_path / "checkpoints" / "6" / "state"
    for path in latest.rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"garbage")
    resumed = run(command(tmp_path, "max_duration=8ba", "eval_interval=0", "save_interval=2ba"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint" in resumed.stdout and "cannot be restored" in resumed.stdout
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 8

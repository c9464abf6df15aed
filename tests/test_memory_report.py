"""Start-up memory report, log_shardings, and device_train_microbatch_size: auto."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain.config import load_config
from jaxtrain.config.schema import AttnConfig, ConfigError, ModelConfig, ParallelismConfig
from jaxtrain.parallel.logical import DEFAULT_RULES
from jaxtrain.parallel.mesh import batch_sharding, build_mesh
from jaxtrain.train.memory_report import format_memory_report, memory_report, start_report
from jaxtrain.train.microbatch import (
    DEVICE_MEMORY_ENV, AutoMicrobatchStep, SettledStep, compiled_step_bytes, device_capacity, is_out_of_memory,
    settle_step, smaller_microbatch, step_candidates)
from jaxtrain.train.setup import build_run
from jaxtrain.train.state import create_train_state
from jaxtrain.train.step import compile_train_step, make_train_step

# A 2-layer model on a handful of standard-library files: builds in seconds.
TINY = [
    "variables.max_seq_len=32", "model.d_model=32", "model.n_layers=2", "model.vocab_size=384",
    "tokenizer.kwargs.vocab_size=384", "train_loader.dataset.max_files=8", "eval_loader.dataset.max_files=40",
    "global_train_batch_size=8", "device_train_microbatch_size=auto", "progress_bar=false",
]


def build_tiny_run(folder):
    cfg = load_config("configs/quickstart.yaml", [*TINY, f"run_folder={folder}"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        parts = build_run(cfg)
    return parts, out.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(DEVICE_MEMORY_ENV, raising=False)
        return build_tiny_run(tmp_path_factory.mktemp("run"))


def token_batch(parts, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, parts.cfg.model.vocab_size, (parts.cfg.global_train_batch_size, parts.cfg.max_seq_len))
    return {"input_ids": jax.device_put(jnp.asarray(ids, jnp.int32), parts.batch_sharding)}


def test_memory_block_measures_parameters_and_adam_state(tiny_run):
    parts, _ = tiny_run
    report = memory_report(parts)
    assert report.params_bytes == 4 * parts.num_params
    scalars = [x for x in jax.tree.leaves(parts.state.opt_state) if x.ndim == 0]
    assert 0 < len(scalars) <= 4  # step counters, not per-parameter state
    assert report.optimizer_bytes == 2 * report.params_bytes + sum(x.nbytes for x in scalars)
    assert report.microbatch == 8 and report.activations_bytes > 0
    assert report.step_bytes == compiled_step_bytes(parts.train_step_memory) > report.params_bytes
    assert report.capacity_bytes is None  # CPU reports no capacity
    text = format_memory_report(report)
    assert len(text.splitlines()) == 3
    assert "parameters 144.62 KiB" in text and "microbatch 8" in text and "device capacity not reported" in text


def test_the_eval_before_step_one_was_compiled_during_start_up(tiny_run):
    # eval_first: build_run compiles the eval step on a thread while it traces the train step;
    # the first evaluation runs that executable and compiles nothing (persistent cache off, so
    # a cache hit cannot pass for it).
    from jaxtrain.parallel.mesh import global_batch_from_local

    parts, _ = tiny_run
    assert parts.cfg.eval_first
    compiles = []

    def listener(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(seconds)

    local = next(parts.eval_loader.batches(parts.cfg.device_eval_batch_size * jax.device_count()))
    batch = global_batch_from_local(local, parts.mesh)
    cache_enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = jax.device_get(parts.eval_step(parts.state.params, batch))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        jax.config.update("jax_enable_compilation_cache", cache_enabled)
    assert compiles == []
    assert float(out["tokens"]) > 0 and np.isfinite(float(out["loss_sum"]))


def test_log_shardings_prints_one_line_per_parameter(tiny_run):
    parts, _ = tiny_run
    assert "shardings:" not in start_report(parts)
    shown = start_report(dataclasses.replace(parts, cfg=dataclasses.replace(parts.cfg, log_shardings=True)))
    lines = shown.split("shardings:\n", 1)[1].splitlines()
    n_leaves = len(jax.tree.leaves(parts.state.params))
    assert len(lines) == n_leaves + 1 and lines[-1].startswith(f"total: {n_leaves} parameters")
    assert all("/device" in line for line in lines[:-1])


def test_auto_without_a_reported_capacity_takes_the_whole_batch(tiny_run):
    parts, printed = tiny_run
    assert "device_train_microbatch_size auto: settled on 8" in printed
    assert parts.device_train_microbatch == 8


def test_processes_agree_on_the_smallest_capacity_any_reports(monkeypatch):
    """Each process settles the auto settings itself: the smallest capacity decides for all, so
    that no process compiles a different step (the real exchange runs in tests/test_multihost.py)."""
    from jax.experimental import multihost_utils

    from jaxtrain.train.microbatch import agreed_capacity

    assert agreed_capacity(80 * 2**30) == 80 * 2**30  # one process: its own figure, exactly
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    for reports, agreed in [([80 * 2**30, 40 * 2**30 + 5, 0], 40 * 2**30), ([0, 0, 0], None)]:
        monkeypatch.setattr(multihost_utils, "process_allgather",
                            lambda value, reports=reports: np.array([r // 2**20 for r in reports], np.int32))
        assert agreed_capacity(reports[0] or None) == agreed


def test_auto_halves_under_an_injected_capacity_and_the_loss_is_unchanged(tiny_run, tmp_path, monkeypatch):
    full, _ = tiny_run
    whole_batch_bytes = compiled_step_bytes(full.train_step_memory)
    monkeypatch.setenv(DEVICE_MEMORY_ENV, str(whole_batch_bytes - 1))
    assert device_capacity() == (whole_batch_bytes - 1, DEVICE_MEMORY_ENV)
    halved, printed = build_tiny_run(tmp_path)
    assert "device_train_microbatch_size auto: settled on 4" in printed
    assert halved.device_train_microbatch == 4
    assert compiled_step_bytes(halved.train_step_memory) < whole_batch_bytes
    assert "(from JAXTRAIN_DEVICE_MEMORY_BYTES)" in format_memory_report(memory_report(halved))
    batch = token_batch(full)
    _, metrics_full = full.train_step(jax.tree.map(jnp.copy, full.state), batch)
    _, metrics_half = halved.train_step(halved.state, batch)
    assert float(metrics_half["loss"]) == pytest.approx(float(metrics_full["loss"]), rel=1e-5)


def test_settle_step_picks_four_microbatches_for_a_capacity_between():
    model = ModelConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=97, no_bias=True,
                        attn_config=AttnConfig(alibi=True))
    mesh = build_mesh(ParallelismConfig())
    tx = optax.adam(1e-2)
    state, model_def, shardings = create_train_state(model, tx, seed=0, mesh=mesh, rules=DEFAULT_RULES)
    steps = {}

    def build_step(num_microbatches):  # memoised, so each size compiles once
        if num_microbatches not in steps:
            step = make_train_step(model_def, tx, lambda count: jnp.asarray(0.1), num_microbatches=num_microbatches)
            steps[num_microbatches] = compile_train_step(step, shardings, batch_sharding(mesh), donate=False)
        return steps[num_microbatches]

    ids = np.random.default_rng(0).integers(0, 97, (8, 16))
    batch = {"input_ids": jax.device_put(jnp.asarray(ids, jnp.int32), batch_sharding(mesh))}
    def settle(capacity, start=8):
        candidates = [c for c in step_candidates(8, microbatch="auto", remat="none", seq_len=16) if c[0] <= start]
        return settle_step(lambda n, _remat: build_step(n), (state, batch), candidates, per_device_batch=8,
                           capacity=capacity)  # fmt: skip

    need = {n: compiled_step_bytes(settle(None, start=8 // n).memory) for n in (1, 2, 4)}
    assert need[1] > need[2] > need[4]

    settled = settle((need[2] + need[4]) // 2)
    assert (settled.microbatch, settled.num_microbatches) == (2, 4)
    assert settled.describe().startswith("device_train_microbatch_size auto: settled on 2 (8: needs")
    assert settle(None).num_microbatches == 1
    with pytest.raises(ValueError, match="no microbatch whose train step fits"):
        settle(1000)
    _, metrics_one = build_step(1)(state, batch)
    _, metrics_four = settled.step(state, batch)
    assert float(metrics_four["loss"]) == pytest.approx(float(metrics_one["loss"]), rel=1e-5)


def test_first_step_out_of_memory_retries_the_same_batch_with_half_the_microbatch():
    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB")
    assert is_out_of_memory(oom)
    assert not is_out_of_memory(ValueError("shape mismatch"))
    calls = []

    def step_for(microbatch):
        def step(state, batch):
            calls.append((microbatch, batch))
            if microbatch > 2:
                raise oom
            return state + 1, {"microbatch": microbatch}
        return step

    def settled(microbatch):
        return SettledStep(microbatch, 8 // microbatch, step_for(microbatch), None, [])

    def resettle(failed):
        return settled(smaller_microbatch(failed.microbatch, 8))

    reports = []
    step = AutoMicrobatchStep(settled(8), resettle, report=reports.append)
    state, metrics = step(jnp.zeros(()), "batch-0")
    assert metrics["microbatch"] == 2 and step.microbatch == 2
    assert calls == [(8, "batch-0"), (4, "batch-0"), (2, "batch-0")]
    assert reports[-1].startswith("device_train_microbatch_size auto: settled on 2")
    step(state, "batch-1")
    assert calls[-1] == (2, "batch-1") and len(reports) == 2
    # with several processes one alone must not switch programs: the run stops with what to set
    calls.clear()
    with mock.patch.object(jax, "process_count", return_value=2), mock.patch.object(jax, "process_index", return_value=1):
        with pytest.raises(ConfigError, match=r"microbatch 8 \(process 1 of 2\); set device_train_microbatch_size to "
                                              r"a smaller value \(e.g. 4\)"):
            AutoMicrobatchStep(settled(8), resettle, report=reports.append)(jnp.zeros(()), "batch-0")
    assert calls == [(8, "batch-0")] and len(reports) == 2


def test_smaller_microbatch_halves_through_divisors():
    assert [smaller_microbatch(m, 12) for m in (12, 6, 3, 1)] == [6, 3, 1, None]
    assert smaller_microbatch(8, 8) == 4


def test_remat_auto_settles_on_the_least_recompute_that_fits(tiny_run, tmp_path, monkeypatch):
    """model.remat: auto compiles no remat first and falls back to dots_saveable, then full, when
    the compiled step exceeds the capacity; recomputing changes no number."""
    def build(folder, *overrides):
        cfg = load_config("configs/quickstart.yaml", [*TINY, "device_train_microbatch_size=8", "model.remat=auto",
                                                     *overrides, f"run_folder={folder}"])  # fmt: skip
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            return build_run(cfg), out.getvalue()

    monkeypatch.delenv(DEVICE_MEMORY_ENV, raising=False)
    # (a CPU without bf16 matrix units is named before anything compiles)
    monkeypatch.setattr("jaxtrain.train.setup.cpu_bf16_note", lambda: "no bf16 units here")
    plain, printed = build(tmp_path / "plain")
    assert printed.index("warning: no bf16 units here") < printed.index("model.remat auto")
    monkeypatch.setattr("jaxtrain.train.setup.cpu_bf16_note", lambda: None)
    assert "model.remat auto: settled on none" in printed and plain.remat == "none"
    assert "remat none" in format_memory_report(memory_report(plain))
    none_bytes = compiled_step_bytes(plain.train_step_memory)
    monkeypatch.setenv(DEVICE_MEMORY_ENV, str(none_bytes - 1))
    tight, printed = build(tmp_path / "tight")
    assert tight.remat in ("dots_saveable", "full") and f"model.remat auto: settled on {tight.remat} (none: needs" in printed
    assert compiled_step_bytes(tight.train_step_memory) < none_bytes
    assert tight.device_train_microbatch == 8
    batch = token_batch(plain)
    _, metrics_plain = plain.train_step(plain.state, batch)
    _, metrics_tight = tight.train_step(tight.state, batch)
    assert float(metrics_tight["loss"]) == pytest.approx(float(metrics_plain["loss"]), rel=1e-6)
    assert float(metrics_tight["grad_norm"]) == pytest.approx(float(metrics_plain["grad_norm"]), rel=1e-4)
    monkeypatch.setenv(DEVICE_MEMORY_ENV, "1000")
    with pytest.raises(ValueError, match="model.remat: auto found no remat policy whose train step fits"):
        build(tmp_path / "none-fit")


def test_step_candidates_prefer_less_recompute_then_smaller_microbatches():
    assert step_candidates(8, microbatch="auto", remat="none", seq_len=2048) == [(8, "none"), (4, "none"), (2, "none"), (1, "none")]
    assert step_candidates(8, microbatch=4, remat="auto", seq_len=2048) == [(4, "none"), (4, "dots_saveable"), (4, "full")]
    assert step_candidates(8, microbatch="auto", remat="auto", seq_len=2048) == [
        (8, "none"), (4, "none"), (2, "none"), (8, "dots_saveable"), (4, "dots_saveable"), (2, "dots_saveable"),
        (8, "full"), (4, "full"), (2, "full"), (1, "full")]  # fmt: skip
    # a sequence shorter than the token floor still tries the whole batch without recompute first
    assert step_candidates(2, microbatch="auto", remat="auto", seq_len=256)[:2] == [(2, "none"), (2, "dots_saveable")]

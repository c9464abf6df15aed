"""The train step: loss on shifted labels, accumulation equals the full batch, no recompiles."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain.config.schema import AttnConfig, ModelConfig, ParallelismConfig, PeftConfig
from jaxtrain.parallel.logical import DEFAULT_RULES
from jaxtrain.parallel.mesh import batch_sharding, build_mesh
from jaxtrain.train.loss import IGNORE_INDEX, shift_labels
from jaxtrain.train.state import create_train_state
from jaxtrain.train.step import compile_train_step, make_train_step

VOCAB = 97


def tiny_model(**overrides) -> ModelConfig:
    # MPT's released configuration. (With biases, the key bias has an exactly-zero gradient whose
    # rounding noise Adam would amplify, making update comparisons ill-conditioned.)
    base = dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=VOCAB, no_bias=True,
                attn_config=AttnConfig(alibi=True))
    base.update(overrides)
    return ModelConfig(**base)


def build(model_cfg, tx, num_microbatches, *, compute_dtype=jnp.float32):
    mesh = build_mesh(ParallelismConfig())
    state, model_def, shardings = create_train_state(model_cfg, tx, seed=0, mesh=mesh, rules=DEFAULT_RULES)
    step = make_train_step(
        model_def, tx, lambda count: jnp.asarray(0.1), num_microbatches=num_microbatches, compute_dtype=compute_dtype
    )
    return state, model_def, compile_train_step(step, shardings, batch_sharding(mesh), donate=False)


def random_batch(batch=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(batch, length), dtype=np.int32)
    labels = ids.copy()
    # Ignore a different number of tokens per row, so per-microbatch means differ from the batch mean.
    for row in range(batch):
        labels[row, : row * 2] = IGNORE_INDEX
    return {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels)}


def test_shift_labels_moves_left_and_ignores_last():
    labels = jnp.array([[5, 6, 7, 8]])
    np.testing.assert_array_equal(shift_labels(labels), [[6, 7, 8, IGNORE_INDEX]])


def test_loss_is_token_mean_cross_entropy_of_shifted_labels():
    tx = optax.sgd(0.1)
    state, model_def, step = build(tiny_model(), tx, 1)
    batch = random_batch()
    logits = np.asarray(model_def.merge(state.params)(batch["input_ids"]), dtype=np.float64)
    targets = np.asarray(shift_labels(batch["labels"]))
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    valid = targets != IGNORE_INDEX
    picked = np.take_along_axis(log_probs, np.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    expected = -(picked * valid).sum() / valid.sum()
    _, metrics = step(state, batch)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["tokens"]) == valid.sum()


def test_accumulation_equals_full_batch():
    tx = optax.adam(1e-2)
    batch = random_batch()
    state_full, _, step_full = build(tiny_model(), tx, 1)
    full_run = []
    for _ in range(2):
        state_full, metrics_full = step_full(state_full, batch)
        full_run.append(metrics_full)
    for num_microbatches in (2, 4):
        state_acc, _, step_acc = build(tiny_model(), tx, num_microbatches)
        for metrics_full in full_run:
            state_acc, metrics_acc = step_acc(state_acc, batch)
            assert float(metrics_acc["loss"]) == pytest.approx(float(metrics_full["loss"]), rel=1e-5)
            assert float(metrics_acc["grad_norm"]) == pytest.approx(float(metrics_full["grad_norm"]), rel=1e-4)
        for full, acc in zip(jax.tree.leaves(state_full.params), jax.tree.leaves(state_acc.params)):
            np.testing.assert_allclose(np.asarray(acc), np.asarray(full), atol=2e-6, rtol=1e-5)


def test_step_compiles_once_and_bf16_tracks_fp32():
    tx = optax.adam(1e-3)
    state32, _, step32 = build(tiny_model(), tx, 1)
    state16, _, step16 = build(tiny_model(), tx, 1, compute_dtype=jnp.bfloat16)
    for index in range(3):
        state32, m32 = step32(state32, random_batch(seed=index))
        state16, m16 = step16(state16, random_batch(seed=index))
        assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)
    assert step32._cache_size() == 1
    assert state16.params is not None and jax.tree.leaves(state16.params)[0].dtype == jnp.float32
    assert int(state32.step) == 3


def test_cpu_programs_compiled_at_llvm_o2_give_the_default_bits(monkeypatch):
    # The trainer compiles the state's initialisation and the steps at -O2 on the CPU (XLA's
    # default is -O3): the same parameters and the same updated state, bit for bit.
    from jaxtrain.parallel.platform import llvm_options
    from jaxtrain.train import state as state_module

    cfg = tiny_model(d_model=128, n_layers=1, max_seq_len=32, vocab_size=256)  # widths where vector loops run full
    mesh = build_mesh(ParallelismConfig(), jax.devices()[:1])
    tx = optax.adamw(1e-3)
    init_state, shardings, model_def = state_module._state_plan(cfg, tx, mesh, DEFAULT_RULES, 8)
    step = compile_train_step(make_train_step(model_def, tx, lambda count: jnp.asarray(1e-3),
                                              compute_dtype=jnp.bfloat16), shardings, batch_sharding(mesh), donate=False)
    key, batch = jax.random.key(3), random_batch(batch=4, length=32)

    def trained(options):
        state = jax.jit(init_state, out_shardings=shardings).lower(key).compile(options)(key)
        return jax.tree.leaves(state) + jax.tree.leaves(step.lower(state, batch).compile(options)(state, batch))

    # (explicit levels: the tests' XLA_FLAGS choose -O0 for everything else)
    for o2, default in zip(trained({"xla_backend_optimization_level": 2}), trained({"xla_backend_optimization_level": 3}),
                           strict=True):
        np.testing.assert_array_equal(np.asarray(o2), np.asarray(default))
    # asked for on the CPU unless XLA_FLAGS chooses a level (the tests choose -O0)
    assert llvm_options("cpu") == {} and llvm_options("gpu") == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert llvm_options("cpu") == {"xla_backend_optimization_level": 2} and llvm_options("tpu") == {}


@pytest.mark.parametrize("name", ["decoupled_adamw", "decoupled_lionw"])
def test_optimizer_keeps_its_own_state_on_skipped_steps(name):
    # jaxtrain's optimizers take the step's apply flag and keep their state on a skipped step
    # themselves: the same bits as selecting the old state after the update, applied or skipped,
    # and on the CPU the compiled step copies no moment to do so.
    import re

    from jaxtrain.config.schema import GradientClippingConfig, OptimizerConfig
    from jaxtrain.parallel.mesh import replicated
    from jaxtrain.train.health import control_array
    from jaxtrain.train.optim import build_optimizer, gates_skipped_steps

    tx = build_optimizer(OptimizerConfig(name=name, lr=1e-2, weight_decay=1e-4), lambda count: 1e-2 / (1.0 + count),
                         clipping=GradientClippingConfig())
    # the same transformation without the flag: the train step then selects the old state
    plain = optax.GradientTransformation(tx.init, tx.update)
    mesh = build_mesh(ParallelismConfig())
    steps, states, donating = {}, {}, {}
    for label, transformation in (("gated", tx), ("plain", plain)):
        state, model_def, shardings = create_train_state(tiny_model(), transformation, seed=0, mesh=mesh,
                                                         rules=DEFAULT_RULES)
        assert gates_skipped_steps(transformation, state.opt_state) == (label == "gated")
        step = make_train_step(model_def, transformation, lambda count: jnp.asarray(1e-2), compute_dtype=jnp.bfloat16)
        steps[label], donating[label] = (
            compile_train_step(step, shardings, batch_sharding(mesh), donate=donate, control_sharding=replicated(mesh))
            for donate in (False, True))
        states[label] = state
    for index, (multiplier, skip) in enumerate([(1.0, False), (float("nan"), False), (1.0, True), (1.0, False)]):
        before = states["gated"]
        for label in states:
            states[label], metrics = steps[label](states[label], random_batch(seed=index), control_array(multiplier, skip))
            assert bool(metrics["applied"]) == (multiplier == 1.0 and not skip)
        for gated, plain_leaf in zip(jax.tree.leaves(states["gated"]), jax.tree.leaves(states["plain"]), strict=True):
            np.testing.assert_array_equal(np.asarray(gated), np.asarray(plain_leaf))
        if not bool(metrics["applied"]):  # nothing moved, the count and the recorded lr included
            for kept, old in zip(jax.tree.leaves(states["gated"].opt_state), jax.tree.leaves(before.opt_state), strict=True):
                np.testing.assert_array_equal(np.asarray(kept), np.asarray(old))
    assert int(states["gated"].opt_state[1].count) == 2
    if name == "decoupled_adamw":
        batch, control = random_batch(), control_array(1.0, False)
        moment_copies = {
            label: re.findall(r"= f32\[[\d,]*\]\{[\d,]*\} copy\(%state_opt_state_1__(?:mu|nu)",
                              donating[label].lower(states[label], batch, control).compile().as_text())
            for label in steps
        }
        assert not moment_copies["gated"] and moment_copies["plain"]


@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_cpu_eval_step_takes_the_loss_in_chunks_with_the_same_number(monkeypatch, compute_dtype):
    """Held-out evaluation on the CPU runs the loss in sequence chunks (no backward pass, so no
    recompute): its program never holds the float32 logits of the whole batch, and its loss sum
    equals the full-logits cross-entropy. Traced for a GPU, the model's ``fused_loss`` decides."""
    from jaxtrain.layers import lm_loss
    from jaxtrain.parallel.platform import compiling_for
    from jaxtrain.train.step import make_eval_step

    cfg = tiny_model(vocab_size=4096)
    state, model_def, _ = build(cfg, optax.sgd(0.1), 1, compute_dtype=compute_dtype)
    batch = random_batch()
    batch["input_ids"] = batch["input_ids"] * 41 % 4096  # spread over the vocabulary
    monkeypatch.setattr(lm_loss, "CHUNK_LOGIT_BYTES", 8 * 4 * 4096 * 4)  # 4 positions per chunk
    eval_step = jax.jit(make_eval_step(model_def, compute_dtype=compute_dtype))
    text = eval_step.lower(state.params, batch).compile().as_text()
    full_logits = "f32[8,16,4096]"
    assert full_logits not in text and "f32[8,4,4096]" in text
    got = eval_step(state.params, batch)
    logits = model_def.merge(state.params)(batch["input_ids"], compute_dtype=compute_dtype)
    loss_sum, _, count = lm_loss.cross_entropy_sum(logits, shift_labels(batch["labels"]))
    assert float(got["tokens"]) == float(count)
    assert float(got["loss_sum"]) == pytest.approx(float(loss_sum), rel=1e-5 if compute_dtype == jnp.float32 else 1e-3)
    with compiling_for("gpu"):  # the model's default (fused_loss off): the whole batch's logits
        gpu_jaxpr = jax.make_jaxpr(make_eval_step(model_def, compute_dtype=compute_dtype))(state.params, batch)
    assert full_logits in str(gpu_jaxpr)


def test_a_deeper_model_draws_its_weights_in_no_more_temporary_memory():
    """The stacked blocks' weights are drawn one layer after another, so the program that builds the
    state holds one layer's random draws at a time: its temporaries are the same for 2 layers as
    for 8, and below the 8 layers' kernels (drawn all at once they were about twice the kernels).
    Each layer's numbers are the ones it gets alone (test_mpt's scan-and-unrolled test)."""
    from jaxtrain.train import state as train_state

    mesh = build_mesh(ParallelismConfig())
    temps = {}
    for layers in (2, 8):
        cfg = tiny_model(d_model=256, n_heads=4, n_layers=layers, scan_layers=True)
        init, shardings, _ = train_state._state_plan(cfg, optax.adamw(1e-3), mesh, DEFAULT_RULES, 100)
        temps[layers] = jax.jit(init, out_shardings=shardings).lower(jax.random.key(0)).compile(
            ).memory_analysis().temp_size_in_bytes
    kernels = 8 * 4 * 12 * 256 * 256  # the 8 layers' kernels in float32
    assert temps[8] == temps[2] < kernels


def test_a_lora_model_drawn_casts_its_frozen_weights_a_layer_at_a_time():
    """A LoRA model built without load_path draws its frozen kernels in float32 and keeps them in
    the compute dtype: each is cast as it is drawn, inside the layer scan, so 8 layers take less
    than one layer's kernels more temporary memory than 2 (cast after the scan, the 8 layers'
    float32 kernels were temporaries) and the weights are those of the float model cast to bf16
    (XLA fuses the draw with the cast, so an element a float32 rounding away from a bf16 midpoint
    may round the other way: one in a few hundred thousand here)."""
    from jaxtrain.layers import lora
    from jaxtrain.train import state as train_state

    mesh = build_mesh(ParallelismConfig())
    peft = PeftConfig(r=2, target_modules=["Wqkv"])
    temps, states = {}, {}
    for layers in (2, 8):
        cfg = tiny_model(d_model=256, n_heads=4, n_layers=layers, scan_layers=True, peft_config=peft)
        init, shardings, _ = train_state._state_plan(cfg, optax.adamw(1e-3), mesh, DEFAULT_RULES, 100,
                                                     frozen_dtype=jnp.bfloat16)
        program = jax.jit(init, out_shardings=shardings).lower(jax.random.key(0)).compile()
        temps[layers] = program.memory_analysis().temp_size_in_bytes
        states[layers] = program, cfg
    layer = 4 * 12 * 256 * 256  # one layer's kernels in float32
    assert temps[8] - temps[2] < layer
    program, cfg = states[2]
    ours = program(jax.random.key(0)).params
    init, _, _ = train_state._state_plan(dataclasses.replace(cfg, peft_config=None), optax.adamw(1e-3), mesh,
                                         DEFAULT_RULES, 100)
    plain = lora.cast_frozen(init(jax.random.key(0)).params, jnp.bfloat16)
    frozen = lora.split_trainable(ours)[1]
    assert {leaf.dtype for leaf in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(plain)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=2**-7, atol=0)  # at most one bf16 step apart
        assert np.mean(a == b) > 0.9999

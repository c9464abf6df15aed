"""``precision: amp_fp8``: the fp8 layer products, their scaling, the model and train step that use
them, and what a run on hardware without fp8 does."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain.config.schema import AttnConfig, FFNConfig, ModelConfig, ParallelismConfig
from jaxtrain.layers import fp8
from jaxtrain.metrics.hardware import get_hardware
from jaxtrain.parallel.logical import DEFAULT_RULES
from jaxtrain.parallel.mesh import batch_sharding, build_mesh
from jaxtrain.train.state import create_train_state
from jaxtrain.train.step import compile_train_step, compiler_options, make_train_step

from test_end_to_end import command, run, step_losses


def relative(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def operands(rows=256, inner=256, cols=384, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (2, rows // 2, inner)).astype(jnp.bfloat16)
    w = (0.02 * jax.random.normal(keys[1], (inner, cols))).astype(jnp.bfloat16)
    g = jax.random.normal(keys[2], (2, rows // 2, cols)).astype(jnp.bfloat16)
    return x, w, g


def test_scales_are_powers_of_two_that_put_the_maximum_in_the_top_binade():
    top = float(jnp.finfo(fp8.FORWARD_DTYPE).max)  # 448
    for amax in (1e-6, 0.3, 1.0, 447.0, 448.0, 449.0, 3e5):
        scale = float(fp8.scale_for(jnp.float32(amax), fp8.FORWARD_DTYPE))
        assert np.log2(scale) == int(np.log2(scale)), scale
        assert top / 2 < amax / scale <= top, (amax, scale)
    assert float(fp8.scale_for(jnp.float32(0.0), fp8.FORWARD_DTYPE)) == 1.0
    assert not np.isfinite(float(fp8.scale_for(jnp.float32(np.inf), fp8.FORWARD_DTYPE)))


def test_quantize_round_trips_exactly_what_fp8_can_hold():
    # values fp8 e4m3 holds exactly, times a power of two: quantising and back changes nothing
    exact = jnp.asarray([0.0, 1.0, -1.5, 0.875, 240.0, -448.0, 2.0**-6], jnp.float32) * 2.0**-12
    q, scale = fp8.quantize(exact.astype(jnp.bfloat16), fp8.FORWARD_DTYPE)
    assert q.dtype == fp8.FORWARD_DTYPE
    np.testing.assert_array_equal(np.asarray(fp8.dequantize(q, scale, jnp.float32)), np.asarray(exact))
    # an all-zero tensor quantises to zeros without dividing by zero
    q, scale = fp8.quantize(jnp.zeros((4, 4), jnp.bfloat16), fp8.GRADIENT_DTYPE)
    assert float(scale) == 1.0 and not np.any(np.asarray(q.astype(jnp.float32)))


def test_fp8_product_and_gradients_equal_the_exact_ones_within_fp8_rounding():
    """Forward e4m3 x e4m3, backward e5m2 x e4m3: within fp8 rounding of the float32 product, and
    measurably not the bf16 product (the fp8 round trip is not folded away)."""
    x, w, g = operands()
    exact = lambda x, w: jnp.einsum("...i,io->...o", x.astype(jnp.float32), w.astype(jnp.float32))
    y, pullback = jax.vjp(jax.jit(fp8.dot), x, w)
    want, pullback_exact = jax.vjp(exact, x, w)
    assert y.dtype == jnp.bfloat16
    assert 0.01 < relative(y, want) < 0.06  # e4m3: 3 mantissa bits, ~3.6 % per element
    bf16 = jnp.einsum("...i,io->...o", x, w)
    assert relative(bf16, want) < 0.005
    for got, expected in zip(pullback(g), pullback_exact(g.astype(jnp.float32))):
        assert got.dtype == jnp.bfloat16
        assert 0.02 < relative(got, expected) < 0.1  # e5m2 gradients: 2 mantissa bits


def test_non_finite_input_gives_a_non_finite_product():
    x, w, _ = operands()
    y = fp8.dot(x.at[0, 0, 0].set(jnp.nan), w)
    assert not np.all(np.isfinite(np.asarray(y, np.float32)))


def tiny_model(**overrides) -> ModelConfig:
    base = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=128, no_bias=True,
                attn_config=AttnConfig(alibi=True))
    base.update(overrides)
    return ModelConfig(**base)


def recording_quantize(monkeypatch):
    """Record (fp8 type, shape) of every tensor the fp8 products quantise while tracing."""
    seen = set()
    plain = fp8.quantize

    def quantize(x, dtype):
        seen.add((jnp.dtype(dtype).name, tuple(x.shape)))
        return plain(x, dtype)

    monkeypatch.setattr(fp8, "quantize", quantize)
    return seen


@pytest.mark.parametrize("cfg", [tiny_model(), tiny_model(no_bias=False, ffn_config=FFNConfig(ffn_type="mptglu"))],
                         ids=["mpt", "biases-glu"])
def test_model_takes_every_block_product_in_fp8_and_the_head_in_bf16(monkeypatch, cfg):
    mesh = build_mesh(ParallelismConfig())
    state, model_def, _ = create_train_state(cfg, optax.sgd(0.1), seed=0, mesh=mesh, rules=DEFAULT_RULES)
    batch, length, d, hidden = 2, cfg.max_seq_len, cfg.d_model, 4 * cfg.d_model
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length)), jnp.int32)

    def loss(params):
        return model_def.apply(params, ids, ids, method="lm_loss", compute_dtype=jnp.bfloat16)[0]

    plain_loss = jax.jit(loss)(state.params)
    seen = recording_quantize(monkeypatch)
    with fp8.products():
        fp8_loss, grads = jax.jit(jax.value_and_grad(loss))(state.params)
    # Wqkv (one product for Q, K and V), out_proj, up (and the GLU's gate, the same shapes), down:
    # inputs and weights in e4m3, output gradients in e5m2; the head's [d, vocab] product is not
    acts, outs = (batch, length, d), (batch, length, hidden)
    assert seen == {
        ("float8_e4m3fn", acts), ("float8_e4m3fn", outs),
        ("float8_e4m3fn", (d, 3 * d)), ("float8_e4m3fn", (d, d)),
        ("float8_e4m3fn", (d, hidden)), ("float8_e4m3fn", (hidden, d)),
        ("float8_e5m2", (batch, length, 3 * d)), ("float8_e5m2", acts), ("float8_e5m2", outs),
    }  # fmt: skip
    assert float(fp8_loss) != float(plain_loss)
    assert float(fp8_loss) == pytest.approx(float(plain_loss), rel=0.02)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(grads))
    # outside the context the same model is bf16 again
    assert float(jax.jit(loss)(state.params)) == float(plain_loss)


def arithmetic_batch(step: int, vocab: int, batch: int = 16, length: int = 32) -> dict:
    """Rows of t -> 5t + 3 (mod vocab) from random starts: learnable from the previous token."""
    start = np.random.default_rng(step).integers(0, vocab, (batch, 1))
    ids = np.zeros((batch, length), np.int64)
    ids[:, :1] = start
    for t in range(1, length):
        ids[:, t] = (5 * ids[:, t - 1] + 3) % vocab
    return {"input_ids": jnp.asarray(ids, jnp.int32)}


def train_losses(cfg: ModelConfig, *, fp8_products: bool, steps: int, num_microbatches: int = 1) -> list[float]:
    mesh = build_mesh(ParallelismConfig())
    tx = optax.adamw(3e-3)
    state, model_def, shardings = create_train_state(cfg, tx, seed=0, mesh=mesh, rules=DEFAULT_RULES)
    step = make_train_step(model_def, tx, lambda _: jnp.asarray(3e-3), compute_dtype=jnp.bfloat16,
                           fp8_products=fp8_products, num_microbatches=num_microbatches)  # fmt: skip
    step = compile_train_step(step, shardings, batch_sharding(mesh), donate=False)
    losses = []
    for index in range(steps):
        state, metrics = step(state, arithmetic_batch(index, cfg.vocab_size))
        assert bool(metrics["applied"])
        losses.append(float(metrics["loss"]))
    return losses


def test_fp8_training_follows_bf16_training():
    """The same model, data and seed trained 25 steps in amp_bf16 and in amp_fp8: both learn the
    task, and the fp8 curve stays within a few percent of the bf16 one throughout. Recomputing
    the blocks in the backward pass (full remat, as the presets do) quantises the recomputed
    tensors to the same fp8 values, so the losses are identical; two microbatches agree within
    fp8 rounding (each microbatch is scaled by its own maxima)."""
    cfg = tiny_model()
    bf16 = train_losses(cfg, fp8_products=False, steps=25)
    fp8_run = train_losses(cfg, fp8_products=True, steps=25)
    assert bf16[-1] < 0.5 * bf16[0] and fp8_run[-1] < 0.5 * fp8_run[0]
    for b, f in zip(bf16, fp8_run):
        assert f == pytest.approx(b, rel=0.05, abs=0.05)
    assert train_losses(tiny_model(remat="full"), fp8_products=True, steps=3) == fp8_run[:3]
    micro = train_losses(cfg, fp8_products=True, steps=3, num_microbatches=2)
    assert micro != fp8_run[:3]
    np.testing.assert_allclose(micro, fp8_run[:3], rtol=0.02)


def test_fp8_needs_fp8_tensor_cores_on_gpus():
    a100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    with pytest.raises(ValueError, match=r"compute capability 8.9 or higher.*A100.*8\.0.*amp_bf16"):
        fp8.device_note(a100)
    for capability in ("8.9", "9.0", "10.0"):
        assert fp8.device_note(types.SimpleNamespace(platform="gpu", device_kind="x", compute_capability=capability)) is None
    note = fp8.device_note(types.SimpleNamespace(platform="cpu", device_kind="cpu"))
    assert "emulated" in note and "amp_bf16" in note
    assert "v4 to v6e" in fp8.device_note(types.SimpleNamespace(platform="tpu", device_kind="TPU v5p"))
    assert compiler_options("amp_fp8", "gpu") == {"xla_gpu_enable_triton_gemm": False}
    assert compiler_options("amp_fp8", "cpu") is None and compiler_options("amp_bf16", "gpu") is None


def test_a_gpu_run_says_how_many_fp8_gemms_its_step_compiled_to():
    """Printed once a GPU run's step is compiled: the count of cuBLASLt fp8 calls, or a warning that
    XLA kept every product in bf16 (the run would pay fp8's rounding for none of its speed)."""
    call = '%c = (bf16[8,8]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul$f8"\n'
    assert fp8.compiled_note(call * 3) == "amp_fp8: the compiled train step takes 3 fp8 GEMM calls"
    plain = call.replace("$f8", "")
    assert fp8.compiled_note(plain).startswith("warning: precision amp_fp8: the compiled train step has no fp8 GEMM")


def test_mfu_of_an_fp8_run_divides_by_the_fp8_peak_where_there_is_one():
    assert get_hardware("h100").peak_flops("amp_fp8") == 1979e12
    assert get_hardware("h100").peak_flops("amp_bf16") == 989e12
    assert get_hardware("a100-80gb").peak_flops("amp_fp8") == 312e12  # no fp8 units: the bf16 peak
    assert get_hardware("tpu-v5p").peak_kind("amp_fp8") == "bf16"


def test_quickstart_trains_in_amp_fp8_on_cpu_with_a_warning(tmp_path):
    """``--set precision=amp_fp8`` runs end to end here, says once that fp8 is emulated on this
    CPU, and its loss falls."""
    result = run(command(tmp_path, "precision=amp_fp8", "max_duration=6ba", "eval_interval=0",
                         "save_interval=0"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert output.count("warning: precision amp_fp8 on cpu") == 1, output[-2000:]
    losses = step_losses(tmp_path / "run")
    assert len(losses) == 6 and losses[6] < losses[1]

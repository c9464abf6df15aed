"""The CPU kernels (custom-VJP dense, tied output head, query-blocked causal attention) compute
the same values and gradients as the plain XLA formulation, and keep bf16 steps free of
float32-converted dots on CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain.config.schema import AttnConfig, ModelConfig
from jaxtrain.layers import attention, cpu_attention, cpu_kernels, lm_loss
from jaxtrain.models import build_model
from jaxtrain.parallel import platform

# (rtol relative to the largest magnitude) per compute dtype
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def assert_close(actual, expected, dtype):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = max(float(np.abs(expected).max()), 1e-6)
    assert float(np.abs(actual - expected).max()) / scale < TOLERANCE[dtype]


def values_and_grads(fn, *args, seed=7):
    """Output and the VJP of a fixed random cotangent, both as float32."""
    out, vjp = jax.vjp(lambda *a: fn(*a).astype(jnp.float32), *args)
    cotangent = jax.random.normal(jax.random.key(seed), out.shape, jnp.float32)
    return out, vjp(cotangent)


def randn(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_matches_einsum(dtype):
    x, kernel = randn(0, (3, 10, 24)), randn(1, (24, 40))

    def plain(x, kernel):
        return jnp.einsum("...i,io->...o", x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)

    fast_out, fast_grads = values_and_grads(jax.jit(lambda x, w: cpu_kernels.dense(x, w, dtype)), x, kernel)
    ref_out, ref_grads = values_and_grads(plain, x, kernel)
    assert_close(fast_out, ref_out, dtype)
    for fast, ref in zip(fast_grads, ref_grads):
        assert fast.dtype == jnp.float32
        assert_close(fast, ref, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tied_logits_match_einsum(dtype):
    x, table = randn(2, (2, 12, 16)), randn(3, (50, 16))

    def plain(x, table):
        return jnp.einsum("...d,vd->...v", x.astype(dtype), table.astype(dtype), preferred_element_type=jnp.float32)

    fast_out, fast_grads = values_and_grads(jax.jit(lambda x, t: cpu_kernels.tied_logits(x, t, dtype)), x, table)
    ref_out, ref_grads = values_and_grads(plain, x, table)
    assert_close(fast_out, ref_out, dtype)
    for fast, ref in zip(fast_grads, ref_grads):
        assert_close(fast, ref, dtype)


def plain_attention(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "use_cpu_kernels", lambda compute_dtype: False)
    return attention.dot_product_attention


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("alibi", [True, False], ids=["alibi", "no_alibi"])
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "sequence_id"])
def test_blocked_attention_matches_plain(monkeypatch, dtype, kv_heads, alibi, packed):
    batch, length, heads, head_dim = 2, 32, 4, 8
    q, k, v = randn(4, (batch, length, heads, head_dim)), randn(5, (batch, length, kv_heads, head_dim)), randn(
        6, (batch, length, kv_heads, head_dim)
    )
    slopes = jnp.asarray(attention.alibi_slopes(heads)) if alibi else None
    sequence_id = None
    if packed:  # documents of uneven lengths, one crossing a block boundary
        sequence_id = jnp.asarray([[0] * 5 + [1] * 14 + [2] * 13, [0] * 20 + [1] * 12], jnp.int32)
    options = dict(scale=head_dim**-0.5, slopes=slopes, sequence_id=sequence_id, compute_dtype=dtype)

    def fast(q, k, v):
        return cpu_attention.blocked_causal_attention(q, k, v, block_size=8, **options)

    fast_out, fast_grads = values_and_grads(jax.jit(fast), q, k, v)
    reference = plain_attention(monkeypatch)
    ref_out, ref_grads = values_and_grads(lambda q, k, v: reference(q, k, v, **options), q, k, v)
    assert_close(fast_out, ref_out, dtype)
    for fast_grad, ref_grad in zip(fast_grads, ref_grads):
        assert_close(fast_grad, ref_grad, dtype)


def test_block_size_defaults_divide_the_length():
    assert cpu_attention.default_block_size(512) == 128
    assert cpu_attention.default_block_size(96) == 96
    assert 200 % cpu_attention.default_block_size(200) == 0
    with pytest.raises(ValueError, match="must divide"):
        q = jnp.zeros((1, 12, 2, 4))
        cpu_attention.blocked_causal_attention(q, q, q, scale=1.0, block_size=5)


def test_kernels_only_for_bf16_and_fp32_on_cpu():
    on_cpu = jax.default_backend() == "cpu"
    assert cpu_kernels.use_cpu_kernels(jnp.bfloat16) == on_cpu and cpu_kernels.use_cpu_kernels(jnp.float32) == on_cpu
    assert not cpu_kernels.use_cpu_kernels(jnp.float16)
    for accelerator in ("gpu", "tpu"):
        with platform.compiling_for(accelerator):
            assert not cpu_kernels.use_cpu_kernels(jnp.bfloat16) and not cpu_kernels.use_cpu_kernels(jnp.float32)


def tiny_model(kv_heads=2, tied=True):
    cfg = ModelConfig(
        d_model=32, n_heads=4, n_layers=2, vocab_size=96, max_seq_len=32, tie_word_embeddings=tied,
        attn_config=AttnConfig(
            alibi=True, attn_uses_sequence_id=True,
            attn_type="grouped_query_attention" if kv_heads < 4 else "multihead_attention", kv_n_heads=kv_heads,
        ),
    )  # fmt: skip
    return build_model(cfg, rngs=nnx.Rngs(3))


def model_loss_and_grads(model, tokens, sequence_id, dtype):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens, compute_dtype=dtype, sequence_id=sequence_id)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, logits, jax.tree.leaves(grads)


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    return float(np.abs(actual - expected).max()) / max(float(np.abs(expected).max()), 1e-6)


@pytest.mark.parametrize("kv_heads,tied", [(4, True), (2, False)], ids=["mha_tied", "gqa_untied"])
def test_model_logits_and_gradients_match_plain_path(monkeypatch, kv_heads, tied):
    """bf16 with the kernels is as close to the float32 model as plain bf16 is (ALiBi, packed docs)."""
    model = tiny_model(kv_heads, tied)
    tokens = jax.random.randint(jax.random.key(9), (2, 32), 0, 96, dtype=jnp.int32)
    sequence_id = jnp.asarray([[0] * 10 + [1] * 22, [0] * 32], jnp.int32)
    monkeypatch.setattr(cpu_kernels, "use_cpu_kernels", lambda compute_dtype: True)
    fast = model_loss_and_grads(model, tokens, sequence_id, jnp.bfloat16)
    fast_fp32 = model_loss_and_grads(model, tokens, sequence_id, jnp.float32)  # kernels forced on in fp32 too
    monkeypatch.setattr(cpu_kernels, "use_cpu_kernels", lambda compute_dtype: False)
    plain = model_loss_and_grads(model, tokens, sequence_id, jnp.bfloat16)
    exact = model_loss_and_grads(model, tokens, sequence_id, jnp.float32)
    np.testing.assert_allclose(float(fast_fp32[0]), float(exact[0]), rtol=1e-6)
    assert_close(fast_fp32[1], exact[1], jnp.float32)
    for fast_grad, exact_grad in zip(fast_fp32[2], exact[2]):
        assert_close(fast_grad, exact_grad, jnp.float32)
    np.testing.assert_allclose(float(fast[0]), float(exact[0]), rtol=1e-2)
    assert relative_error(fast[1], exact[1]) <= 2 * relative_error(plain[1], exact[1]) + 1e-3
    for fast_grad, plain_grad, exact_grad in zip(fast[2], plain[2], exact[2]):
        assert fast_grad.dtype == jnp.float32
        assert relative_error(fast_grad, exact_grad) <= 2 * relative_error(plain_grad, exact_grad) + 5e-3


@pytest.mark.parametrize("target", ["cpu", "gpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_cross_entropy_matches_full_logits(dtype, tied, target):
    """The fused head + loss equals logits -> cross_entropy_sum, with z-loss, a logit scale and
    ignored targets, in the CPU and the accelerator formulations."""
    batch, length, d_model, vocab = 2, 24, 32, 300
    x = randn(0, (batch, length, d_model))
    weight = randn(1, (vocab, d_model) if tied else (d_model, vocab)) * 0.2
    targets = jax.random.randint(jax.random.key(2), (batch, length), 0, vocab).at[0, 3].set(-100).at[1, -1].set(-100)

    def full(x, weight):
        logits = jnp.einsum("bld,vd->blv" if tied else "bld,dv->blv", x.astype(dtype), weight.astype(dtype),
                            preferred_element_type=jnp.float32) * 1.5
        loss, z, count = lm_loss.cross_entropy_sum(logits, targets, 1e-3)
        return 0.7 * loss + 2.0 * z, (loss, z, count)

    def fused(x, weight):
        loss, z, count = lm_loss.chunked_cross_entropy(x, weight, targets, tied=tied, compute_dtype=dtype, z_loss=1e-3,
                                                       logit_scale=1.5, chunk=6)
        return 0.7 * loss + 2.0 * z, (loss, z, count)

    (_, expected), expected_grads = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(x, weight)
    with platform.compiling_for(target):
        (_, actual), actual_grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(x, weight)
    assert float(actual[2]) == float(expected[2]) == batch * length - 2
    np.testing.assert_allclose(float(actual[0]), float(expected[0]), rtol=1e-5)
    np.testing.assert_allclose(float(actual[1]), float(expected[1]), rtol=1e-5)
    for actual_grad, expected_grad in zip(actual_grads, expected_grads):
        assert actual_grad.shape == expected_grad.shape
        assert_close(actual_grad, expected_grad, dtype)


def test_chunk_length_fits_the_budget():
    assert lm_loss.chunk_length(8, 512, 50432) == 16  # 8 x 16 x 50432 x 4 B = 26 MB; 32 would be 52 MB
    assert lm_loss.chunk_length(1, 7, 10) == 7
    assert lm_loss.chunk_length(64, 2048, 256000) == 1
    # on accelerators 512 MiB of float32 logits per chunk: 8 x 256 x 50432 x 4 B = 413 MB
    with platform.compiling_for("gpu"):
        assert lm_loss.default_chunk_length(8, 2048, 50432) == 256
    assert lm_loss.default_chunk_length(8, 512, 50432) == 16


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_model_fused_loss_matches_logits_path(tied):
    """``lm_loss`` with the fused head gives the loss and gradients of the logits path (bf16)."""
    model = tiny_model(kv_heads=2, tied=tied)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(9), (2, 32), 0, 96, dtype=jnp.int32)
    targets = jnp.concatenate([tokens[:, 1:], jnp.full((2, 1), -100, jnp.int32)], axis=1)

    def loss(params, fused):
        loss_sum, _, count = nnx.merge(graphdef, params).lm_loss(tokens, targets, compute_dtype=jnp.bfloat16,
                                                                 z_loss=1e-4, fused=fused)
        return loss_sum / count

    fused_value, fused_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, True)))(params)
    plain_value, plain_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, False)))(params)
    np.testing.assert_allclose(float(fused_value), float(plain_value), rtol=1e-3)
    for fused_grad, plain_grad in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(plain_grads)):
        assert relative_error(fused_grad, plain_grad) < 2e-2


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU dot forms")
def test_bf16_gradient_has_no_float32_dots():
    model = tiny_model(kv_heads=2, tied=True)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.zeros((2, 32), jnp.int32)

    def loss(params):
        logits_sum = nnx.merge(graphdef, params)(tokens, compute_dtype=jnp.bfloat16).sum()
        loss_sum, _, _ = nnx.merge(graphdef, params).lm_loss(tokens, tokens, compute_dtype=jnp.bfloat16)
        return logits_sum + loss_sum

    text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    # name -> (dtype, number of dimensions longer than 1)
    types = {name: (dtype, sum(int(d) > 1 for d in dims.split(",") if d))
             for name, dtype, dims in re.findall(r"%(\S+) = (\w+)\[([\d,]*)\]", text)}  # fmt: skip
    dots = re.findall(r"= \w+\[[\d,]*\]\S* dot\(%([^,\s]+), %([^)\s]+)\)", text)
    # LayerNorm's row sums are float32 matrix-vector products (memory-bound, no converted operand)
    matmuls = [(lhs, rhs) for lhs, rhs in dots if min(types[lhs][1], types[rhs][1]) > 1]
    assert matmuls
    operand_dtypes = {(types[lhs][0], types[rhs][0]) for lhs, rhs in matmuls}
    assert operand_dtypes == {("bf16", "bf16")}, operand_dtypes


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_accelerator_head_takes_its_backward_products_in_bf16(tied):
    """Off the CPU kernels, the output head's forward and both backward products of a bf16 step
    compute in bf16: the forward from bf16 operands, the backward ones from float32 operands that
    a ``BF16_BF16_F32`` algorithm rounds as it loads them (so the float32 gradient needs no bf16
    copy beside the logits). Plain autodiff takes them in float32: the TF32 rate on GPUs."""
    model = tiny_model(kv_heads=2, tied=tied)  # vocab 96: no other dimension of that size
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.zeros((2, 32), jnp.int32)

    def loss(params):
        return nnx.merge(graphdef, params).lm_loss(tokens, tokens, compute_dtype=jnp.bfloat16)[0]

    with platform.compiling_for("gpu"):
        text = jax.jit(jax.grad(loss)).lower(params).as_text()
    head = []
    for line in text.splitlines():
        found = re.search(r"stablehlo\.dot_general .*: \(tensor<([\dx]+)x(\w+)>, tensor<([\dx]+)x(\w+)>\)", line)
        if found and "96" in found.group(1).split("x") + found.group(3).split("x"):
            rounded = re.search(r"lhs_precision_type = (\w+), rhs_precision_type = (\w+)", line)
            head.append(rounded.groups() if rounded else (found.group(2), found.group(4)))
    assert len(head) == 3 and set(head) == {("bf16", "bf16")}, head


def test_one_pass_logsumexp_equals_logsumexp():
    """Rows of every scale, a row of -inf (an all-masked row), +inf and NaN entries."""
    x = jnp.concatenate([randn(40, (3, 1000)) * scale for scale in (1e-3, 1.0, 80.0)])
    x = x.at[0].set(-jnp.inf).at[1, 7].set(jnp.inf).at[2, 11].set(jnp.nan)
    np.testing.assert_allclose(np.asarray(jax.jit(lm_loss.logsumexp_one_pass)(x)),
                               np.asarray(jax.nn.logsumexp(x, axis=-1)), rtol=2e-6)  # fmt: skip


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_head_logits_round_the_logits_gradient_to_the_compute_dtype(tied):
    """The head's backward products are those of the logits gradient rounded to the compute
    dtype (PyTorch autocast's numerics; XLA:CPU, which ignores the rounding algorithm, agrees
    within that rounding), and a float32 head keeps full precision."""
    x, weight = randn(30, (2, 6, 16)), randn(31, (40, 16) if tied else (16, 40)) * 0.3
    g = randn(32, (2, 6, 40))
    for dtype in (jnp.bfloat16, jnp.float32):
        logits, vjp = jax.vjp(lambda x, w: lm_loss.head_logits(x, w, tied=tied, compute_dtype=dtype), x, weight)
        d_x, d_w = vjp(g)
        x_c, w_c, g_c = (a.astype(dtype).astype(jnp.float32) for a in (x, weight, g))
        w_dv = w_c.T if tied else w_c
        assert logits.dtype == jnp.float32
        assert_close(logits, jnp.einsum("bld,dv->blv", x_c, w_dv), jnp.float32)
        exact_d_x = jnp.einsum("blv,dv->bld", g_c, w_dv).astype(dtype)
        exact_d_w = jnp.einsum("bld,blv->dv", x_c, g_c)
        exact_d_w = (exact_d_w.T if tied else exact_d_w).astype(dtype)
        assert d_x.dtype == d_w.dtype == jnp.float32
        assert_close(d_x, exact_d_x, dtype)
        assert_close(d_w, exact_d_w, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_kernel_matches_exact_gelu(dtype):
    x = (randn(10, (4, 64)) * 3).astype(dtype)
    fast_out, (fast_grad,) = values_and_grads(jax.jit(cpu_kernels.gelu), x)
    ref_out, (ref_grad,) = values_and_grads(lambda x: jax.nn.gelu(x, approximate=False), x)
    assert fast_out.dtype == ref_out.dtype and fast_grad.dtype == dtype
    assert_close(fast_out, ref_out, dtype)
    assert_close(fast_grad, ref_grad, dtype)


@pytest.mark.parametrize("in_dtype,out_dtype", [(jnp.float32, jnp.float32), (jnp.float32, jnp.bfloat16),
                                                (jnp.bfloat16, jnp.bfloat16)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_layer_norm_kernel_matches_reference(in_dtype, out_dtype, with_bias):
    x = (randn(11, (2, 6, 48)) * 2 + 0.5).astype(in_dtype)
    scale, bias = 1 + 0.1 * randn(12, (48,)), (0.1 * randn(13, (48,)) if with_bias else None)

    def reference(x, scale, *bias):
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + 1e-5) * scale
        return (y + bias[0] if bias else y).astype(out_dtype)

    def fast(x, scale, *bias):
        return cpu_kernels.layer_norm(x, scale, bias[0] if bias else None, 1e-5, out_dtype)

    args = (x, scale) + ((bias,) if with_bias else ())
    fast_out, fast_grads = values_and_grads(jax.jit(fast), *args)
    ref_out, ref_grads = values_and_grads(reference, *args)
    assert_close(fast_out, ref_out, out_dtype)
    for fast_grad, ref_grad, arg in zip(fast_grads, ref_grads, args):
        assert fast_grad.dtype == arg.dtype
        assert_close(fast_grad, ref_grad, out_dtype)


def test_dense_bf16_output_is_the_rounded_float32_output():
    x, kernel = randn(14, (3, 16, 64)), randn(15, (64, 96))
    wide = jax.jit(lambda x, w: cpu_kernels.dense(x, w, jnp.bfloat16))(x, kernel)
    narrow = jax.jit(lambda x, w: cpu_kernels.dense(x, w, jnp.bfloat16, out_dtype=jnp.bfloat16))(x, kernel)
    assert narrow.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(narrow, np.float32), np.asarray(wide.astype(jnp.bfloat16), np.float32))
    grads = jax.jit(jax.grad(lambda x, w: cpu_kernels.dense(x, w, jnp.bfloat16, jnp.bfloat16).astype(jnp.float32).sum(),
                             argnums=(0, 1)))(x.astype(jnp.bfloat16), kernel)  # fmt: skip
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.float32


def test_cast_to_bf16_equals_astype_for_every_kind_of_value():
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 3.4028235e38, -3.4028235e38, 1e-40, -1e-45, 0.0, -0.0,
                        1.0, 1.00390625, 1.01171875, 65504.0, 3.0e-39], np.float32)
    payload_nans = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FBFFFFF], np.uint32).view(np.float32)
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = jnp.asarray(np.concatenate([special, payload_nans, random_bits, rng.standard_normal(1000).astype(np.float32)]))
    fast = np.asarray(jax.jit(lambda v: cpu_kernels.cast(v, jnp.bfloat16))(x)).view(np.uint16)
    plain = np.asarray(x.astype(jnp.bfloat16)).view(np.uint16)
    nan = np.isnan(np.asarray(x))
    np.testing.assert_array_equal(fast[~nan], plain[~nan])
    assert np.isnan(np.asarray(jax.jit(lambda v: cpu_kernels.cast(v, jnp.bfloat16))(x), np.float32)[nan]).all()
    assert cpu_kernels.cast(x, jnp.float32) is x or cpu_kernels.cast(x, jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize("shape", [(40, 24), (3, 40, 24), (2, 3, 8, 600), (3, 7, 5)],
                         ids=["2d", "batched", "wide", "odd"])
def test_transposed_copy_is_exact(shape):
    x = randn(16, shape).astype(jnp.bfloat16)
    out = jax.jit(cpu_kernels.transposed_copy)(x)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(jnp.swapaxes(x, -1, -2), np.float32))
    # non-finite values move like any other
    bad = x.at[..., 0, 1].set(jnp.inf).at[..., 2, 0].set(jnp.nan)
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_kernels.transposed_copy)(bad), np.float32),
                                  np.swapaxes(np.asarray(bad, np.float32), -1, -2))


@pytest.mark.parametrize("features", [(24, 80), (80, 24)], ids=["narrow_in", "wide_in"])
def test_weight_grad_matches_einsum(features):
    x, dy = randn(17, (30, features[0])).astype(jnp.bfloat16), randn(18, (30, features[1])).astype(jnp.bfloat16)
    fast = jax.jit(cpu_kernels.weight_grad)(x, dy)
    expected = jnp.einsum("mi,mo->io", x, dy, preferred_element_type=jnp.float32)
    assert fast.shape == expected.shape and fast.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(fast), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_unrolled_layer_scan_equals_the_loop():
    """``scan_unroll`` changes how the stacked blocks are compiled, not what they compute; ``auto``
    picks by platform, depth and remat."""
    cfg = ModelConfig(d_model=32, n_heads=4, n_layers=3, vocab_size=96, max_seq_len=32,
                      attn_config=AttnConfig(alibi=True), scan_layers=True)  # fmt: skip
    tokens = jax.random.randint(jax.random.key(9), (2, 32), 0, 96, dtype=jnp.int32)
    sequence_id = jnp.zeros((2, 32), jnp.int32)
    results = {}
    for unroll in (1, 2, 3):
        cfg.scan_unroll = unroll
        model = build_model(cfg, rngs=nnx.Rngs(3))
        assert model._scan_unroll() == unroll
        results[unroll] = model_loss_and_grads(model, tokens, sequence_id, jnp.float32)
    for unroll in (2, 3):
        np.testing.assert_allclose(float(results[unroll][0]), float(results[1][0]), rtol=1e-6)
        assert_close(results[unroll][1], results[1][1], jnp.float32)
        for grad, loop_grad in zip(results[unroll][2], results[1][2]):
            assert_close(grad, loop_grad, jnp.float32)
    cfg.scan_unroll = "auto"
    auto = {}
    for platform_name in ("cpu", "gpu", "tpu"):
        for layers, remat in ((3, "none"), (24, "none"), (24, "full"), (24, "dots_saveable"), (64, "none")):
            cfg.n_layers, cfg.remat = layers, remat
            with platform.compiling_for(platform_name):
                abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(3)))
                auto[platform_name, layers, remat] = abstract._scan_unroll()
    assert auto == {
        ("cpu", 3, "none"): 3, ("cpu", 24, "none"): 1, ("cpu", 24, "full"): 1, ("cpu", 24, "dots_saveable"): 1,
        ("cpu", 64, "none"): 1,
        ("gpu", 3, "none"): 3, ("gpu", 24, "none"): 24, ("gpu", 24, "full"): 1, ("gpu", 24, "dots_saveable"): 24,
        ("gpu", 64, "none"): 1,
        ("tpu", 3, "none"): 3, ("tpu", 24, "none"): 24, ("tpu", 24, "full"): 1, ("tpu", 24, "dots_saveable"): 24,
        ("tpu", 64, "none"): 1,
    }  # fmt: skip


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("scale,z_loss", [(None, 0.0), (0.5, 1e-3)], ids=["plain", "scaled_zloss"])
def test_head_cross_entropy_matches_logits_then_loss(tied, scale, z_loss):
    """The CPU path's head + loss with one written-out gradient equals head -> cross_entropy_sum
    (values and gradients, ignored targets included), in float32 exactly and in bf16 within rounding."""
    batch, length, d_model, vocab = 2, 12, 16, 40
    x = randn(1, (batch, length, d_model))
    weight = randn(2, (vocab, d_model) if tied else (d_model, vocab)) * 0.3
    targets = jax.random.randint(jax.random.key(3), (batch, length), 0, vocab, dtype=jnp.int32)
    targets = targets.at[0, :3].set(lm_loss.IGNORE_INDEX)

    def reference(x, weight, dtype):
        equation = "bld,vd->blv" if tied else "bld,dv->blv"
        logits = jnp.einsum(equation, x.astype(dtype), weight.astype(dtype), preferred_element_type=jnp.float32)
        logits = logits if scale is None else logits * scale
        loss, z, _ = lm_loss.cross_entropy_sum(logits, targets, z_loss)
        return loss + 3.0 * z  # distinct cotangents for the two sums

    def fused(x, weight, dtype):
        loss, z, _ = lm_loss.head_cross_entropy(x, weight, targets, tied=tied, compute_dtype=dtype,
                                                z_loss=z_loss, logit_scale=scale)  # fmt: skip
        return loss + 3.0 * z

    count = lm_loss.head_cross_entropy(x, weight, targets, tied=tied)[2]
    assert float(count) == batch * length - 3
    for dtype, rtol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
        expected, expected_grads = jax.value_and_grad(reference, argnums=(0, 1))(x, weight, dtype)
        actual, actual_grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)), static_argnums=2)(x, weight, dtype)
        np.testing.assert_allclose(float(actual), float(expected), rtol=rtol)
        for got, want in zip(actual_grads, expected_grads):
            assert got.shape == want.shape and got.dtype == want.dtype
            assert relative_error(got, want) < rtol


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_separate_qkv_products_equal_the_fused_projection(dtype, kv_heads):
    """Off the CPU kernels Q, K and V come from three products with slices of ``Wqkv`` (no
    copies out of one [.., d + 2·kv] tensor); a clip, which needs the fused tensor, takes the
    fused path, and a clip too wide to bite must give the same values and gradients."""
    def build(clip):
        return attention.MPTAttention(
            d_model=32, n_heads=4, kv_n_heads=kv_heads, use_bias=False, clip_qkv=clip, qk_ln=False,
            norm_type="low_precision_layernorm", norm_eps=1e-5, softmax_scale=None, attn_pdrop=0.0,
            in_std=0.2, out_std=0.2, rngs=nnx.Rngs(5),
        )  # fmt: skip

    x = randn(4, (2, 16, 32))
    slopes = jnp.asarray(attention.alibi_slopes(4))
    with platform.compiling_for("gpu"):  # the accelerator formulation, run here by XLA
        results = []
        for clip in (None, 1e9):
            graphdef, params = nnx.split(build(clip), nnx.Param)
            run = lambda p, x: nnx.merge(graphdef, p)(x, slopes=slopes, compute_dtype=dtype).astype(jnp.float32)  # noqa: E731
            results.append(values_and_grads(jax.jit(run), params, x))
    (split_out, split_grads), (fused_out, fused_grads) = results
    assert_close(split_out, fused_out, dtype)
    for a, b in zip(jax.tree.leaves(split_grads), jax.tree.leaves(fused_grads)):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("target", ["cpu", "gpu"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_softmax_cross_entropy_gradient_equals_autodiff(z_loss, target):
    """The accelerator path's loss writes its logits gradient out in one pass (and off the CPU
    takes log Z in one read of the logits); values and gradients equal autodiff of the
    reference, ignored targets and z-loss included."""
    logits = randn(21, (2, 12, 37)) * 4
    targets = jax.random.randint(jax.random.key(22), (2, 12), 0, 37).at[0, 3].set(lm_loss.IGNORE_INDEX).at[1, :4].set(
        lm_loss.IGNORE_INDEX)

    def weighted(fn):
        return lambda logits: (lambda out: 1.7 * out[0] + 0.4 * out[1])(fn(logits, targets, z_loss))

    with platform.compiling_for(target):
        fast_out = jax.jit(lm_loss.softmax_cross_entropy_sum, static_argnums=2)(logits, targets, z_loss)
        fast_grad = jax.jit(jax.grad(weighted(lm_loss.softmax_cross_entropy_sum)))(logits)
    for fast, ref in zip(fast_out, lm_loss.cross_entropy_sum(logits, targets, z_loss)):
        np.testing.assert_allclose(float(fast), float(ref), rtol=1e-6)
    ref_grad = jax.grad(weighted(lm_loss.cross_entropy_sum))(logits)
    np.testing.assert_allclose(np.asarray(fast_grad), np.asarray(ref_grad), atol=2e-6)
    assert float(jnp.abs(fast_grad[1, :4]).max()) == 0.0  # ignored positions get no gradient

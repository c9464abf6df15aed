"""The GPU and TPU paths, checked on the CPU: what the accelerator dense, GELU and head compute,
how ALiBi reaches cuDNN's attention (as a bias, in the kernel, or in extra key dimensions), the
probes that pick among them, and that ``compiling_for`` selects each platform's kernels."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_fast_paths import assert_close, full_float32_matmuls, randn, relative_error, values_and_grads  # noqa: F401

from jaxtrain.layers import attention, cpu_kernels, gpu_kernels, mlp
from jaxtrain.layers.linear import Dense
from jaxtrain.parallel import platform


def test_accelerator_dense_rounds_once_and_saves_bf16_for_remat():
    """Off the CPU kernels a bias-free bf16 Dense is one dot with a bf16 result (float32
    accumulation inside), so ``dots_saveable`` keeps bf16 products, not float32 ones."""
    dense = Dense(24, 40, use_bias=False, kernel_std=0.2, axes=(None, None), rngs=nnx.Rngs(0))
    x = randn(0, (3, 10, 24)).astype(jnp.bfloat16)
    with platform.compiling_for("gpu"):
        out = jax.jit(lambda x: dense(x, compute_dtype=jnp.bfloat16))(x)
        step = jax.checkpoint(lambda x: jnp.tanh(dense(x, compute_dtype=jnp.bfloat16)).sum(),
                              policy=jax.checkpoint_policies.dots_saveable)  # fmt: skip
        residuals = jax.tree.leaves(jax.vjp(step, x)[1])
    exact = jnp.einsum("...i,io->...o", x.astype(jnp.float32), dense.kernel[...].astype(jnp.bfloat16).astype(jnp.float32))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(exact.astype(jnp.bfloat16), np.float32))
    saved = [leaf for leaf in residuals if getattr(leaf, "shape", None) == (3, 10, 40)]
    assert saved and all(leaf.dtype == jnp.bfloat16 for leaf in saved)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_accelerator_gelu_has_the_autodiff_gradient(dtype):
    """Off the CPU kernels, GELU is jax.nn.gelu with a written-out gradient saving only its input."""
    x = (randn(11, (4, 64)) * 3).astype(dtype)
    out, (grad,) = values_and_grads(jax.jit(mlp._gelu), x)
    ref_out, (ref_grad,) = values_and_grads(jax.jit(lambda x: jax.nn.gelu(x, approximate=False)), x)
    # the same values (jax 0.11's XLA rounds a few float32 outputs a bit or two apart across the custom_vjp)
    np.testing.assert_array_max_ulp(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), maxulp=2)
    assert grad.dtype == dtype
    assert_close(grad, ref_grad, dtype)
    _, (exact,) = values_and_grads(lambda x: jax.nn.gelu(x, approximate=False), x.astype(jnp.float32))
    assert relative_error(grad, exact) <= relative_error(ref_grad, exact) + 1e-6  # no worse than autodiff
    residuals = jax.tree.leaves(jax.vjp(mlp._gelu, x)[1])
    assert [leaf.shape for leaf in residuals] == [x.shape]
    with platform.compiling_for("gpu"):
        assert "custom_vjp_call" in str(jax.make_jaxpr(mlp.exact_gelu)(x))


@pytest.mark.parametrize("packed", [False, True], ids=["alibi", "alibi_packed"])
def test_cudnn_attention_hands_alibi_over_as_a_constant_bias(monkeypatch, packed):
    """The ALiBi bias reaches cuDNN through JAX's own bias-and-mask combiner (so no bias gradient
    is computed); checked here with a stand-in for the cuDNN call that, like JAX's, builds its
    additive bias with that combiner, then runs XLA's attention."""
    real_attention = jax.nn.dot_product_attention
    calls = []

    def stand_in(q, k, v, bias=None, mask=None, *, scale, is_causal, implementation, combine=True):
        calls.append((bias is None, mask is None))
        if combine:
            bias, mask = gpu_kernels._cudnn_fused.combine_bias_and_mask(bias, mask, q.dtype), None
        return real_attention(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal, implementation="xla")

    b, length, heads, kv_heads, head_dim = 2, 16, 4, 2, 8
    q, k, v = randn(1, (b, length, heads, head_dim)), randn(2, (b, length, kv_heads, head_dim)), randn(3, (b, length, kv_heads, head_dim))
    slopes = jnp.asarray(attention.alibi_slopes(heads))
    sequence_id = jnp.asarray([[0] * 5 + [1] * 11, [0] * 16], jnp.int32) if packed else None
    opts = dict(scale=head_dim**-0.5, slopes=slopes, sequence_id=sequence_id, compute_dtype=jnp.bfloat16)
    expected = attention.dot_product_attention(q, k, v, **opts)
    combiner = gpu_kernels._cudnn_fused.combine_bias_and_mask
    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    out = gpu_kernels.cudnn_attention(q, k, v, **opts)
    assert calls == [(True, True)]  # neither bias nor mask passed as arguments
    assert gpu_kernels._cudnn_fused.combine_bias_and_mask is combiner
    assert_close(out, expected, jnp.bfloat16)

    # a JAX that builds no bias with the combiner gets the bias as an argument instead
    calls.clear()
    monkeypatch.setattr(jax.nn, "dot_product_attention", functools.partial(stand_in, combine=False))
    out = gpu_kernels.cudnn_attention(q, k, v, **opts)
    assert calls == [(True, True), (False, not packed)]
    assert_close(out, expected, jnp.bfloat16)


def _cudnn_score_mod_stand_in(q, k, v, bias=None, mask=None, *, scale, mask_type, score_mod=None,
                              score_mod_args=(), ignore_score_mod=False):
    """JAX's cuDNN entry point as documented, in XLA: scaled scores, then ``score_mod``, then the
    causal and boolean masks, softmax. ``ignore_score_mod`` plays a broken kernel."""
    assert bias is None and mask_type == gpu_kernels._cudnn_fused.MaskType.CAUSAL
    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(a, group, axis=2) for a in (k, v))
    scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if score_mod is not None and not ignore_score_mod:
        scores = score_mod(scores, *score_mod_args)
    length = q.shape[1]
    visible = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if mask is not None:
        visible = visible & mask
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", probs.astype(q.dtype), v).astype(q.dtype)


@pytest.mark.parametrize("packed", [False, True], ids=["alibi", "alibi_packed"])
def test_in_kernel_alibi_equals_the_bias_form(monkeypatch, packed):
    """ALiBi as cuDNN's ``score_mod`` (no bias tensor) gives the reference attention's values and
    gradients, GQA and packed documents included, through a stand-in for the cuDNN call."""
    monkeypatch.setattr(gpu_kernels._cudnn_fused, "dot_product_attention", _cudnn_score_mod_stand_in)
    monkeypatch.setenv(gpu_kernels.ALIBI_ENV, "score_mod")
    b, length, heads, kv_heads, head_dim = 2, 16, 4, 2, 8
    q, k, v = randn(1, (b, length, heads, head_dim)), randn(2, (b, length, kv_heads, head_dim)), randn(3, (b, length, kv_heads, head_dim))
    sequence_id = jnp.asarray([[0] * 5 + [1] * 11, [0] * 16], jnp.int32) if packed else None
    opts = dict(scale=head_dim**-0.5, slopes=jnp.asarray(attention.alibi_slopes(heads)), sequence_id=sequence_id,
                compute_dtype=jnp.float32)
    out, grads = values_and_grads(lambda *a: gpu_kernels.cudnn_attention(*a, **opts), q, k, v)
    ref, ref_grads = values_and_grads(lambda *a: attention.dot_product_attention(*a, **opts), q, k, v)
    assert_close(out, ref, jnp.float32)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, jnp.float32)
    calls = []
    monkeypatch.setattr(gpu_kernels._cudnn_fused, "dot_product_attention",
                        lambda *a, **kw: calls.append(kw) or _cudnn_score_mod_stand_in(*a, **kw))  # fmt: skip
    gpu_kernels.cudnn_attention(q, k, v, **opts)
    assert [(kw["score_mod"], kw.get("bias")) for kw in calls] == [(gpu_kernels.alibi_score_mod, None)]

    # a kernel that turns score_mod down at trace time: the constant-bias form takes over
    def refuses(*args, **kwargs):
        raise NotImplementedError("score_mod (flex attention) requires a GPU with at least Hopper architecture.")

    monkeypatch.setattr(gpu_kernels._cudnn_fused, "dot_product_attention", refuses)
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda q, k, v, bias=None, mask=None, **kw:
                        attention.dot_product_attention(q, k, v, **opts))  # fmt: skip
    assert_close(gpu_kernels.cudnn_attention(q, k, v, **opts), ref, jnp.float32)


def test_alibi_mode_keeps_small_biases_and_probes_before_going_in_kernel(monkeypatch):
    monkeypatch.delenv(gpu_kernels.ALIBI_ENV, raising=False)
    small, large = 2048, 16384  # 16 heads: 128 MiB and 8 GiB of bf16 bias
    assert gpu_kernels.alibi_mode(16, small, jnp.bfloat16) == "bias"
    assert gpu_kernels.alibi_mode(16, large, jnp.bfloat16) == "bias"  # no GPU in this process to probe
    probed = []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(gpu_kernels, "score_mod_probe", lambda kind: probed.append(kind) or True)
    assert gpu_kernels.alibi_mode(16, small, jnp.bfloat16) == "bias" and not probed
    assert gpu_kernels.alibi_mode(16, large, jnp.bfloat16) == "score_mod" and len(probed) == 1
    monkeypatch.setattr(gpu_kernels, "score_mod_probe", lambda kind: False)  # then ALiBi in key dimensions
    monkeypatch.setattr(gpu_kernels, "key_dims_probe", lambda kind: probed.append(kind) or True)
    assert gpu_kernels.alibi_mode(16, large, jnp.bfloat16) == "key_dims" and len(probed) == 2
    monkeypatch.setattr(gpu_kernels, "key_dims_probe", lambda kind: False)
    assert gpu_kernels.alibi_mode(16, large, jnp.bfloat16) == "bias"
    monkeypatch.setenv(gpu_kernels.ALIBI_ENV, "score_mod")
    assert gpu_kernels.alibi_mode(16, small, jnp.bfloat16) == "score_mod"
    monkeypatch.setenv(gpu_kernels.ALIBI_ENV, "flash")
    with pytest.raises(ValueError, match="JAXTRAIN_CUDNN_ALIBI='flash'; use one of auto, bias, score_mod, key_dims"):
        gpu_kernels.alibi_mode(16, small, jnp.bfloat16)


def test_in_kernel_alibi_probe_accepts_a_working_kernel_only(monkeypatch):
    """The probe compares against XLA: it passes a correct kernel and turns down one that drops
    the score modification or raises, even when first asked inside a trace."""
    for stand_in, expected in [
        (_cudnn_score_mod_stand_in, True),
        (functools.partial(_cudnn_score_mod_stand_in, ignore_score_mod=True), False),
        (lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("no cuDNN graph")), False),
    ]:
        monkeypatch.setattr(gpu_kernels._cudnn_fused, "dot_product_attention", stand_in)
        gpu_kernels.score_mod_probe.cache_clear()
        results = []
        jax.jit(lambda x: results.append(gpu_kernels.score_mod_probe("stand-in")) or x)(jnp.zeros(()))
        assert results == [expected]
    gpu_kernels.score_mod_probe.cache_clear()


def _cudnn_as_xla(calls):
    """``jax.nn.dot_product_attention`` with ``implementation="cudnn"`` run by XLA, recording each
    call's head size and whether a bias went in."""
    real = jax.nn.dot_product_attention

    def stand_in(q, k, v, bias=None, mask=None, *, implementation=None, **kwargs):
        calls.append((q.shape[-1], k.shape[-1], v.shape[-1], bias is None))
        return real(q, k, v, bias=bias, mask=mask, implementation="xla", **kwargs)

    return stand_in


@pytest.mark.parametrize("packed", [False, True], ids=["alibi", "alibi_packed"])
def test_alibi_in_key_dimensions_equals_the_bias_form(monkeypatch, packed):
    """ALiBi as extra query and key dimensions (no bias tensor, no score_mod) gives the reference
    attention's values and gradients, GQA and packed documents included; the head size is padded
    to a multiple of 8 and the call carries no bias."""
    calls = []
    monkeypatch.setattr(jax.nn, "dot_product_attention", _cudnn_as_xla(calls))
    monkeypatch.setenv(gpu_kernels.ALIBI_ENV, "key_dims")
    b, length, heads, kv_heads, head_dim = 2, 16, 4, 2, 8
    q, k, v = randn(1, (b, length, heads, head_dim)), randn(2, (b, length, kv_heads, head_dim)), randn(3, (b, length, kv_heads, head_dim))
    sequence_id = jnp.asarray([[0] * 5 + [1] * 11, [0] * 16], jnp.int32) if packed else None
    for dtype in (jnp.float32, jnp.bfloat16):
        opts = dict(scale=head_dim**-0.5, slopes=jnp.asarray(attention.alibi_slopes(heads)), sequence_id=sequence_id,
                    compute_dtype=dtype)  # fmt: skip
        out, grads = values_and_grads(lambda *a: gpu_kernels.cudnn_attention(*a, **opts), q, k, v)
        ref, ref_grads = values_and_grads(lambda *a: attention.dot_product_attention(*a, **opts), q, k, v)
        assert out.shape == ref.shape
        assert_close(out, ref, dtype)
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, dtype)
    assert set(calls) == {(16, 16, 16, True)}  # 8 + 2 ALiBi columns, padded to 16; no bias


def test_alibi_key_columns_give_slope_times_position_exactly_enough():
    """The extra columns' product is ``slope·j/scale`` to float32 accuracy (high and low bf16
    parts against exact position digits), past 65,536 tokens too (three digits)."""
    slopes = jnp.asarray(attention.alibi_slopes(12))  # 12 heads: slopes that are not powers of two
    scale = 96**-0.5
    for length, columns in [(200, 2), (4096, 4), (70_000, 6)]:
        query_columns, key_columns = gpu_kernels.alibi_key_columns(slopes, length, scale, jnp.bfloat16)
        assert query_columns.shape == (12, columns) and key_columns.shape == (length, columns)
        got = (query_columns.astype(jnp.float32) @ key_columns.astype(jnp.float32).T) * scale
        want = np.asarray(slopes, np.float64)[:, None] * np.arange(length)[None]
        assert np.max(np.abs(np.asarray(got, np.float64) - want) / np.maximum(want, 1e-3)) < 1e-5
    with pytest.raises(ValueError, match="needs bf16 past 65536 tokens in fp16"):
        gpu_kernels.alibi_key_columns(slopes, 70_000, scale, jnp.float16)


def test_alibi_key_dims_probe_accepts_a_working_kernel_only(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.nn, "dot_product_attention", _cudnn_as_xla(calls))
    gpu_kernels.key_dims_probe.cache_clear()
    assert gpu_kernels.key_dims_probe("stand-in") is True and calls
    monkeypatch.setattr(gpu_kernels, "alibi_key_columns", lambda slopes, length, scale, dtype: (
        jnp.zeros((slopes.shape[0], 2), dtype), jnp.zeros((length, 2), dtype)))  # a form that drops ALiBi
    gpu_kernels.key_dims_probe.cache_clear()
    assert gpu_kernels.key_dims_probe("stand-in") is False
    gpu_kernels.key_dims_probe.cache_clear()


def test_compiling_for_picks_the_target_platforms_kernels():
    assert platform.target_platform() == jax.default_backend()
    with platform.compiling_for("cuda"):
        assert platform.target_platform() == "gpu"
        assert not cpu_kernels.use_cpu_kernels(jnp.bfloat16)
        assert gpu_kernels.use_cudnn_attention(jnp.zeros((1, 8, 2, 64)), jnp.bfloat16, 0.0)
        with platform.compiling_for("cpu"):
            assert cpu_kernels.use_cpu_kernels(jnp.bfloat16)
        assert platform.target_platform() == "gpu"
    assert platform.target_platform() == jax.default_backend()
    with pytest.raises(ValueError, match="unknown platform 'npu'"):
        with platform.compiling_for("npu"):
            pass

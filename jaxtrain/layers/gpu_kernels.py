"""Fused attention on NVIDIA GPUs: cuDNN's flash attention through ``jax.nn.dot_product_attention``.

ALiBi goes in as an additive bias ``-slope*(i-j)`` and packed-document masking as a boolean mask;
the causal mask is cuDNN's own. Used only on the GPU backend in bf16/fp16 without attention
dropout; anything cuDNN turns down at trace time (head size, dtype, library version) falls back
to the XLA formulation (``cudnn_attention`` returns None).

JAX treats an explicit ``bias`` as differentiable and has cuDNN's backward kernel compute its
gradient (for MPT-1B a ``[1, 16, 2048, 2048]`` tensor summed over the batch, per layer), which
nothing here uses: ALiBi is a constant. JAX skips that gradient for a bias it builds itself from
a boolean mask, so the ALiBi bias is handed over the same way: while the call is traced, JAX's
bias-and-mask combiner returns the ALiBi bias (plus the document mask). If that hook is missing
or unused in the installed JAX, the bias goes in as a plain argument, gradient and all.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import jax
import jax.numpy as jnp

try:  # where JAX builds cuDNN's additive bias; used to pass ALiBi as a constant (see above)
    from jax._src.cudnn import fused_attention_stablehlo as _cudnn_fused
except ImportError:  # pragma: no cover (a JAX without the cuDNN attention module)
    _cudnn_fused = None

from jaxtrain.parallel.platform import target_platform

_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)
_warned: set[str] = set()
_combiner_lock = threading.Lock()


def use_cudnn_attention(q: jax.Array, compute_dtype, dropout_rate: float) -> bool:
    """Whether to try cuDNN: GPU backend, half precision, no dropout, head size a multiple of 8 up to 128."""
    return cudnn_attention_applies(q.shape[-1], compute_dtype, dropout_rate)


def cudnn_attention_applies(head_dim: int, compute_dtype, dropout_rate: float, platform: str | None = None) -> bool:
    """``use_cudnn_attention`` from the head size alone, on ``platform`` (default: the target)."""
    return (
        (platform or target_platform()) == "gpu"
        and jnp.dtype(compute_dtype) in [jnp.dtype(d) for d in _FUSED_DTYPES]
        and dropout_rate == 0.0
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def model_uses_cudnn_attention(model_cfg, compute_dtype, platform: str | None = None) -> bool:
    """Whether an MPT config's attention runs in cuDNN (for memory planning before tracing)."""
    return cudnn_attention_applies(model_cfg.d_model // model_cfg.n_heads, compute_dtype,
                                   model_cfg.attn_config.attn_pdrop, platform)  # fmt: skip


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    slopes: jax.Array | None,
    sequence_id: jax.Array | None,
    compute_dtype,
) -> jax.Array | None:
    """Causal attention ``[batch, length, heads, head_dim]`` (k, v with kv_heads dividing heads) in
    cuDNN, or None when cuDNN does not take this configuration."""
    length, heads = q.shape[1], q.shape[2]
    bias = mask = None
    if slopes is not None:
        pos = jnp.arange(length, dtype=jnp.float32)
        distance = pos[None, :] - pos[:, None]
        bias = (slopes.astype(jnp.float32)[:, None, None] * distance)[None].astype(compute_dtype)
    if sequence_id is not None:
        mask = (sequence_id[:, :, None] == sequence_id[:, None, :])[:, None]
    q, k, v = (a.astype(compute_dtype) for a in (q, k, v))
    options = dict(scale=scale, is_causal=True, implementation="cudnn")
    try:
        if bias is not None:
            out = _constant_bias_attention(q, k, v, bias, mask, options)
            if out is not None:
                return out
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, **options)
    except (NotImplementedError, ValueError, RuntimeError, TypeError) as err:
        reason = f"{type(err).__name__}: {err}"
        if reason not in _warned:
            _warned.add(reason)
            logging.warning("cuDNN attention unavailable for heads=%d length=%d (%s); using XLA", heads, length, reason)
        return None


def _constant_bias_attention(q, k, v, bias, mask, options) -> jax.Array | None:
    """cuDNN attention with ``bias`` (+ ``mask``) as a constant, so its backward pass computes no
    bias gradient; None when the installed JAX does not build the bias where this expects."""
    combine = getattr(_cudnn_fused, "combine_bias_and_mask", None)
    if combine is None:
        return None
    used = []

    def constant_bias(_bias, _mask, dtype):
        used.append(True)
        return combine(bias, mask, dtype)

    with _combiner_lock, _swapped(_cudnn_fused, "combine_bias_and_mask", constant_bias):
        out = jax.nn.dot_product_attention(q, k, v, bias=None, mask=None, **options)
    return out if used else None


@contextlib.contextmanager
def _swapped(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)

"""Fused attention on NVIDIA GPUs: cuDNN's flash attention through ``jax.nn.dot_product_attention``.

ALiBi goes in as an additive bias ``-slope*(i-j)`` and packed-document masking as a boolean mask;
the causal mask is cuDNN's own. Used only on the GPU backend in bf16/fp16 without attention
dropout; anything cuDNN turns down at trace time (head size, dtype, library version) falls back
to the XLA formulation (``cudnn_attention`` returns None).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from jaxtrain.parallel.platform import target_platform

_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)
_warned: set[str] = set()


def use_cudnn_attention(q: jax.Array, compute_dtype, dropout_rate: float) -> bool:
    """Whether to try cuDNN: GPU backend, half precision, no dropout, head size a multiple of 8 up to 128."""
    head_dim = q.shape[-1]
    return (
        target_platform() == "gpu"
        and jnp.dtype(compute_dtype) in [jnp.dtype(d) for d in _FUSED_DTYPES]
        and dropout_rate == 0.0
        and head_dim % 8 == 0
        and head_dim <= 128
    )


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
    try:
        return jax.nn.dot_product_attention(
            q.astype(compute_dtype), k.astype(compute_dtype), v.astype(compute_dtype),
            bias=bias, mask=mask, scale=scale, is_causal=True, implementation="cudnn",
        )  # fmt: skip
    except (NotImplementedError, ValueError, RuntimeError, TypeError) as err:
        reason = f"{type(err).__name__}: {err}"
        if reason not in _warned:
            _warned.add(reason)
            logging.warning("cuDNN attention unavailable for heads=%d length=%d (%s); using XLA", heads, length, reason)
        return None

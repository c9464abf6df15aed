"""Causal attention for XLA:CPU: every bfloat16 dot on the fast path, no exponentials for
masked keys (used when ``cpu_kernels.use_cpu_kernels``).

Keys and values are kept as ``[.., head_dim, length]``, so every forward and backward dot is a
plain batched matmul with its left operand contracted on its last dimension (see
``cpu_kernels``). The softmax runs in query blocks over only the visible keys, so the masked
upper triangle gets no exponentials; the bf16 probabilities are saved zero-padded to full length,
so the backward pass is four full-length dots and one elementwise pass, with no recomputed
scores, per-block key slices or per-block gradient sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.layers.cpu_kernels import cast, transposed_copy

_barrier = jax.lax.optimization_barrier


@jax.custom_vjp
def _swap_minor(x: jax.Array) -> jax.Array:
    """``[..., m, n] -> [..., n, m]`` materialised, with the same transpose as its gradient."""
    return transposed_copy(x)


_swap_minor.defvjp(lambda x: (transposed_copy(x), None), lambda _, ct: (transposed_copy(ct),))


def _block_probs(q_block, key_t, slopes, q_segment, k_segment, start, static):
    """bf16 probabilities of one query block against its visible keys, zero-padded to all keys.

    q_block ``[batch*kv_heads, group*block, head_dim]``; key_t ``[batch*kv_heads, head_dim, keys]``.
    The scores are taken against every key (a plain batched dot: no sliced copy of the keys) and
    the masked tail is dropped before the softmax, so the exponentials cover only visible keys.
    Returns ``[batch, kv_heads, group, block, keys]``.
    """
    group, block, scale, batch = static
    bh, _, _ = q_block.shape
    keys, kv_heads = key_t.shape[-1], bh // batch
    end = start + block
    scores = jnp.einsum("bmd,bdk->bmk", q_block, key_t, preferred_element_type=jnp.float32)
    scores = scores.reshape(batch, kv_heads, group, block, keys)[..., :end] * jnp.float32(scale)
    q_pos = start + jnp.arange(block, dtype=jnp.int32)[:, None]
    k_pos = jnp.arange(end, dtype=jnp.int32)[None, :]
    if slopes is not None:
        distance = (k_pos - q_pos).astype(jnp.float32)
        scores = scores + slopes.astype(jnp.float32).reshape(kv_heads, group, 1, 1) * distance
    visible = (k_pos <= q_pos)[None, None, None]
    if q_segment is not None:
        visible = visible & (q_segment[:, :, None] == k_segment[:, None, :])[:, None, None]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    log_z = jax.nn.logsumexp(scores, axis=-1, keepdims=True)
    probs = cast(jnp.exp(scores - log_z), q_block.dtype)
    if end < keys:
        probs = jnp.pad(probs, [(0, 0)] * 4 + [(0, keys - end)])
    return probs


def _attention_forward(q, key_t, value_t, slopes, sequence_id, static):
    group, block, _, _ = static
    bh, _, length, head_dim = q.shape
    blocks = []
    for start in range(0, length, block):
        q_block = q[:, :, start : start + block].reshape(bh, group * block, head_dim)
        q_segment = k_segment = None
        if sequence_id is not None:
            q_segment, k_segment = sequence_id[:, start : start + block], sequence_id[:, : start + block]
        blocks.append(_block_probs(q_block, key_t, slopes, q_segment, k_segment, start, static))
    probs = jnp.concatenate(blocks, axis=3) if len(blocks) > 1 else blocks[0]
    probs = probs.reshape(bh, group * length, length)
    out = jnp.einsum("bmk,bdk->bmd", probs, value_t, preferred_element_type=jnp.float32)
    return out, probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _causal_attention(q, key_t, value_t, slopes, sequence_id, static):
    """q ``[batch*kv_heads, group, length, head_dim]``, keys/values ``[batch*kv_heads, head_dim,
    length]`` -> float32 ``[batch*kv_heads, group*length, head_dim]``."""
    return _attention_forward(q, key_t, value_t, slopes, sequence_id, static)[0]


def _causal_attention_fwd(q, key_t, value_t, slopes, sequence_id, static):
    out, probs = _attention_forward(q, key_t, value_t, slopes, sequence_id, static)
    return out, (q, key_t, value_t, slopes, sequence_id, probs, out)


def _causal_attention_bwd(static, residuals, d_out):
    """The saved bf16 probabilities (zero where masked) make every gradient one full-length dot:
    no recomputed scores, no per-block slices of the keys and no summing of per-block key and
    value gradients."""
    scale = static[2]
    q, key_t, value_t, slopes, sequence_id, probs, out = residuals
    bh, group, length, head_dim = q.shape
    d_out_c = d_out.astype(q.dtype)
    d_probs = jnp.einsum("bmd,bdk->bmk", d_out_c, value_t, preferred_element_type=jnp.float32)
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1, keepdims=True)
    d_scores = cast(probs.astype(jnp.float32) * (d_probs - row_dot) * jnp.float32(scale), q.dtype)
    q_rows = q.reshape(bh, group * length, head_dim)
    d_q = jnp.einsum("bmk,bdk->bmd", d_scores, key_t, preferred_element_type=jnp.float32)
    # contract over queries with the small operand transposed first: both stay fast bf16 dots
    d_key_t = _barrier(
        jnp.einsum("bdm,bmk->bdk", transposed_copy(q_rows), d_scores, preferred_element_type=jnp.float32)
    )
    d_value_t = _barrier(
        jnp.einsum("bdm,bmk->bdk", transposed_copy(d_out_c), probs, preferred_element_type=jnp.float32)
    )
    d_sequence_id = None if sequence_id is None else np.zeros(sequence_id.shape, jax.dtypes.float0)
    d_slopes = None if slopes is None else jnp.zeros_like(slopes)
    return (
        d_q.reshape(q.shape).astype(q.dtype), d_key_t.astype(key_t.dtype), d_value_t.astype(value_t.dtype),
        d_slopes, d_sequence_id,
    )  # fmt: skip


_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def default_block_size(length: int) -> int:
    """Query block length: blocks of 128 skip most of the masked triangle at modest overhead."""
    for block in (128, 64):
        if length > block and length % block == 0:
            return block
    return length


def _heads_to_columns(x: jax.Array) -> jax.Array:
    """``[batch, length, heads, head_dim] -> [batch*heads, head_dim, length]``."""
    batch, length, heads, head_dim = x.shape
    return _swap_minor(x.reshape(batch, length, heads * head_dim)).reshape(batch * heads, head_dim, length)


def blocked_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    slopes: jax.Array | None = None,
    sequence_id: jax.Array | None = None,
    compute_dtype=jnp.bfloat16,
    block_size: int | None = None,
) -> jax.Array:
    """Causal attention in query blocks; the same contract as ``dot_product_attention``.

    q ``[batch, length, heads, head_dim]``; k, v ``[batch, length, kv_heads, head_dim]``.
    Returns ``[batch, length, heads, head_dim]`` in the compute dtype. The softmax runs per query
    block over the keys at or before the block; the probabilities are kept (bf16, zero-padded to
    the full length) for one full-length dot per gradient.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    block = block_size or default_block_size(length)
    if length % block:
        raise ValueError(f"attention block size {block} must divide the sequence length {length}")
    # queries [batch*kv, group, length, d]; keys/values [batch*kv, d, length]
    q = jnp.transpose(q.astype(compute_dtype).reshape(batch, length, kv_heads, group, head_dim), (0, 2, 3, 1, 4))
    q = q.reshape(batch * kv_heads, group, length, head_dim)
    key_t = _heads_to_columns(k.astype(compute_dtype))
    value_t = _heads_to_columns(v.astype(compute_dtype))
    out = _causal_attention(q, key_t, value_t, slopes, sequence_id, (group, block, float(scale), batch))
    out = out.astype(compute_dtype).reshape(batch, kv_heads, group, length, head_dim)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, length, heads, head_dim)

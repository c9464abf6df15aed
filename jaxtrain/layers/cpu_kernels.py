"""CPU-specific dense and attention kernels that keep every bfloat16 dot on XLA:CPU's fast path.

XLA:CPU runs a bf16 x bf16 -> f32 dot on its fast (YNNPACK/AMX) path only when the left operand
is contracted on its last dimension; any other form is rewritten to a float32 dot on converted
operands, 5-10x slower. Autodiff produces that slow form for every weight gradient (xᵀ·dy) and
for the key/value gradients of attention (Pᵀ·dO, dSᵀ·Q). The kernels here write those products
in the fast form explicitly:

- weight gradients contract over two dimensions of a split row axis (``amk,amn->kn``), which
  makes XLA physically transpose the smaller operand first;
- attention keeps keys and values as ``[.., head_dim, length]`` so every forward and backward dot
  is a plain batched matmul, and the two gradients that contract over queries take a physically
  transposed (reshape + barrier) small operand, with a barrier on the result so XLA cannot fold
  the transpose back into the dot.

Causal attention runs in query blocks that only read the keys at or before the block, so the
fully masked upper triangle is never computed. These kernels are used only when the backend is
CPU (``use_cpu_kernels``); GPU and TPU never pay for the transposes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_barrier = jax.lax.optimization_barrier


def use_cpu_kernels(compute_dtype) -> bool:
    """True when tracing for the CPU backend in bfloat16 (where XLA's slow dot forms cost 5x)."""
    return jax.default_backend() == "cpu" and jnp.dtype(compute_dtype) == jnp.bfloat16


def _row_split(rows: int) -> int | None:
    """A small factor of ``rows`` (>= 2) to split the contracted row axis by, or None if prime."""
    for factor in (2, 3, 5, 7):
        if rows % factor == 0 and rows > factor:
            return factor
    return None


def weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """``xᵀ·dy`` for x ``[rows, in]``, dy ``[rows, out]`` -> float32 ``[in, out]`` in the fast form."""
    rows, features_in = x.shape
    split = _row_split(rows)
    if split is None:
        return jnp.einsum("mi,mo->io", x, dy, preferred_element_type=jnp.float32)
    x = x.reshape(split, rows // split, features_in)
    dy = dy.reshape(split, rows // split, dy.shape[-1])
    return jnp.einsum("ami,amo->io", x, dy, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, kernel: jax.Array, compute_dtype) -> jax.Array:
    """``x [..., in] @ kernel [in, out]`` in ``compute_dtype`` with float32 accumulation and output."""
    return _dense_fwd(x, kernel, compute_dtype)[0]


def _dense_fwd(x, kernel, compute_dtype):
    x_c, kernel_c = x.astype(compute_dtype), kernel.astype(compute_dtype)
    y = jnp.einsum("...i,io->...o", x_c, kernel_c, preferred_element_type=jnp.float32)
    return y, (x_c, kernel_c, jnp.zeros((), x.dtype), jnp.zeros((), kernel.dtype))


def _dense_bwd(compute_dtype, residuals, dy):
    x_c, kernel_c, x_like, kernel_like = residuals
    dy = dy.astype(compute_dtype)
    dx = jnp.einsum("...o,io->...i", dy, kernel_c, preferred_element_type=jnp.float32)
    dkernel = weight_grad(x_c.reshape(-1, x_c.shape[-1]), dy.reshape(-1, dy.shape[-1]))
    return dx.astype(x_like.dtype), dkernel.astype(kernel_like.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def tied_logits(x: jax.Array, embedding: jax.Array, compute_dtype) -> jax.Array:
    """Output head tied to the input embedding: ``x [..., d] @ embedding [vocab, d]ᵀ`` -> float32."""
    return _tied_logits_fwd(x, embedding, compute_dtype)[0]


def _tied_logits_fwd(x, embedding, compute_dtype):
    x_c, table_c = x.astype(compute_dtype), embedding.astype(compute_dtype)
    logits = jnp.einsum("...d,vd->...v", x_c, table_c, preferred_element_type=jnp.float32)
    return logits, (x_c, table_c, jnp.zeros((), x.dtype), jnp.zeros((), embedding.dtype))


def _tied_logits_bwd(compute_dtype, residuals, d_logits):
    x_c, table_c, x_like, table_like = residuals
    d_logits = d_logits.astype(compute_dtype)
    dx = jnp.einsum("...v,vd->...d", d_logits, table_c, preferred_element_type=jnp.float32)
    # [d, vocab] in the fast form; the barrier keeps XLA from folding the final transpose into the dot
    d_table_t = _barrier(weight_grad(x_c.reshape(-1, x_c.shape[-1]), d_logits.reshape(-1, d_logits.shape[-1])))
    return dx.astype(x_like.dtype), d_table_t.T.astype(table_like.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


def _transposed_copy(x: jax.Array) -> jax.Array:
    """``[batch, m, n] -> [batch, n, m]`` materialised: the reshape and barrier keep XLA from
    turning the transpose into a layout change that the next dot would fold away."""
    batch, m, n = x.shape
    split = _row_split(m) or 1
    x = _barrier(jnp.swapaxes(x, 1, 2).reshape(batch, n, split, m // split))
    return x.reshape(batch, n, m)


def _masked_scores(q, key_t, slopes, q_segment, k_segment, static):
    """float32 scores ``[batch, kv_heads, group, block, keys]`` with ALiBi and masks applied.

    q ``[batch*kv_heads, group*block, head_dim]``; key_t ``[batch*kv_heads, head_dim, keys]``.
    """
    group, q_start, scale, batch = static
    bh, rows, _ = q.shape
    keys, block, kv_heads = key_t.shape[-1], rows // group, bh // batch
    scores = jnp.einsum("bmd,bdk->bmk", q, key_t, preferred_element_type=jnp.float32) * jnp.float32(scale)
    scores = scores.reshape(batch, kv_heads, group, block, keys)
    q_pos = q_start + jnp.arange(block, dtype=jnp.int32)[:, None]
    k_pos = jnp.arange(keys, dtype=jnp.int32)[None, :]
    if slopes is not None:
        distance = (k_pos - q_pos).astype(jnp.float32)
        scores = scores + slopes.astype(jnp.float32).reshape(kv_heads, group, 1, 1) * distance
    visible = (k_pos <= q_pos)[None, None, None]
    if q_segment is not None:
        visible = visible & (q_segment[:, :, None] == k_segment[:, None, :])[:, None, None]
    return jnp.where(visible, scores, jnp.finfo(jnp.float32).min)


def _block_forward(q, key_t, value_t, slopes, q_segment, k_segment, static):
    scores = _masked_scores(q, key_t, slopes, q_segment, k_segment, static)
    log_z = jax.nn.logsumexp(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - log_z).reshape(q.shape[0], q.shape[1], key_t.shape[-1])
    out = jnp.einsum("bmk,bdk->bmd", probs.astype(q.dtype), value_t, preferred_element_type=jnp.float32)
    return out, log_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention_block(q, key_t, value_t, slopes, q_segment, k_segment, static):
    """One query block against its visible keys: float32 ``[batch*kv_heads, group*block, head_dim]``."""
    return _block_forward(q, key_t, value_t, slopes, q_segment, k_segment, static)[0]


def _attention_block_fwd(q, key_t, value_t, slopes, q_segment, k_segment, static):
    out, log_z = _block_forward(q, key_t, value_t, slopes, q_segment, k_segment, static)
    return out, (q, key_t, value_t, slopes, q_segment, k_segment, out, log_z)


def _attention_block_bwd(static, residuals, d_out):
    scale = static[2]
    q, key_t, value_t, slopes, q_segment, k_segment, out, log_z = residuals
    bh, rows, head_dim = q.shape
    keys = key_t.shape[-1]
    scores = _masked_scores(q, key_t, slopes, q_segment, k_segment, static)
    probs = jnp.exp(scores - log_z).reshape(bh, rows, keys)
    d_out_c = d_out.astype(q.dtype)
    d_probs = jnp.einsum("bmd,bdk->bmk", d_out_c, value_t, preferred_element_type=jnp.float32)
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1, keepdims=True)
    d_scores = (probs * (d_probs - row_dot) * jnp.float32(scale)).astype(q.dtype)
    d_q = jnp.einsum("bmk,bdk->bmd", d_scores, key_t, preferred_element_type=jnp.float32)
    # contract over queries with the small operand transposed first: both stay fast bf16 dots
    d_key_t = _barrier(
        jnp.einsum("bdm,bmk->bdk", _transposed_copy(q), d_scores, preferred_element_type=jnp.float32)
    )
    d_value_t = _barrier(
        jnp.einsum("bdm,bmk->bdk", _transposed_copy(d_out_c), probs.astype(q.dtype), preferred_element_type=jnp.float32)
    )
    zero_int = lambda x: None if x is None else np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    d_slopes = None if slopes is None else jnp.zeros_like(slopes)
    return (
        d_q.astype(q.dtype), d_key_t.astype(key_t.dtype), d_value_t.astype(value_t.dtype),
        d_slopes, zero_int(q_segment), zero_int(k_segment),
    )  # fmt: skip


_attention_block.defvjp(_attention_block_fwd, _attention_block_bwd)


def default_block_size(length: int) -> int:
    """Query block length: blocks of 128 skip most of the masked triangle at modest overhead."""
    for block in (128, 64):
        if length > block and length % block == 0:
            return block
    return length


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
    Returns ``[batch, length, heads, head_dim]`` in the compute dtype.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    block = block_size or default_block_size(length)
    if length % block:
        raise ValueError(f"attention block size {block} must divide the sequence length {length}")
    # [batch, length, kv, group, d] -> [batch, kv, group, length, d]; keys/values as [batch*kv, d, length]
    q = jnp.transpose(q.astype(compute_dtype).reshape(batch, length, kv_heads, group, head_dim), (0, 2, 3, 1, 4))
    key_t = jnp.transpose(k.astype(compute_dtype), (0, 2, 3, 1)).reshape(batch * kv_heads, head_dim, length)
    value_t = jnp.transpose(v.astype(compute_dtype), (0, 2, 3, 1)).reshape(batch * kv_heads, head_dim, length)
    outputs = []
    for start in range(0, length, block):
        end = start + block
        q_block = q[:, :, :, start:end].reshape(batch * kv_heads, group * block, head_dim)
        q_segment = k_segment = None
        if sequence_id is not None:
            q_segment, k_segment = sequence_id[:, start:end], sequence_id[:, :end]
        out = _attention_block(
            q_block, key_t[..., :end], value_t[..., :end], slopes, q_segment, k_segment,
            (group, start, float(scale), batch),
        )  # fmt: skip
        outputs.append(out.astype(compute_dtype).reshape(batch, kv_heads, group, block, head_dim))
    out = jnp.concatenate(outputs, axis=3) if len(outputs) > 1 else outputs[0]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, length, heads, head_dim)

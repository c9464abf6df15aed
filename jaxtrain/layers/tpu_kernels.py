"""Flash attention for TPUs in Pallas, with ALiBi computed inside the kernel.

XLA's attention holds ``[batch, heads, L, L]`` float32 scores per layer (2 GiB for MPT-1B at
batch 8 and 2048 tokens, 32 times that at 16k), and JAX's own TPU flash kernels take a bias only
as a ``[batch, heads, L, L]`` tensor. Here the scores live in VMEM a ``[block_q, block_k]`` tile
at a time and ALiBi is ``slope[h]·(j - i)`` from the tile's row and column indices, so memory is
linear in the length.

* Forward: grid ``(batch, heads, q blocks, k blocks)``, an online softmax over the k blocks in
  VMEM scratch; writes the output and each row's log-sum-exp for the backward pass.
* Backward: FlashAttention-2's two passes, ``dK, dV`` over q blocks per k block and ``dQ`` over
  k blocks per q block, both recomputing the probabilities from the log-sum-exp.
* Causal blocks above the diagonal are skipped, and their index maps repeat the last block that
  is needed, so Pallas does not copy them in either.
* Packed documents: ``sequence_id`` masks keys of other documents, as the XLA formulation does.
* Grouped-query attention: query head ``h`` reads kv head ``h // group``; dK and dV are summed
  over each group outside the kernel.

The kernels run in Pallas' interpreter on any backend (``interpret=True``), which is how the tests
check them against the XLA formulation on CPU. ``use_tpu_flash_attention`` picks them on TPU for
lengths that are a multiple of 128 without attention dropout, on TPU v4 and newer (Pallas' TPU
compiler does not target v2 or v3); ``JAXTRAIN_TPU_ATTENTION=xla`` keeps XLA's attention there.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from jaxtrain.parallel.platform import target_platform

TPU_ATTENTION_ENV = "JAXTRAIN_TPU_ATTENTION"
TPU_ATTENTION_MODES = ("auto", "xla")
MIN_BLOCK = 128
DEFAULT_BLOCK = 512
_MASKED = -1e30  # a finite "minus infinity": exp(_MASKED - m) is 0 without inf - inf
pl = pltpu = None  # Pallas, imported on first use: off TPU it would only add to start-up time


def _import_pallas() -> None:
    global pl, pltpu
    if pl is None:
        from jax.experimental import pallas
        from jax.experimental.pallas import tpu

        pl, pltpu = pallas, tpu


def use_tpu_flash_attention(length: int, dropout_rate: float, platform: str | None = None) -> bool:
    """Whether attention of ``length`` tokens runs in the Pallas kernel: on TPU (``platform``,
    default the target), no dropout, ``length`` a multiple of 128, unless
    ``JAXTRAIN_TPU_ATTENTION=xla``."""
    mode = os.environ.get(TPU_ATTENTION_ENV, "auto").strip().lower() or "auto"
    if mode not in TPU_ATTENTION_MODES:
        raise ValueError(f"{TPU_ATTENTION_ENV}={mode!r}; use one of {', '.join(TPU_ATTENTION_MODES)}")
    return (mode != "xla" and (platform or target_platform()) == "tpu" and dropout_rate == 0.0
            and length % MIN_BLOCK == 0 and not _pre_v4_tpu())  # fmt: skip


def _pre_v4_tpu() -> bool:
    """Whether this process drives TPU v2 or v3 chips, which Pallas' TPU compiler does not target."""
    kind = jax.devices()[0].device_kind if jax.default_backend() == "tpu" else ""
    return kind.startswith(("TPU v2", "TPU v3"))


def block_size(length: int, preferred: int = DEFAULT_BLOCK) -> int:
    """The largest multiple of 128 up to ``preferred`` that divides ``length`` (itself a multiple of 128)."""
    if length % MIN_BLOCK:
        raise ValueError(f"flash attention needs a length that is a multiple of {MIN_BLOCK}, got {length}")
    size = min(preferred, length) // MIN_BLOCK * MIN_BLOCK
    while length % size:
        size -= MIN_BLOCK
    return size


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    slopes: jax.Array | None = None,
    sequence_id: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention: q ``[batch, length, heads, head_dim]``, k and v ``[batch, length,
    kv_heads, head_dim]`` (kv_heads dividing heads), optional ALiBi ``slopes [heads]`` and packed
    ``sequence_id [batch, length]``. Returns ``[batch, length, heads, head_dim]`` in q's dtype;
    scores, softmax and accumulation are float32."""
    _import_pallas()
    batch, length, heads, _ = q.shape
    bq = block_q or block_size(length)
    bk = block_k or block_size(length)
    if length % bq or length % bk:
        raise ValueError(f"blocks {bq} x {bk} must divide the length {length}")
    slopes = jnp.zeros((heads,), jnp.float32) if slopes is None else slopes.astype(jnp.float32)
    if sequence_id is None:
        sequence_id = jnp.zeros((batch, length), jnp.int32)
    config = _Config(scale=float(scale), block_q=bq, block_k=bk, group=heads // k.shape[2], interpret=interpret)

    def local(q, k, v, slopes, sequence_id):
        qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [batch, heads, length, head_dim]
        return jnp.swapaxes(_flash(config, qt, kt, vt, slopes, sequence_id), 1, 2)

    return _per_shard(local, q, k, v, slopes, sequence_id.astype(jnp.int32))


def _per_shard(local, q, k, v, slopes, sequence_id):
    """Run ``local`` on each device's shard: a Pallas call has no SPMD partitioning of its own,
    and XLA would gather its operands onto every device. The batch is split as the ``batch``
    logical axis is and the heads as ``act_heads`` (when both head counts divide), so every shard
    holds whole sequences and whole kv groups."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, slopes, sequence_id)
    batch_axes, _, head_axes, _ = nn.logical_to_mesh_axes(("batch", None, "act_heads", None)) or (None,) * 4

    def size(axes):
        axes = (axes,) if isinstance(axes, str) else (axes or ())
        return math.prod(mesh.shape[a] for a in axes)

    if q.shape[0] % size(batch_axes):
        batch_axes = None
    if q.shape[2] % size(head_axes) or k.shape[2] % size(head_axes):
        head_axes = None
    heads = P(batch_axes, None, head_axes, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, P(head_axes), P(batch_axes, None)),
                         out_specs=heads, check_vma=False)(q, k, v, slopes, sequence_id)  # fmt: skip


class _Config(NamedTuple):
    """Static kernel settings (hashable: ``custom_vjp``'s non-differentiable argument)."""

    scale: float
    block_q: int
    block_k: int
    group: int  # query heads per kv head
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(config, q, k, v, slopes, sequence_id):
    return _forward(config, q, k, v, slopes, sequence_id)[0]


def _flash_fwd(config, q, k, v, slopes, sequence_id):
    out, lse = _forward(config, q, k, v, slopes, sequence_id)
    return out, (q, k, v, slopes, sequence_id, out, lse)


def _flash_bwd(config, residuals, d_out):
    q, k, v, slopes, sequence_id, out, lse = residuals
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    operands = (slopes, *_segments(sequence_id), q, k, v, d_out, lse, delta)  # both passes read these
    dq = _backward_dq(config, operands)
    dk, dv = _backward_dkv(config, operands)
    if config.group > 1:
        batch, kv_heads, length, head_dim = k.shape
        dk, dv = (g.reshape(batch, kv_heads, config.group, length, head_dim).sum(2).astype(k.dtype) for g in (dk, dv))
    return dq, dk, dv, jnp.zeros_like(slopes), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- tile helpers


def _tile_scores(config, slope, q, k, qseg, kseg, q_block, k_block):
    """Scaled scores of one ``[block_q, block_k]`` tile with ALiBi added, and its visibility mask."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * config.scale
    shape = (config.block_q, config.block_k)
    rows = q_block * config.block_q + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = k_block * config.block_k + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    s = s + slope * (cols - rows).astype(jnp.float32)
    visible = (cols <= rows) & (qseg == kseg)  # [block_q, 1] == [1, block_k]
    return jnp.where(visible, s, _MASKED), visible


def _last_k_block(config, q_block):
    """The last k block a causal q block sees."""
    return (q_block * config.block_q + config.block_q - 1) // config.block_k


def _first_q_block(config, k_block):
    """The first q block that sees a causal k block."""
    return (k_block * config.block_k) // config.block_q


def _specs(config, length, head_dim, *, outer_is_q: bool):
    """BlockSpecs for q, k, v (and q-shaped tensors) on a ``(batch, heads, outer, inner)`` grid."""
    bq, bk, group = config.block_q, config.block_k, config.group
    if outer_is_q:  # inner loops over k blocks, clamped to the causal ones
        q_index = lambda b, h, i, j: (b, h, i, 0)  # noqa: E731
        k_index = lambda b, h, i, j: (b, h // group, jnp.minimum(j, _last_k_block(config, i)), 0)  # noqa: E731
        qseg_index = lambda b, h, i, j: (b, i, 0)  # noqa: E731
        kseg_index = lambda b, h, i, j: (b, 0, jnp.minimum(j, _last_k_block(config, i)))  # noqa: E731
    else:  # outer k blocks, inner q blocks from the first that sees them
        q_index = lambda b, h, j, i: (b, h, jnp.maximum(i, _first_q_block(config, j)), 0)  # noqa: E731
        k_index = lambda b, h, j, i: (b, h // group, j, 0)  # noqa: E731
        qseg_index = lambda b, h, j, i: (b, jnp.maximum(i, _first_q_block(config, j)), 0)  # noqa: E731
        kseg_index = lambda b, h, j, i: (b, 0, j)  # noqa: E731
    return {
        "q": pl.BlockSpec((None, None, bq, head_dim), q_index),
        "k": pl.BlockSpec((None, None, bk, head_dim), k_index),
        "row": pl.BlockSpec((None, None, bq, 1), q_index),  # per-query-row float32: lse, delta
        "qseg": pl.BlockSpec((None, bq, 1), qseg_index),
        "kseg": pl.BlockSpec((None, 1, bk), kseg_index),
        "slopes": pl.BlockSpec(memory_space=pltpu.SMEM),
    }


def _call(config, kernel, grid, in_specs, out_specs, out_shape, scratch, *, matmuls, operands):
    """``pallas_call`` over a ``(batch, heads, outer, inner)`` grid, with a cost estimate for XLA's
    scheduler and cost model: ``matmuls`` ``[tile, head_dim]`` products per visible tile (about
    half the tiles under the causal mask), one exponential per visible score, and ``operands``
    plus outputs read or written once. ``operands`` in the kernel's order: slopes, the two
    segment-id views, then q."""
    batch, heads, length, head_dim = operands[3].shape
    visible_scores = batch * heads * length * (length + config.block_k) // 2
    moved = sum(a.size * a.dtype.itemsize for a in operands)
    moved += sum(math.prod(o.shape) * jnp.dtype(o.dtype).itemsize for o in jax.tree.leaves(out_shape))
    cost = pl.CostEstimate(flops=int(2 * matmuls * visible_scores * head_dim), transcendentals=int(visible_scores),
                           bytes_accessed=int(moved))  # fmt: skip
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost, interpret=config.interpret,
    )(*operands)  # fmt: skip


def _segments(sequence_id):
    return sequence_id[:, :, None], sequence_id[:, None, :]  # [batch, L, 1] and [batch, 1, L]


def _backward_in_specs(specs):
    """BlockSpecs of the backward passes' operands: slopes, segment ids, q, k, v, dO, lse, delta."""
    return [specs[name] for name in ("slopes", "qseg", "kseg", "q", "k", "k", "q", "row", "row")]


# ----------------------------------------------------------------------------- forward


def _forward(config, q, k, v, slopes, sequence_id):
    batch, heads, length, head_dim = q.shape
    bq, bk = config.block_q, config.block_k
    specs = _specs(config, length, head_dim, outer_is_q=True)

    def kernel(slopes_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr):
        i, j, slope = pl.program_id(2), pl.program_id(3), slopes_ref[pl.program_id(1)]

        @pl.when(j == 0)
        def _init():
            m_scr[...] = jnp.full(m_scr.shape, _MASKED, jnp.float32)
            l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
            acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

        @pl.when(j <= _last_k_block(config, i))
        def _tile():
            s, visible = _tile_scores(config, slope, q_ref[...], k_ref[...], qseg_ref[...], kseg_ref[...], i, j)
            m_prev = m_scr[...]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(visible, jnp.exp(s - m_next), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
            pv = jax.lax.dot_general(p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)  # fmt: skip
            acc_scr[...] = alpha * acc_scr[...] + pv
            m_scr[...] = m_next

        @pl.when(j == pl.num_programs(3) - 1)
        def _finish():
            l = jnp.maximum(l_scr[...], 1e-30)  # a row with no visible key (cannot happen causally) stays 0
            o_ref[...] = (acc_scr[...] / l).astype(o_ref.dtype)
            lse_ref[...] = m_scr[...] + jnp.log(l)

    qseg, kseg = _segments(sequence_id)
    return _call(
        config, kernel, (batch, heads, length // bq, length // bk),
        [specs["slopes"], specs["qseg"], specs["kseg"], specs["q"], specs["k"], specs["k"]],
        [specs["q"], specs["row"]],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, length, 1), jnp.float32)],
        [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, head_dim), jnp.float32)],
        matmuls=2, operands=(slopes, qseg, kseg, q, k, v),
    )  # fmt: skip


# ----------------------------------------------------------------------------- backward


def _tile_grads(config, slope, q, k, v, d_out, lse, delta, qseg, kseg, q_block, k_block):
    """A tile's probabilities and score gradient (already scaled): ``p`` and ``ds``."""
    s, visible = _tile_scores(config, slope, q, k, qseg, kseg, q_block, k_block)
    p = jnp.where(visible, jnp.exp(s - lse), 0.0)
    dp = jax.lax.dot_general(d_out, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return p, p * (dp - delta) * config.scale


def _backward_dq(config, operands):
    q = operands[3]
    batch, heads, length, head_dim = q.shape
    bq, bk = config.block_q, config.block_k
    specs = _specs(config, length, head_dim, outer_is_q=True)

    def kernel(slopes_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr):
        i, j, slope = pl.program_id(2), pl.program_id(3), slopes_ref[pl.program_id(1)]

        @pl.when(j == 0)
        def _init():
            dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

        @pl.when(j <= _last_k_block(config, i))
        def _tile():
            k_tile = k_ref[...]
            _, ds = _tile_grads(config, slope, q_ref[...], k_tile, v_ref[...], do_ref[...], lse_ref[...],
                                delta_ref[...], qseg_ref[...], kseg_ref[...], i, j)  # fmt: skip
            dq_scr[...] += jax.lax.dot_general(ds.astype(k_tile.dtype), k_tile, (((1,), (0,)), ((), ())),
                                               preferred_element_type=jnp.float32)  # fmt: skip

        @pl.when(j == pl.num_programs(3) - 1)
        def _finish():
            dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)

    return _call(
        config, kernel, (batch, heads, length // bq, length // bk), _backward_in_specs(specs),
        specs["q"], jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((bq, head_dim), jnp.float32)],
        matmuls=3, operands=operands,
    )  # fmt: skip


def _backward_dkv(config, operands):
    """dK and dV per query head ``[batch, heads, length, head_dim]``: in k's dtype without query
    groups, else float32 for the caller to sum over each group."""
    q, k = operands[3], operands[4]
    batch, heads, length, head_dim = q.shape
    bq, bk = config.block_q, config.block_k
    specs = _specs(config, length, head_dim, outer_is_q=False)
    k_out = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j, i: (b, h, j, 0))

    def kernel(slopes_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
               dk_scr, dv_scr):  # fmt: skip
        j, i, slope = pl.program_id(2), pl.program_id(3), slopes_ref[pl.program_id(1)]

        @pl.when(i == 0)
        def _init():
            dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
            dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

        @pl.when(i >= _first_q_block(config, j))
        def _tile():
            q_tile, d_out_tile = q_ref[...], do_ref[...]
            p, ds = _tile_grads(config, slope, q_tile, k_ref[...], v_ref[...], d_out_tile, lse_ref[...],
                                delta_ref[...], qseg_ref[...], kseg_ref[...], i, j)  # fmt: skip
            transposed = (((0,), (0,)), ((), ()))  # contract over the tile's query rows
            dv_scr[...] += jax.lax.dot_general(p.astype(d_out_tile.dtype), d_out_tile, transposed,
                                               preferred_element_type=jnp.float32)  # fmt: skip
            dk_scr[...] += jax.lax.dot_general(ds.astype(q_tile.dtype), q_tile, transposed,
                                               preferred_element_type=jnp.float32)  # fmt: skip

        @pl.when(i == pl.num_programs(3) - 1)
        def _finish():
            dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
            dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)

    grad_shape = jax.ShapeDtypeStruct((batch, heads, length, head_dim), k.dtype if config.group == 1 else jnp.float32)
    return _call(
        config, kernel, (batch, heads, length // bk, length // bq),
        _backward_in_specs(specs), [k_out, k_out], [grad_shape, grad_shape],
        [pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)],
        matmuls=4, operands=operands,
    )  # fmt: skip

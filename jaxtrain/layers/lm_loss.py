"""Language-model head and cross-entropy, plain and fused.

``cross_entropy_sum`` is the reference: float32 logits ``[batch, length, vocab]`` in, summed
token loss out. ``chunked_cross_entropy`` computes the same sums from the final hidden state
and the output weight without holding the float32 logits: it walks the sequence in chunks
whose float32 logits fit in the last-level cache (on CPUs; 512 MiB of them on accelerators),
keeps only each row's log-partition for the backward pass, and recomputes each chunk's logits
there to form ``softmax - onehot`` (kept in the compute dtype for one weight-gradient dot over
all rows).
On a 50k vocabulary the full logits are the largest tensor of a small model's step (8 x 512
rows: 826 MB in float32), so the fused form (``model.fused_loss``) is a memory saving; it pays
one extra head matmul for the recompute and, on the 2-core CPU we measure on, is not faster
(``bench/fused_loss_ab.py``), so it is off by default.

Every dot keeps its left operand contracted on its last dimension and, on the CPU, the weight
gradient uses ``cpu_kernels``' split-row form, so in bfloat16 all of them stay on XLA:CPU's fast
path. ``head_logits`` is the output head off the CPU kernels, whose backward products round the
logits gradient to the compute dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.layers import cpu_kernels
from jaxtrain.parallel.platform import target_platform

IGNORE_INDEX = -100
# Float32 logits per chunk: on CPUs small enough to stay in a server CPU's last-level cache; on
# accelerators large enough that each chunk's head products keep the matrix units busy.
CHUNK_LOGIT_BYTES = 48 * 1024 * 1024
ACCELERATOR_CHUNK_LOGIT_BYTES = 512 * 1024 * 1024


def cross_entropy_sum(
    logits: jax.Array, targets: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed token cross-entropy (+ optional z-loss) over non-ignored targets.

    logits: float32[batch, length, vocab]; targets: int32[batch, length] (already shifted).
    Returns (loss_sum, z_loss_sum, token_count), all float32 scalars.
    """
    return _softmax_cross_entropy_fwd(logits, targets, z_loss, one_pass=False)[0]


def logsumexp_one_pass(x: jax.Array) -> jax.Array:
    """``logsumexp`` over the last axis in one read of ``x`` (a running maximum and a sum of
    exponentials rescaled whenever the maximum grows), for memory-bound accelerators: the plain
    form reads ``x`` once for the maximum and again for the sum. Not differentiable by itself."""

    def combine(a, b):
        (m_a, s_a), (m_b, s_b) = a, b
        m = jnp.maximum(m_a, m_b)
        # one exponential per step: the larger maximum's sum is kept as it is
        a_low = m_a < m_b
        low_m, low_s, high_s = jnp.where(a_low, m_a, m_b), jnp.where(a_low, s_a, s_b), jnp.where(a_low, s_b, s_a)
        rescaled = jnp.where(low_m == -jnp.inf, 0.0, low_s * jnp.exp(low_m - m))
        return m, high_s + rescaled

    m, s = jax.lax.reduce((x, jnp.ones_like(x)), (jnp.float32(-jnp.inf), jnp.float32(0.0)), combine, (x.ndim - 1,))
    return m + jnp.log(s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def softmax_cross_entropy_sum(
    logits: jax.Array, targets: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``cross_entropy_sum`` whose logits gradient is one written-out pass,
    ``(softmax·(g + 2·z·log_z·g_z) - onehot(target)·g)`` over valid tokens, with the one-hot as
    an index comparison. Autodiff scatters the target entries into a zero-filled copy of the
    logits and adds it in separate passes (the largest tensor of a small model's step). Off the
    CPU, log Z takes one read of the logits (``logsumexp_one_pass``) instead of two."""
    return _softmax_cross_entropy_fwd(logits, targets, z_loss)[0]


def _softmax_cross_entropy_fwd(logits, targets, z_loss, one_pass=None):
    """The sums, and what the written-out gradient needs: float32 logits, targets, mask, log Z.
    ``one_pass`` (default: off the CPU) takes log Z in one read of the logits, not two."""
    logits = logits.astype(jnp.float32)
    valid = targets != IGNORE_INDEX
    safe_targets = jnp.where(valid, targets, 0)
    if one_pass is None:
        one_pass = target_platform() != "cpu"
    log_z = logsumexp_one_pass(logits) if one_pass else jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
    token_loss = jnp.where(valid, log_z - target_logit, 0.0)
    z_term = jnp.where(valid, z_loss * jnp.square(log_z), 0.0) if z_loss else jnp.zeros_like(token_loss)
    out = (token_loss.sum(), z_term.sum(), valid.sum().astype(jnp.float32))
    return out, (logits, safe_targets, valid, log_z)


def _softmax_cross_entropy_bwd(z_loss, residuals, cotangents):
    logits, safe_targets, valid, log_z = residuals
    g_loss, g_z, _ = cotangents
    row = jnp.where(valid, g_loss + (2.0 * z_loss * log_z * g_z if z_loss else 0.0), 0.0)[..., None]
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == safe_targets[..., None]
    d_logits = jnp.exp(logits - log_z[..., None]) * row - jnp.where(onehot & valid[..., None], g_loss, 0.0)
    return d_logits, np.zeros(safe_targets.shape, jax.dtypes.float0)


softmax_cross_entropy_sum.defvjp(_softmax_cross_entropy_fwd, _softmax_cross_entropy_bwd)


def head_logits(x: jax.Array, weight: jax.Array, *, tied: bool, compute_dtype=jnp.bfloat16) -> jax.Array:
    """The output head's float32 logits ``x @ W`` from ``compute_dtype`` operands.

    x: ``[..., d]``; weight: ``[vocab, d]`` when ``tied`` (the input embedding) else ``[d, vocab]``.
    The product accumulates in float32 and returns float32 logits for the loss. Its two backward
    products round the float32 logits gradient to ``compute_dtype`` (a dot algorithm that rounds
    its operands as it loads them, ``BF16_BF16_F32`` for bf16), as PyTorch's autocast does (its
    head returns bf16 logits). Autodiff would instead take both products in float32, which on
    GPUs runs at the TF32 rate, half the bf16 one. XLA:CPU ignores the algorithm (full float32).
    """
    return _head_product(x.astype(compute_dtype), weight.astype(compute_dtype), bool(tied))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _head_product(x_c, w_c, tied):
    return _chunk_logits(x_c, w_c, tied, None)


def _head_product_fwd(x_c, w_c, tied):
    return _head_product(x_c, w_c, tied), (x_c, w_c)


# The dot algorithm that rounds float32 operands to a half-precision compute dtype inside the product
_ROUNDING_ALGORITHMS = {"bfloat16": jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
                        "float16": jax.lax.DotAlgorithmPreset.F16_F16_F32}  # fmt: skip


def _head_product_bwd(tied, residuals, g):
    x_c, w_c = residuals
    x_dtype, w_dtype = x_c.dtype, w_c.dtype
    algorithm = _ROUNDING_ALGORITHMS.get(jnp.dtype(x_dtype).name)
    if algorithm is not None:
        # float32 operands that the product rounds to the compute dtype as it loads them: the
        # float32 gradient can then be written over the logits' buffer (a gradient converted
        # first needs a buffer of its own beside them)
        x_c, w_c = x_c.astype(jnp.float32), w_c.astype(jnp.float32)
    d_x = jnp.einsum("...v,vd->...d" if tied else "...v,dv->...d", g, w_c, preferred_element_type=jnp.float32,
                     precision=algorithm)  # fmt: skip
    d_w = _output_weight_grad(x_c.reshape(-1, x_c.shape[-1]), g.reshape(-1, g.shape[-1]), tied=tied,
                              precision=algorithm)  # fmt: skip
    return d_x.astype(x_dtype), d_w.astype(w_dtype)


def _output_weight_grad(x_rows: jax.Array, d_logits: jax.Array, *, tied: bool, precision=None) -> jax.Array:
    """The output weight's float32 gradient from rows ``x [rows, d]`` and ``d_logits [rows,
    vocab]``, in the weight's layout (``[vocab, d]`` tied, else ``[d, vocab]``), as one product."""
    if tied:
        return jnp.einsum("rv,rd->vd", d_logits, x_rows, preferred_element_type=jnp.float32, precision=precision)
    return jnp.einsum("rd,rv->dv", x_rows, d_logits, preferred_element_type=jnp.float32, precision=precision)


_head_product.defvjp(_head_product_fwd, _head_product_bwd)


def fused_for_evaluation(compute_dtype) -> bool | None:
    """Whether a loss that is never differentiated (a held-out evaluation, a perplexity) takes
    ``chunked_cross_entropy``: yes on the CPU kernels, where without a backward pass the chunks
    cost no recompute and their logits stay in cache (``bench/fused_loss_ab.py --eval``: 1.08x at
    the xs shape, 1.33x at s, whose batch's full logits are 826 MB; an evaluation batch of the
    quickstart's model: 82 -> 65 ms in bf16, 214 -> 203 ms in float32). None elsewhere:
    ``model.fused_loss`` decides, as in training."""
    return True if cpu_kernels.use_cpu_kernels(compute_dtype) else None


def chunk_length(batch: int, length: int, vocab: int, budget_bytes: int = CHUNK_LOGIT_BYTES) -> int:
    """The longest divisor of ``length`` whose ``batch x chunk x vocab`` float32 logits fit the budget."""
    best = 1
    for chunk in range(1, length + 1):
        if length % chunk == 0 and batch * chunk * vocab * 4 <= budget_bytes:
            best = chunk
    return best


def default_chunk_length(batch: int, length: int, vocab: int) -> int:
    """``chunk_length`` under the budget of the platform being compiled for."""
    budget = CHUNK_LOGIT_BYTES if target_platform() == "cpu" else ACCELERATOR_CHUNK_LOGIT_BYTES
    return chunk_length(batch, length, vocab, budget)


def chunked_cross_entropy(
    x: jax.Array,
    weight: jax.Array,
    targets: jax.Array,
    *,
    tied: bool,
    compute_dtype=jnp.bfloat16,
    z_loss: float = 0.0,
    logit_scale: float | None = None,
    chunk: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``cross_entropy_sum(head(x), targets, z_loss)`` without materialising the logits.

    x: float[batch, length, d] (the final-normed hidden state); weight: the output projection,
    ``[vocab, d]`` when ``tied`` (the input embedding) else ``[d, vocab]``; targets:
    int32[batch, length] (shifted, -100 ignored). Logits are ``x @ W`` in ``compute_dtype`` with
    float32 accumulation, times ``logit_scale`` if given. ``chunk`` is the sequence positions
    per chunk (default: ``default_chunk_length``). Returns (loss_sum, z_loss_sum, token_count).
    """
    batch, length, _ = x.shape
    vocab = weight.shape[0] if tied else weight.shape[1]
    chunk = chunk or default_chunk_length(batch, length, vocab)
    if length % chunk:
        raise ValueError(f"loss chunk {chunk} must divide the sequence length {length}")
    static = (*_options(tied, compute_dtype, z_loss, logit_scale), int(chunk))
    return _sums_and_count(_fused_loss, x, weight, targets, static)


def _options(tied, compute_dtype, z_loss, logit_scale) -> tuple:
    """The hashable static options of the fused losses: (tied, dtype name, z_loss, scale or None)."""
    return (bool(tied), jnp.dtype(compute_dtype).name, float(z_loss),
            None if logit_scale is None else float(logit_scale))


def _sums_and_count(loss_fn, x, weight, targets, static):
    """(loss_sum, z_loss_sum, token_count) from a fused loss and the non-ignored targets."""
    loss_sum, z_sum = loss_fn(x, weight, targets.astype(jnp.int32), static)
    return loss_sum, z_sum, (targets != IGNORE_INDEX).sum().astype(jnp.float32)


def _chunks(a: jax.Array, chunk: int) -> jax.Array:
    """``[batch, length, ...] -> [length / chunk, batch, chunk, ...]`` (sequence chunks leading)."""
    batch, length = a.shape[:2]
    a = a.reshape(batch, length // chunk, chunk, *a.shape[2:])
    return jnp.moveaxis(a, 1, 0)


def _chunk_logits(x_c, w_c, tied, scale):
    """float32 logits ``[..., vocab]`` of ``x_c [..., d]`` (bf16 dots in the fast form)."""
    equation = "...d,vd->...v" if tied else "...d,dv->...v"
    logits = jnp.einsum(equation, x_c, w_c, preferred_element_type=jnp.float32)
    return logits if scale is None else logits * jnp.float32(scale)


def _loss_forward(x, weight, targets, static):
    tied, dtype, z_loss, scale, chunk = static
    w_c = weight.astype(dtype)

    def one_chunk(_, inputs):
        x_chunk, t_chunk = inputs
        logits = _chunk_logits(x_chunk.astype(dtype), w_c, tied, scale)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        valid = t_chunk != IGNORE_INDEX
        target_logit = jnp.take_along_axis(logits, jnp.where(valid, t_chunk, 0)[..., None], axis=-1)[..., 0]
        loss = jnp.where(valid, log_z - target_logit, 0.0).sum()
        z_term = jnp.where(valid, jnp.square(log_z), 0.0).sum() * jnp.float32(z_loss)
        return None, (loss, z_term, log_z)

    _, (loss, z_term, log_z) = jax.lax.scan(one_chunk, None, (_chunks(x, chunk), _chunks(targets, chunk)))
    return (loss.sum(), z_term.sum()), log_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_loss(x, weight, targets, static):
    return _loss_forward(x, weight, targets, static)[0]


def _fused_loss_fwd(x, weight, targets, static):
    sums, log_z = _loss_forward(x, weight, targets, static)
    return sums, (x, weight, targets, log_z)


def _fused_loss_bwd(static, residuals, cotangents):
    tied, dtype, z_loss, scale, chunk = static
    x, weight, targets, log_z = residuals
    g_loss, g_z = cotangents
    w_c = weight.astype(dtype)
    d_model = x.shape[-1]
    vocab = weight.shape[0] if tied else weight.shape[1]

    def one_chunk(_, inputs):
        x_chunk, t_chunk, lz_chunk = inputs
        logits = _chunk_logits(x_chunk.astype(dtype), w_c, tied, scale)
        probs = jnp.exp(logits - lz_chunk[..., None])
        valid = t_chunk != IGNORE_INDEX
        onehot = jax.nn.one_hot(jnp.where(valid, t_chunk, -1), vocab, dtype=jnp.float32)
        d_logits = g_loss * (probs - onehot)
        if z_loss:
            d_logits = d_logits + (g_z * 2.0 * z_loss) * lz_chunk[..., None] * probs
        d_logits = d_logits * jnp.where(valid, 1.0, 0.0)[..., None]
        if scale is not None:
            d_logits = d_logits * jnp.float32(scale)
        d_logits = d_logits.astype(dtype)
        equation = "bcv,vd->bcd" if tied else "bcv,dv->bcd"
        d_x = jnp.einsum(equation, d_logits, w_c, preferred_element_type=jnp.float32)
        return None, (d_x.astype(x.dtype), d_logits)

    _, (d_x, d_logits) = jax.lax.scan(one_chunk, None, (_chunks(x, chunk), _chunks(targets, chunk), log_z))
    # one weight-gradient dot over all rows (chunk-major order on both sides), on XLA:CPU in its
    # fast form
    rows = x.shape[0] * x.shape[1]
    x_rows = _chunks(x, chunk).astype(dtype).reshape(rows, d_model)
    d_logits = d_logits.reshape(rows, vocab)
    if target_platform() == "cpu":
        d_weight = cpu_kernels.output_weight_grad(x_rows, d_logits, tied=tied)
    else:
        d_weight = _output_weight_grad(x_rows, d_logits, tied=tied)
    batch, length = x.shape[:2]
    d_x = jnp.moveaxis(d_x, 0, 1).reshape(batch, length, d_model)
    return d_x, d_weight.astype(weight.dtype), np.zeros(targets.shape, jax.dtypes.float0)


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def head_cross_entropy(
    x: jax.Array,
    weight: jax.Array,
    targets: jax.Array,
    *,
    tied: bool,
    compute_dtype=jnp.bfloat16,
    z_loss: float = 0.0,
    logit_scale: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``cross_entropy_sum(head(x), targets, z_loss)`` with one gradient for head and loss together.

    The same arguments and numbers as ``chunked_cross_entropy``, computed over the full logits (no
    recompute). Autodiff of head -> loss makes three passes over the logits-sized arrays in the
    backward pass (scale the saved exponentials, add the one-hot term, convert to the compute
    dtype for the head's dots); here it is one: ``exp(logits - max) * coef`` rounded to the
    compute dtype, with each row's target entry written from its exact float32 value. On XLA:CPU
    that pass costs what the conversion alone did (65 ms of 130 at a 50k vocabulary, 4k tokens).
    Used on the CPU (bfloat16 and float32); elsewhere XLA fuses the autodiff passes itself.
    """
    return _sums_and_count(_head_loss, x, weight, targets, _options(tied, compute_dtype, z_loss, logit_scale))


def _head_loss_forward(x, weight, targets, static):
    tied, dtype, z_loss, scale = static
    x_c, w_c = x.astype(dtype), weight.astype(dtype)
    logits = _chunk_logits(x_c, w_c, tied, scale)  # [batch, length, vocab] float32
    valid = targets != IGNORE_INDEX
    safe_targets = jnp.where(valid, targets, 0)
    row_max = jax.lax.stop_gradient(logits.max(axis=-1))
    exps = jnp.exp(logits - row_max[..., None])
    sum_exp = exps.sum(axis=-1)
    log_z = row_max + jnp.log(sum_exp)
    target_logit = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
    loss_sum = jnp.where(valid, log_z - target_logit, 0.0).sum()
    z_sum = jnp.where(valid, z_loss * jnp.square(log_z), 0.0).sum() if z_loss else jnp.zeros((), jnp.float32)
    return (loss_sum, z_sum), (x_c, w_c, exps, sum_exp, log_z, safe_targets, valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head_loss(x, weight, targets, static):
    return _head_loss_forward(x, weight, targets, static)[0]


def _head_loss_fwd(x, weight, targets, static):
    sums, saved = _head_loss_forward(x, weight, targets, static)
    return sums, (*saved, jnp.zeros((), x.dtype), jnp.zeros((), weight.dtype))


def _head_loss_bwd(static, residuals, cotangents):
    tied, dtype, z_loss, scale = static
    x_c, w_c, exps, sum_exp, log_z, safe_targets, valid, x_like, w_like = residuals
    g_loss, g_z = cotangents
    scale = 1.0 if scale is None else scale
    # dL/dlogit = coef * softmax - target_coef * onehot, times the logit scale
    coef = jnp.where(valid, g_loss + (2.0 * z_loss) * g_z * log_z, 0.0) * (jnp.float32(scale) / sum_exp)
    target_coef = jnp.where(valid, g_loss, 0.0) * jnp.float32(scale)
    d_logits = cpu_kernels.cast(exps * coef[..., None], dtype)
    target_exp = jnp.take_along_axis(exps, safe_targets[..., None], axis=-1)[..., 0]
    target_grad = cpu_kernels.cast(target_exp * coef - target_coef, dtype)
    batch, length, vocab = exps.shape
    rows = batch * length
    d_logits = d_logits.reshape(rows, vocab).at[jnp.arange(rows), safe_targets.reshape(rows)].set(
        target_grad.reshape(rows), unique_indices=True, indices_are_sorted=True)
    d_model = x_c.shape[-1]
    x_rows = x_c.reshape(rows, d_model)
    d_x = jnp.einsum("rv,vd->rd" if tied else "rv,dv->rd", d_logits, w_c, preferred_element_type=jnp.float32)
    d_weight = cpu_kernels.output_weight_grad(x_rows, d_logits, tied=tied)
    d_x = d_x.reshape(batch, length, d_model).astype(x_like.dtype)
    return d_x, d_weight.astype(w_like.dtype), np.zeros(safe_targets.shape, jax.dtypes.float0)


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)

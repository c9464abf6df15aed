"""CPU-specific kernels that keep every bfloat16 dot on XLA:CPU's fast path and cut the
elementwise passes around them (causal attention's kernel is in ``cpu_attention``).

XLA:CPU runs a bf16 x bf16 -> f32 dot on its fast (YNNPACK/AMX) path only when the left operand
is contracted on its last dimension; any other form is rewritten to a float32 dot on converted
operands, 5-10x slower. Autodiff produces that slow form for every weight gradient (xᵀ·dy) and
for the key/value gradients of attention (Pᵀ·dO, dSᵀ·Q). The kernels here write those products
in the fast form explicitly:

- weight gradients transpose the narrower operand first (the input for most layers, the output
  gradient for the MLP's down projection) and contract over the row axis;
- those transposes are written as a permutation of tiles, which XLA:CPU runs 2-3x faster than
  its two-axis transpose.

Dense layers without a bias return
their bf16 output straight from the dot. Exact GELU uses ``erf`` (one polynomial) rather than
``erfc``, with its gradient written out; LayerNorm takes float32 row statistics as
matrix-vector products, which avoids the full-size broadcasts XLA:CPU materialises for its
reduction kernels. These kernels are used only when the backend is CPU and the compute dtype is
bfloat16 or float32 (``use_cpu_kernels``; in float32 for the transposes); GPU and TPU never pay
for them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.parallel.platform import target_platform

_barrier = jax.lax.optimization_barrier


def cast(x: jax.Array, dtype) -> jax.Array:
    """``x.astype(dtype)``; float32 -> bfloat16 as integer rounding of the bits.

    The result is the same as ``astype`` for every value (round to nearest even; inf, NaN and
    subnormals alike), but XLA:CPU vectorises a fused loop that ends in these integer operations,
    and not one that ends in its bf16 convert: exact GELU forward and backward take 1.9 instead
    of 2.4 ms on ``[2048, 1024]``, ``exp(x - m) * c`` rounded to bf16 7.6 instead of 18 ms on
    ``[2048, 8192]``.
    """
    dtype = jnp.dtype(dtype)
    if dtype != jnp.bfloat16 or x.dtype != jnp.float32:
        return x.astype(dtype)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    rounded = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) >> 16
    quiet_nan = (bits >> 16) | jnp.uint32(0x40)  # keeps sign; the carry above could turn a NaN into 0
    upper = jnp.where(jnp.isnan(x), quiet_nan, rounded).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(upper, jnp.bfloat16)


def use_cpu_kernels(compute_dtype) -> bool:
    """True when tracing for the CPU backend in bfloat16 or float32.

    In bfloat16 XLA's slow dot forms cost 5x. In float32 every dot form is fast, but autodiff's
    weight gradients make XLA:CPU transpose an activation gradient with the elementwise
    backward (GELU's, a residual sum) fused into the transposing loop, which runs at a fraction
    of a GB/s: at the xs benchmark shape those loops took half of a 0.95 s step, and the
    kernels' explicit tiled transposes halve the step."""
    return target_platform() == "cpu" and jnp.dtype(compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _row_split(rows: int) -> int | None:
    """A small factor of ``rows`` (>= 2) to split the contracted row axis by, or None if prime."""
    for factor in (2, 3, 5, 7):
        if rows % factor == 0 and rows > factor:
            return factor
    return None


def weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """``xᵀ·dy`` for x ``[rows, in]``, dy ``[rows, out]`` -> float32 ``[in, out]`` in the fast form.

    The fast form transposes the dot's left operand physically, which costs about as much as the
    dot itself for a wide operand: when ``in > out`` (the MLP's down projection) the product is
    taken as ``(dyᵀ·x)ᵀ``, transposing the narrower ``dy`` and then the float32 ``[out, in]`` result.
    """
    if x.shape[1] > dy.shape[1]:
        return transposed_copy(_weight_grad(dy, x))
    return _weight_grad(x, dy)


def output_weight_grad(x: jax.Array, d_logits: jax.Array, *, tied: bool) -> jax.Array:
    """The output projection's float32 gradient from rows ``x [rows, d]`` and ``d_logits [rows, vocab]``:
    ``[vocab, d]`` when tied (the embedding table's layout), else ``[d, vocab]``. Taken as ``[d, vocab]``
    in the fast form either way, then transposed for the tied table."""
    d_weight = weight_grad(x, d_logits)
    return transposed_copy(d_weight) if tied else d_weight


def _weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    rows, features_in = x.shape
    if _tile(rows, features_in):
        return jnp.einsum("im,mo->io", transposed_copy(x), dy, preferred_element_type=jnp.float32)
    split = _row_split(rows)
    if split is None:
        return jnp.einsum("mi,mo->io", x, dy, preferred_element_type=jnp.float32)
    x = x.reshape(split, rows // split, features_in)
    dy = dy.reshape(split, rows // split, dy.shape[-1])
    return jnp.einsum("ami,amo->io", x, dy, preferred_element_type=jnp.float32)


def _tile(m: int, n: int) -> int | None:
    """The largest of 16, 8, 4, 2 that divides both ``m`` and ``n``, or None."""
    for tile in (16, 8, 4, 2):
        if m % tile == 0 and n % tile == 0:
            return tile
    return None


def transposed_copy(x: jax.Array) -> jax.Array:
    """``[..., m, n] -> [..., n, m]`` materialised, exact for every value.

    Written as the permutation of ``[m/t, t, n/t, t]`` tiles to ``[n/t, t, m/t, t]``: the same
    transpose, which XLA:CPU emits 2-3x faster than the two-axis form (on bf16 ``[2048, 256]``:
    0.21 against 0.53 ms; ``[8, 512, 512]``: 0.52 against 1.45 ms) and faster than an identity
    product on the matrix unit. The barrier keeps XLA from turning it into a layout change
    that the next dot would fold away. Shapes with no common tile (an odd side) fall back to a
    reshaped two-axis transpose.

    A barrier on the input too: otherwise XLA fuses the elementwise work that produced ``x`` (a
    LayerNorm's output and its bf16 rounding, say) into the transposing loop, recomputing it in
    the transposed order even where ``x`` is already in memory for the forward product. With it,
    the xs benchmark step ran 8.5 % faster (four alternating pairs), the same bits.
    """
    x = _barrier(x)
    *batch, m, n = x.shape
    tile = _tile(m, n)
    if tile is None:
        x = _barrier(jnp.swapaxes(x.reshape(-1, m, n), 1, 2).reshape(-1, n, 1, m))
        return x.reshape(*batch, n, m)
    k = len(batch)
    tiles = x.reshape(*batch, m // tile, tile, n // tile, tile)
    return _barrier(jnp.transpose(tiles, (*range(k), k + 2, k + 3, k, k + 1)).reshape(*batch, n, m))


def dense(x: jax.Array, kernel: jax.Array, compute_dtype, out_dtype=jnp.float32) -> jax.Array:
    """``x [..., in] @ kernel [in, out]`` in ``compute_dtype`` with float32 accumulation.

    The output is ``out_dtype`` (float32 by default); a bf16 output is rounded from the float32
    accumulator by the dot itself, which saves writing and re-reading a float32 activation.
    """
    return _dense(x, kernel, compute_dtype, jnp.dtype(out_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x, kernel, compute_dtype, out_dtype):
    return _dense_fwd(x, kernel, compute_dtype, out_dtype)[0]


def _dense_fwd(x, kernel, compute_dtype, out_dtype):
    x_c, kernel_c = x.astype(compute_dtype), kernel.astype(compute_dtype)
    y = jnp.einsum("...i,io->...o", x_c, kernel_c, preferred_element_type=out_dtype)
    return y, (x_c, kernel_c, jnp.zeros((), x.dtype), jnp.zeros((), kernel.dtype))


def _dense_bwd(compute_dtype, out_dtype, residuals, dy):
    x_c, kernel_c, x_like, kernel_like = residuals
    dy = dy.astype(compute_dtype)
    # a bf16 input gets its gradient rounded by the dot (the same value as converting afterwards)
    dx_dtype = x_like.dtype if x_like.dtype == compute_dtype else jnp.float32
    dx = jnp.einsum("...o,io->...i", dy, kernel_c, preferred_element_type=dx_dtype)
    dkernel = weight_grad(x_c.reshape(-1, x_c.shape[-1]), dy.reshape(-1, dy.shape[-1]))
    return dx.astype(x_like.dtype), dkernel.astype(kernel_like.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


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
    d_table = output_weight_grad(x_c.reshape(-1, x_c.shape[-1]), d_logits.reshape(-1, d_logits.shape[-1]), tied=True)
    return dx.astype(x_like.dtype), d_table.astype(table_like.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


def _gelu_cdf(x: jax.Array) -> jax.Array:
    return 0.5 * (1.0 + jax.lax.erf(x * jnp.float32(_SQRT_HALF)))


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU ``x·Φ(x)`` computed in float32 with ``erf``, returned in ``x``'s dtype.

    ``jax.nn.gelu(approximate=False)`` goes through ``erfc``, whose float32 expansion on XLA:CPU
    evaluates two rational approximations and an ``exp`` per element (and autodiff differentiates
    all of it); ``erf`` is one polynomial. The gradient ``Φ(x) + x·φ(x)`` is written out, so the
    backward pass reads only the saved input.
    """
    xf = x.astype(jnp.float32)
    return cast(xf * _gelu_cdf(xf), x.dtype)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, dy):
    xf = x.astype(jnp.float32)
    pdf = jnp.exp(-0.5 * xf * xf) * jnp.float32(_INV_SQRT_2PI)
    return (cast(dy.astype(jnp.float32) * (_gelu_cdf(xf) + xf * pdf), x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float, out_dtype) -> jax.Array:
    """LayerNorm over the last axis with float32 statistics, output in ``out_dtype``.

    The row sums are matrix-vector products (with ``1/n`` or ``scale``), so no statistic or
    ``scale`` is broadcast to the full activation shape (XLA:CPU materialises such broadcasts
    for its reduction kernels); the backward pass uses the saved mean and reciprocal deviation
    instead of differentiating the elementwise chain. ``bias`` may be None.
    """
    return _layer_norm_fwd(x, scale, bias, eps, out_dtype)[0]


def _row_dot(x: jax.Array, v: jax.Array) -> jax.Array:
    """``sum_j x[..., j]·v[j]`` as ``[..., 1]``."""
    return jnp.einsum("...j,j->...", x, v)[..., None]


def _layer_norm_fwd(x, scale, bias, eps, out_dtype):
    features = x.shape[-1]
    xf = x.astype(jnp.float32)
    inv_n = jnp.full((features,), 1.0 / features, jnp.float32)
    mean = _row_dot(xf, inv_n)
    centred = xf - mean
    rstd = jax.lax.rsqrt(_row_dot(centred * centred, inv_n) + jnp.float32(eps))
    y = centred * rstd * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return cast(y, out_dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, out_dtype, residuals, dy):
    x, mean, rstd, scale, bias = residuals
    features = x.shape[-1]
    dy = dy.astype(jnp.float32)
    x_hat = _barrier((x.astype(jnp.float32) - mean) * rstd)
    scale_f = scale.astype(jnp.float32)
    # dx = rstd·(g - mean(g) - x_hat·mean(g·x_hat)) with g = dy·scale
    mean_g = _row_dot(dy, scale_f) / features
    mean_g_x_hat = _row_dot(dy * x_hat, scale_f) / features
    dx = rstd * (dy * scale_f - mean_g - x_hat * mean_g_x_hat)
    reduce_axes = tuple(range(dy.ndim - 1))
    d_scale = jnp.sum(dy * x_hat, axis=reduce_axes).astype(scale.dtype)
    d_bias = None if bias is None else jnp.sum(dy, axis=reduce_axes).astype(bias.dtype)
    return cast(dx, x.dtype), d_scale, d_bias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)

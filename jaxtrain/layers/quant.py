"""Frozen weights in 8 or 4 bits (``model.quantize_frozen: int8 | nf4``), for LoRA runs.

A LoRA run never updates its model's own weights, so they need only be read. Two formats:

- ``int8``: int8 with one float32 scale per output column (``kernel_scale [out]``, the column's
  largest magnitude / 127, values rounded to nearest): half the memory of bf16. Weight-only,
  per-column absmax; not bitsandbytes' LLM.int8() (which keeps outlier columns in float16 and
  multiplies in int8), so a run differs from Foundry's ``load_in_8bit`` in the last digits of its
  losses, as that differs from bf16.
- ``nf4``: QLoRA's 4-bit NormalFloat, as bitsandbytes' ``quantize_4bit(quant_type="nf4")``
  computes it: each block of 64 consecutive input rows of a column (fewer where the width is not
  a multiple of 64) is divided by its largest magnitude (float32 ``kernel_scale [in/64, out]``)
  and each value replaced by the nearest of the 16 NF4 levels, two 4-bit codes to a byte
  (``kernel`` uint8 ``[in/2, out]``, rows 2i and 2i+1 in the high and low nibble): a little over
  a quarter of bf16's memory. Where the input width is a multiple of 64 (every MPT preset) the
  codes and scales equal bitsandbytes' (tested); bitsandbytes' blocks of other widths run on
  into the next column, these stop at its end. There is no double quantization of the scales
  (0.5 bits per weight rather than 0.127).

Each step reads a block's kernels back as float in the compute dtype, one layer at a time, and the
adapters train on that as on the float weights. Every linear layer of the blocks is quantized
(whether it has an adapter or not); the embedding, the output head, the norms, the biases and the
adapters stay as they were. Weights are quantized as they are loaded (``load_path``), each read
in float32 and dropped once quantized, one layer at a time: the devices hold one layer's float
kernel at most. From a Hugging Face folder each layer is read from the files as it is needed; from
a jaxtrain checkpoint each stacked kernel is read whole into host memory in the dtype it was
saved in (every process reads it all: Orbax stores it in chunks holding every layer), then
quantized layer by layer. A model whose frozen weights are loaded starts as
placeholders (``linear.loaded_placeholders``), never drawn.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

SCALE = "kernel_scale"  # the scale's name, beside its layer's ``kernel``
_LEVELS = 127.0
NF4_BLOCK = 64
# the 16 NF4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def nf4_block(in_features: int) -> int:
    """Input rows per NF4 scale: 64, or the largest power of two dividing a width that 64 does not."""
    return math.gcd(in_features, NF4_BLOCK)


def quantize(w: jax.Array, kind: str = "int8") -> tuple[jax.Array, jax.Array]:
    """(``q``, float32 ``scale``) of ``w [..., in, out]`` in the format ``kind`` (see the module):
    int8 ``q [..., in, out]`` with ``scale [..., out]``, or nf4 ``q`` uint8 ``[..., in/2, out]``
    with ``scale [..., in/block, out]``."""
    w = jnp.asarray(w, jnp.float32)
    if kind == "nf4":
        return _quantize_nf4(w)
    amax = jnp.max(jnp.abs(w), axis=-2)
    scale = jnp.where(amax > 0, amax / _LEVELS, 1.0)
    q = jnp.clip(jnp.round(w / scale[..., None, :]), -_LEVELS, _LEVELS).astype(jnp.int8)
    return q, scale


def _quantize_nf4(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    *lead, rows, cols = w.shape
    block = nf4_block(rows)
    blocks = w.reshape(*lead, rows // block, block, cols)
    amax = jnp.max(jnp.abs(blocks), axis=-2)
    normalized = blocks / jnp.where(amax > 0, amax, 1.0)[..., None, :]
    levels = jnp.asarray(NF4_LEVELS, jnp.float32)
    midpoints = (levels[1:] + levels[:-1]) / 2
    # the nearest level: the count of midpoints between levels that the value lies above, counted
    # by one elementwise pass (a search over the flattened kernel held six times its float size)
    codes = jnp.zeros(normalized.shape, jnp.uint8)
    for i in range(len(NF4_LEVELS) - 1):
        codes = codes + (normalized > midpoints[i]).astype(jnp.uint8)
    codes = codes.reshape(*lead, rows, cols)
    return (codes[..., 0::2, :] << 4) | codes[..., 1::2, :], amax


def placeholder(shape: tuple[int, int], kind: str) -> tuple[jax.Array, jax.Array]:
    """The codes of zeros and unit scales, in ``quantize``'s shapes for a ``shape`` kernel: a
    stand-in for weights loaded later, made without a float kernel."""
    shapes = jax.eval_shape(lambda w: quantize(w, kind), jax.ShapeDtypeStruct(shape, jnp.float32))
    zero = NF4_LEVELS.index(0.0) * 0x11 if kind == "nf4" else 0  # nf4: the level 0.0 in both nibbles
    return jnp.full(shapes[0].shape, zero, shapes[0].dtype), jnp.ones(shapes[1].shape, shapes[1].dtype)


def dequantize(q: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """The float kernel ``[..., in, out]`` that ``q`` and ``scale`` (``quantize``'s) stand for, in
    ``dtype``; the format is told by ``q``'s dtype (int8 or uint8, nf4)."""
    if q.dtype == jnp.uint8:
        *lead, half, cols = q.shape
        codes = jnp.stack([q >> 4, q & 15], axis=-2).reshape(*lead, 2 * half, cols)
        values = jnp.asarray(NF4_LEVELS, jnp.float32)[codes.astype(jnp.int32)]
        blocks = values.reshape(*lead, scale.shape[-2], -1, cols) * scale.astype(jnp.float32)[..., None, :]
        return blocks.reshape(*lead, 2 * half, cols).astype(dtype)
    return (q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None, :]).astype(dtype)


def float_shape(q_shape: tuple[int, ...], q_dtype: Any) -> tuple[int, ...]:
    """The shape of the float kernel a quantized kernel of ``q_shape`` and ``q_dtype`` stands for."""
    if q_dtype == jnp.uint8:
        return (*q_shape[:-2], 2 * q_shape[-2], q_shape[-1])
    return tuple(q_shape)


def _scaled(flat: Any) -> set[tuple]:
    """The paths of the layers (``(..., "attn", "Wqkv")``) of a flat state whose kernels are quantized."""
    return {path[:-1] for path, _ in flat if path[-1] == SCALE}


def is_quantized(params: Any) -> bool:
    """Whether a parameter state (arrays or ``ShapeDtypeStruct``s) holds quantized kernels with scales."""
    return bool(_scaled(nnx.to_flat_state(params)))


def float_like(like: Any, dtype: Any = jnp.float32) -> Any:
    """``like`` (a quantized parameter state of ``ShapeDtypeStruct``s) as the float parameters it is
    made from: each quantized kernel a ``dtype`` kernel of the same sharding, its scales left out."""
    flat = nnx.to_flat_state(like)
    scaled = _scaled(flat)
    items = []
    for path, variable in flat:
        if path[:-1] in scaled and path[-1] == SCALE:
            continue
        if path[:-1] in scaled and path[-1] == "kernel":
            kernel = variable.get_value()
            variable = variable.replace(jax.ShapeDtypeStruct(float_shape(kernel.shape, kernel.dtype), dtype,
                                                             sharding=getattr(kernel, "sharding", None)))
        items.append((path, variable))
    return nnx.from_flat_state(items)


def quantized_layers(params: Any) -> set[tuple]:
    """The paths of the layers of a parameter state whose kernels are quantized."""
    return _scaled(nnx.to_flat_state(params))


def quantize_like(params: Any, like: Any, *, quantize_kernel: Callable[[tuple, Any, Any], tuple] | None = None) -> Any:
    """Float parameters ``params`` quantized into the structure, dtypes and shardings of ``like``
    (a quantized state of arrays or ``ShapeDtypeStruct``s), one kernel at a time; the other
    leaves cast to ``like``'s dtypes. With ``quantize_kernel(path, kernel, scale)`` (``like``'s
    codes and scales at ``path``) -> (codes, scales), the float kernels are not in ``params``: it
    reads and quantizes each."""
    source = dict(nnx.to_flat_state(params))
    flat = nnx.to_flat_state(like)
    scaled = _scaled(flat)
    scales = {path: variable for path, variable in flat if path[-1] == SCALE}
    items = []
    for path, variable in flat:
        if path[-1] == SCALE and path[:-1] in scaled:
            continue
        target = variable.get_value()
        if path[:-1] in scaled and path[-1] == "kernel":
            scale_var = scales[path[:-1] + (SCALE,)]
            if quantize_kernel is not None:
                q, scale = quantize_kernel(path, target, scale_var.get_value())
            else:
                q, scale = quantize_array(source[path].get_value(), target, scale_var.get_value())
            items += [(path, variable.replace(q)), (path[:-1] + (SCALE,), scale_var.replace(scale))]
        else:
            value = source[path].get_value()
            items.append((path, variable.replace(value if value.dtype == target.dtype else value.astype(target.dtype))))
    return nnx.from_flat_state(items)


def quantize_array(value: jax.Array, kernel: Any, scale: Any) -> tuple[jax.Array, jax.Array]:
    """``quantize(value)`` in the format of ``kernel`` (an array or ``ShapeDtypeStruct``: int8 or
    uint8), placed as ``kernel`` and ``scale`` are."""
    kind = "nf4" if kernel.dtype == jnp.uint8 else "int8"
    shardings = (getattr(kernel, "sharding", None), getattr(scale, "sharding", None))
    key = (kind, shardings)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(functools.partial(quantize, kind=kind),
                               out_shardings=shardings if None not in shardings else None)
    return _JITTED[key](value)


_JITTED: dict = {}


def quantize_by_layer(read_layer: Callable[[int], Callable], target: Any, kernel: Any,
                      scale: Any) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of a stacked float kernel ``[layers, in, out]`` (``target``: its
    ``ShapeDtypeStruct`` with sharding; ``kernel`` and ``scale``: the quantized ones) quantized one
    layer at a time: ``read_layer(row)`` is the ``jax.make_array_from_callback`` callback of layer
    ``row`` in float32, and each layer's codes and scales are written into the stacked arrays in
    place, so the devices never hold more than one layer's float kernel."""
    stacks = [jax.jit(lambda like=like: jnp.zeros(like.shape, like.dtype), out_shardings=like.sharding)()
              for like in (kernel, scale)]
    layer_target = _layer_sharding(target.sharding)
    layer_kernel, layer_scale = (jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_layer_sharding(x.sharding))
                                 for x in (kernel, scale))
    for row in range(target.shape[0]):
        value = jax.make_array_from_callback(target.shape[1:], layer_target, read_layer(row))
        for i, part in enumerate(quantize_array(value, layer_kernel, layer_scale)):
            stacks[i] = _put_layer(stacks[i].sharding)(stacks[i], part, row)
    return stacks[0], stacks[1]


def _layer_sharding(sharding: Any) -> Any:
    """``sharding`` (of a stacked ``[layers, ...]`` array) for one layer of it."""
    if not isinstance(sharding, NamedSharding):  # one device's: the same for any shape
        return sharding
    return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))


_PUT: dict = {}


def _put_layer(sharding: Any):
    """``put(stack, layer, row)``: ``stack`` with ``layer`` at ``row``, in place (``stack`` donated)."""
    if sharding not in _PUT:
        _PUT[sharding] = jax.jit(lambda stack, layer, row: jax.lax.dynamic_update_index_in_dim(stack, layer, row, 0),
                                 donate_argnums=0, out_shardings=sharding)
    return _PUT[sharding]


def dequantized(params: Any, dtype: Any = None) -> Any:
    """``params`` with each quantized kernel read back as float in ``dtype`` and its scales left
    out: the float parameters of the same model without ``quantize_frozen``. By default ``dtype``
    is that of the other frozen weights (the run's compute dtype, as its embedding is kept)."""
    flat = nnx.to_flat_state(params)
    if dtype is None:
        floats = [v.get_value().dtype for path, v in flat
                  if path[-1] != SCALE and jnp.issubdtype(v.get_value().dtype, jnp.floating)]
        dtype = floats[0] if floats else jnp.float32
    scaled = _scaled(flat)
    scales = {path[:-1]: variable.get_value() for path, variable in flat if path[-1] == SCALE}
    items = []
    for path, variable in flat:
        if path[:-1] in scaled and path[-1] == SCALE:
            continue
        if path[:-1] in scaled and path[-1] == "kernel":
            variable = variable.replace(dequantize(variable.get_value(), scales[path[:-1]], dtype))
        items.append((path, variable))
    return nnx.from_flat_state(items)


def frozen_weight_bytes(model_cfg: Any) -> tuple[int, float]:
    """(quantized weights, their bytes with their scales) of ``model_cfg`` over all blocks; (0, 0)
    without ``quantize_frozen``."""
    kind = getattr(model_cfg, "quantize_frozen", None)
    if kind is None:
        return 0, 0.0
    from jaxtrain.config.peft import module_names
    from jaxtrain.layers.lora import layer_shapes

    shapes = layer_shapes(model_cfg)
    count, size = 0, 0.0
    for name in module_names(model_cfg):
        rows, cols = shapes[name]
        count += rows * cols
        size += rows * cols / 2 + 4 * cols * rows // nf4_block(rows) if kind == "nf4" else rows * cols + 4 * cols
    return model_cfg.n_layers * count, model_cfg.n_layers * size

"""Frozen weights in int8 (``model.quantize_frozen: int8``), for LoRA runs.

A LoRA run never updates its model's own weights, so they need only be read: stored as int8 with
one float32 scale per output column (``kernel_scale [out]``, the column's largest magnitude / 127,
values rounded to nearest) they take half the memory of bf16 and a quarter of float32. Each step
reads a block's kernels back as ``q·scale`` in the compute dtype, one layer at a time, and the
adapters train on that as on the float weights. This is weight-only, per-column absmax int8: it is
not bitsandbytes' LLM.int8() (which keeps outlier columns in float16 and multiplies in int8), so a
run differs from Foundry's ``load_in_8bit`` in the last digits of its losses, as that differs from
bf16.

Every linear layer of the blocks is quantized (whether it has an adapter or not); the embedding,
the output head, the norms, the biases and the adapters stay as they were. Weights are quantized
as they are loaded (``load_path``): from a Hugging Face folder one stacked parameter at a time,
so the device never holds the float model whole; from a jaxtrain checkpoint the float weights are
read whole first, then quantized one kernel at a time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

SCALE = "kernel_scale"  # the scale's name, beside its layer's ``kernel``
_LEVELS = 127.0


def quantize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(int8 ``q``, float32 ``scale``) with ``q·scale ≈ w`` for ``w [..., in, out]``: one scale per
    output column, its largest magnitude / 127 (1 for a column of zeros), values rounded to nearest."""
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=-2)
    scale = jnp.where(amax > 0, amax / _LEVELS, 1.0)
    q = jnp.clip(jnp.round(w / scale[..., None, :]), -_LEVELS, _LEVELS).astype(jnp.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """``q·scale`` (``q [..., in, out]`` int8, ``scale [..., out]``) in ``dtype``."""
    return (q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None, :]).astype(dtype)


def _scaled(flat: Any) -> set[tuple]:
    """The paths of the layers (``(..., "attn", "Wqkv")``) of a flat state whose kernels are quantized."""
    return {path[:-1] for path, _ in flat if path[-1] == SCALE}


def is_quantized(params: Any) -> bool:
    """Whether a parameter state (arrays or ``ShapeDtypeStruct``s) holds int8 kernels with scales."""
    return bool(_scaled(nnx.to_flat_state(params)))


def float_like(like: Any, dtype: Any = jnp.float32) -> Any:
    """``like`` (a quantized parameter state of ``ShapeDtypeStruct``s) as the float parameters it is
    made from: each int8 kernel a ``dtype`` kernel of the same sharding, its scale left out."""
    flat = nnx.to_flat_state(like)
    scaled = _scaled(flat)
    items = []
    for path, variable in flat:
        if path[:-1] in scaled and path[-1] == SCALE:
            continue
        if path[:-1] in scaled and path[-1] == "kernel":
            kernel = variable.get_value()
            variable = variable.replace(jax.ShapeDtypeStruct(kernel.shape, dtype, sharding=getattr(kernel, "sharding", None)))
        items.append((path, variable))
    return nnx.from_flat_state(items)


def quantize_like(params: Any, like: Any) -> Any:
    """Float parameters ``params`` quantized into the structure, dtypes and shardings of ``like``
    (a quantized state of arrays or ``ShapeDtypeStruct``s), one kernel at a time; the other
    leaves cast to ``like``'s dtypes."""
    source = dict(nnx.to_flat_state(params))
    flat = nnx.to_flat_state(like)
    scaled = _scaled(flat)
    scales = {path: variable for path, variable in flat if path[-1] == SCALE}
    items = []
    for path, variable in flat:
        if path[-1] == SCALE and path[:-1] in scaled:
            continue
        target, value = variable.get_value(), source[path].get_value()
        if path[:-1] in scaled and path[-1] == "kernel":
            scale_var = scales[path[:-1] + (SCALE,)]
            shardings = (getattr(target, "sharding", None), getattr(scale_var.get_value(), "sharding", None))
            q, scale = _quantize_jit(shardings)(value)
            items += [(path, variable.replace(q)), (path[:-1] + (SCALE,), scale_var.replace(scale))]
        else:
            items.append((path, variable.replace(value if value.dtype == target.dtype else value.astype(target.dtype))))
    return nnx.from_flat_state(items)


def quantize_array(value: jax.Array, kernel: Any, scale: Any) -> tuple[jax.Array, jax.Array]:
    """``quantize(value)`` placed as the ``ShapeDtypeStruct``s (or arrays) ``kernel`` and ``scale`` are."""
    return _quantize_jit((getattr(kernel, "sharding", None), getattr(scale, "sharding", None)))(value)


_JITTED: dict = {}


def _quantize_jit(shardings: tuple):
    if shardings not in _JITTED:
        _JITTED[shardings] = jax.jit(quantize, out_shardings=shardings if None not in shardings else None)
    return _JITTED[shardings]


def dequantized(params: Any, dtype: Any = None) -> Any:
    """``params`` with each int8 kernel read back as ``q·scale`` in ``dtype`` and its scale left
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


def quantized_weight_count(model_cfg: Any) -> tuple[int, int]:
    """(int8 weights, their float32 scales) of ``model_cfg`` over all blocks; (0, 0) without
    ``quantize_frozen``."""
    if getattr(model_cfg, "quantize_frozen", None) is None:
        return 0, 0
    from jaxtrain.config.peft import module_names
    from jaxtrain.layers.lora import _layer_shapes

    shapes = [_layer_shapes(model_cfg)[name] for name in module_names(model_cfg)]
    return (model_cfg.n_layers * sum(i * o for i, o in shapes), model_cfg.n_layers * sum(o for _, o in shapes))

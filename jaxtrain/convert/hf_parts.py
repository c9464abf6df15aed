"""Reading a Hugging Face MPT folder's weights part by part into sharded parameters.

Each process reads, with safetensors slices, only the parts of each tensor that its own devices
hold, and writes them straight into the parameter dtype (``jax.make_array_from_callback``): the
host never holds the model, only one parameter's local part at a time. The names, layouts and
checks are ``jaxtrain.convert.hf_mpt``'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxtrain.config.schema import ModelConfig
from jaxtrain.convert.hf_mpt import _checked_plan, _get, _set, hf_model_config
from jaxtrain.convert.safetensors_io import open_safetensors_folder
from jaxtrain.layers import quant


def read_hf_sharded(src: str, like: dict, *, scan_layers: bool = True,
                    quantize_into: dict | None = None) -> tuple[ModelConfig, dict, set[str]]:
    """(model config, pure dict of ``jax.Array``, the tensors' dtypes) of the Hugging Face MPT folder
    ``src``, each parameter laid out as the ``jax.ShapeDtypeStruct`` at its path in ``like`` (a pure
    dict) says: sharding and dtype. Each process reads only the parts of each tensor its own devices
    hold, straight from the files, so host memory holds at most one parameter's local part at a time
    (not the model in float32). Values equal ``read_hf``'s cast to the target dtype.

    ``quantize_into`` (a pure dict of ``ShapeDtypeStruct``s of the quantized parameters,
    ``jaxtrain.layers.quant``): each kernel it quantizes is read one layer at a time, in float32,
    and quantized into its place before the next layer is read, its scales set beside it; the
    device never holds more than one layer's float kernel."""
    import jax

    model_cfg = hf_model_config(src, scan_layers=scan_layers)
    with open_safetensors_folder(src) as tensors:
        prefix, plan = _checked_plan(src, tensors, model_cfg)
        by_leaf: dict[tuple, list] = {}
        for path, index, name, transpose, _ in plan:
            by_leaf.setdefault(path, []).append((index, prefix + name, transpose))
        params: dict = {}
        dtypes: set[str] = set()
        for path, entries in by_leaf.items():
            target = _get(like, path)
            layer = _get(quantize_into, path[:-1]) if quantize_into is not None and path[-1] == "kernel" else {}
            if quant.SCALE in layer:
                q, scale = _read_quantized(tensors, entries, target, layer["kernel"], layer[quant.SCALE], dtypes)
                _set(params, path, q)
                _set(params, path[:-1] + (quant.SCALE,), scale)
                continue
            part = _part_reader(tensors, entries, target.dtype, dtypes)
            _set(params, path, jax.make_array_from_callback(target.shape, target.sharding, part))
    return model_cfg, params, dtypes


def _read_quantized(tensors, entries: list, target: Any, kernel: Any, scale: Any, dtypes: set[str]):
    """(codes, scales) of one kernel (``entries`` as for ``_part_reader``; ``target`` its float
    ``ShapeDtypeStruct``, ``kernel`` and ``scale`` the quantized ones), a stacked kernel one layer
    at a time: each layer read in float32, quantized, and written into the stacked arrays."""
    import jax

    if entries[0][0] is None:  # one tensor
        value = jax.make_array_from_callback(target.shape, target.sharding,
                                             _part_reader(tensors, entries, np.float32, dtypes))
        return quant.quantize_array(value, kernel, scale)
    rows = sorted(entries, key=lambda e: e[0])
    return quant.quantize_by_layer(lambda row: _part_reader(tensors, [(None, *rows[row][1:])], np.float32, dtypes),
                                   target, kernel, scale)


def _part_reader(tensors, entries: list[tuple[int | None, str, bool]], dtype: Any, dtypes: set[str]):
    """The callback of ``jax.make_array_from_callback`` for one parameter: ``entries`` are its HF
    tensors (one, or one per layer of a stacked leaf, by layer index). A part asked for twice (a
    replicated parameter) is read once. Values are cast as through float32 (exactly so: only a
    float16 to bfloat16 cast takes that detour), one layer's part at a time."""
    stacked = entries[0][0] is not None
    names = [(name, transpose) for _, name, transpose in sorted(entries, key=lambda e: e[0] or 0)]
    cache: dict = {}

    def read(name: str, transpose: bool, index: tuple[slice, ...]) -> np.ndarray:
        value = tensors.get_slice(name, index[::-1] if transpose else index)
        dtypes.add(str(value.dtype))
        return value.T if transpose else value

    def cast(value: np.ndarray) -> np.ndarray:  # as through float32, one layer's part at a time
        if value.dtype == dtype:
            return value
        if np.float32 in (value.dtype, dtype):
            return value.astype(dtype)
        return value.astype(np.float32).astype(dtype)

    def part(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in cache:
            cache.clear()
            if stacked:  # filled layer by layer: no second copy of the stacked part
                layers = names[index[0]]
                first = cast(read(*layers[0], index[1:]))
                value = np.empty((len(layers), *first.shape), dtype)
                value[0] = first
                for row, (name, transpose) in enumerate(layers[1:], 1):
                    value[row] = cast(read(name, transpose, index[1:]))
            else:
                value = cast(read(*names[0], index))
            cache[key] = value
        return cache[key]

    return part

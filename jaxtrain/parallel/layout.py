"""How parameters lie on the mesh: a readable table, and checks that every sharded size divides."""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxtrain.parallel.mesh import MeshError


def _path_name(path: tuple) -> str:
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        if name == "value" and isinstance(key, jax.tree_util.GetAttrKey):
            continue
        parts.append(str(name))
    return "/".join(parts)


def _leaves(tree: Any) -> list[tuple[str, Any, tuple | None]]:
    """[(path, array or ShapeDtypeStruct, logical names or None)] for each parameter of ``tree``."""
    params = getattr(tree, "params", tree)  # a TrainState or the parameters themselves
    out = []
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for path, leaf in flat:
        logical = None
        if isinstance(leaf, nnx.Variable):
            metadata = leaf.get_metadata()
            logical = metadata.get("out_sharding") or metadata.get("sharding_names") or metadata.get("sharding")
            leaf = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
        out.append((_path_name(path), leaf, tuple(logical) if logical is not None else None))
    return out


def _spec_text(spec: Any) -> str:
    def one(axis):
        if axis is None:
            return "-"
        return "+".join(axis) if isinstance(axis, tuple) else str(axis)

    return "(" + ", ".join(one(axis) for axis in spec) + ")"


def describe_shardings(state_or_params: Any, shardings: Any = None) -> str:
    """One line per parameter: path, shape, logical axis names, mesh spec, bytes per device.

    ``state_or_params`` is a TrainState, an ``nnx.State`` of parameters, or any tree of arrays;
    ``shardings`` (a matching tree of NamedShardings) is needed only when the leaves are abstract
    (``jax.ShapeDtypeStruct`` without a sharding). A last line totals the bytes per device.
    """
    sharding_leaves = None
    if shardings is not None:
        sharding_leaves = [s for _, s, _ in _leaves(shardings)]
    rows = []
    total_bytes = 0
    for index, (path, leaf, logical) in enumerate(_leaves(state_or_params)):
        sharding = sharding_leaves[index] if sharding_leaves is not None else getattr(leaf, "sharding", None)
        shape = tuple(leaf.shape)
        itemsize = jax.numpy.dtype(leaf.dtype).itemsize
        if isinstance(sharding, NamedSharding):
            spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
            local_shape = sharding.shard_shape(shape)
        else:
            spec, local_shape = (None,) * len(shape), shape
        per_device = math.prod(local_shape) * itemsize
        total_bytes += per_device
        names = _spec_text(logical) if logical is not None else "?"
        rows.append((path, "[" + ", ".join(map(str, shape)) + "]", names, _spec_text(spec), _bytes(per_device)))
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(4)]
    lines = [
        f"{path:<{widths[0]}}  {shape:<{widths[1]}}  {names:<{widths[2]}}  {spec:<{widths[3]}}  {size}/device"
        for path, shape, names, spec, size in rows
    ]
    lines.append(f"total: {len(rows)} parameters, {_bytes(total_bytes)} per device")
    return "\n".join(lines)


def _bytes(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def check_param_shardings(abstract_params: Any, shardings: Any, mesh: Mesh) -> None:
    """Raise MeshError naming the first parameter whose sharded dimension does not divide evenly."""
    sharding_leaves = [s for _, s, _ in _leaves(shardings)]
    for (path, leaf, logical), sharding in zip(_leaves(abstract_params), sharding_leaves):
        for dim, axes in enumerate(sharding.spec):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            ways = math.prod(mesh.shape[axis] for axis in axes)
            size = leaf.shape[dim]
            if size % ways:
                name = f" ({logical[dim]!r})" if logical is not None and dim < len(logical) else ""
                raise MeshError(
                    f"parameter {path} {list(leaf.shape)}: dimension {dim}{name} of size {size} does not split "
                    f"over mesh axes {'x'.join(axes)} = {ways} devices; change the model size or "
                    "parallelism.logical_axis_rules"
                )


def check_model_for_mesh(model_cfg: Any, mesh: Mesh) -> None:
    """The tensor axis splits attention heads, so it must divide their number."""
    tensor = mesh.shape["tensor"]
    if tensor == 1:
        return
    heads = int(model_cfg.n_heads)
    if heads % tensor:
        raise MeshError(
            f"model.n_heads {heads} is not divisible by parallelism.tensor {tensor}; "
            f"use a tensor size that divides {heads}"
        )

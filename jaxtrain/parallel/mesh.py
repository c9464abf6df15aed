"""Build the device mesh from the ``parallelism`` section and shard state and batches over it."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain.parallel.logical import DEFAULT_RULES
from jaxtrain.parallel.shape import MESH_AXES, MeshError, mesh_shape  # noqa: F401  (re-exported)

def build_mesh(parallelism: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``data x fsdp x tensor`` mesh over ``devices`` (default: all devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(parallelism, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def axis_rules(parallelism: Any) -> tuple[tuple[str, Any], ...]:
    """The logical-to-mesh rules table: the config's if given, else the default."""
    rules = getattr(parallelism, "logical_axis_rules", None)
    if not rules:
        return DEFAULT_RULES
    return tuple((str(name), tuple(axis) if isinstance(axis, list) else axis) for name, axis in rules)


def logical_shardings(spec_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """Map a tree of logical PartitionSpecs to NamedShardings on ``mesh``."""
    return nn.logical_to_mesh_sharding(spec_tree, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split along their leading axis over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


@functools.lru_cache(maxsize=16)
def process_batch_rows(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """[start, stop): the rows of a global batch that this process's devices hold on ``mesh``."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    starts = [index[0].start or 0 for index in index_map.values()]
    stops = [global_batch_size if index[0].stop is None else index[0].stop for index in index_map.values()]
    return min(starts), max(stops)


def check_process_rows(mesh: Mesh, global_batch_size: int) -> None:
    """Raise MeshError unless process ``p`` of ``P`` holds exactly rows ``[p * n, (p + 1) * n)``, ``n = G / P``.

    The loaders give each process that contiguous block, so the mesh must put it on its devices.
    """
    processes, index = jax.process_count(), jax.process_index()
    if processes == 1:
        return
    local_rows = global_batch_size // processes
    start = index * local_rows
    held = process_batch_rows(mesh, global_batch_size)
    if global_batch_size % processes or held != (start, start + local_rows):
        raise MeshError(
            f"process {index} of {processes} loads batch rows {start}-{start + local_rows - 1} of {global_batch_size}, "
            f"but mesh {dict(mesh.shape)} puts rows {held[0]}-{held[1] - 1} on its devices; give each process "
            "whole data/fsdp slices (keep tensor within a host)"
        )


def global_batch_from_local(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble a global batch from this process's rows (its share of the global batch)."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return {key: jax.device_put(value, sharding) for key, value in local_batch.items()}
    global_rows = next(iter(local_batch.values())).shape[0] * jax.process_count()
    check_process_rows(mesh, global_rows)
    return {
        key: jax.make_array_from_process_local_data(sharding, value, (global_rows, *value.shape[1:]))
        for key, value in local_batch.items()
    }

"""Mesh axis sizes from the ``parallelism`` section, without importing JAX (config checks use it)."""

from __future__ import annotations

import math
from typing import Any

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
    """A mesh that cannot be built on the devices at hand."""


def mesh_shape(parallelism: Any, num_devices: int) -> tuple[int, int, int]:
    """Resolve the (data, fsdp, tensor) sizes; one of them may be -1 for "the rest"."""
    sizes = [int(getattr(parallelism, axis)) for axis in MESH_AXES]
    unknown = [i for i, size in enumerate(sizes) if size == -1]
    if len(unknown) > 1:
        raise MeshError("parallelism: at most one of data/fsdp/tensor may be -1")
    for axis, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise MeshError(f"parallelism.{axis}: must be a positive size or -1, got {size}")
    known = math.prod(size for size in sizes if size != -1)
    if unknown:
        if num_devices % known:
            raise MeshError(
                f"parallelism: the fixed axes ({known} devices) do not divide the {num_devices} devices available"
            )
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        shape = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
        raise MeshError(f"parallelism: mesh {shape} needs {math.prod(sizes)} devices but {num_devices} are available")
    return tuple(sizes)  # type: ignore[return-value]

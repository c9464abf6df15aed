"""A checksum of every array a checkpoint holds, saved in its ``meta`` item and checked on reading.

Orbax and TensorStore check that a checkpoint's files are complete and decode, not that their
bytes are the ones written: a bit flipped on disk (or in transit from a bucket) reads back as a
different number, and a run resumed from it would train on, or diverge, silently. Each array's
checksum is the sum over its elements of ``(2·i + 1)·w_i`` modulo 2**32, where ``w_i`` is the
element's bits as an unsigned integer and ``i`` its flat index: any change to one element changes
it (the odd factor is invertible modulo 2**32), as does moving elements about. It is computed on
the devices, one pass over the state in one program, and is the same for any sharding or
number of processes (integer sums do not depend on their order).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

META_KEY = "checksums"
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


class ChecksumMismatch(Exception):
    """An array read back differs from the one saved: the checkpoint's files are damaged."""


def leaf_names(tree: Any) -> list[str]:
    """Dotted names of the array leaves of ``tree`` (``params.blocks.attn.Wqkv.kernel``), in
    ``jax.tree.leaves`` order; NNX variables' ``value`` is left out."""
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path]
        if len(keys) > 1 and keys[-1] == "value":
            keys.pop()
        names.append(".".join(keys))
    return names


def _words(x: jax.Array) -> jax.Array:
    """``x``'s elements as unsigned 32-bit words (narrower types widened, wider ones folded)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jax.dtypes.extended):  # typed PRNG keys: their key data
        x = jax.random.key_data(x)
    width = x.dtype.itemsize
    if width == 8:  # (with jax_enable_x64) the two halves of each 64-bit word
        halves = jax.lax.bitcast_convert_type(x, jnp.uint32)
        return halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x9E3779B1))
    words = jax.lax.bitcast_convert_type(x, _UNSIGNED[width]) if x.dtype != _UNSIGNED[width] else x
    return words.astype(jnp.uint32)


def _checksum(x: jax.Array, flat_below: int = 2**32) -> jax.Array:
    words = _words(x)
    if words.size < flat_below:  # the flat index from one iota (a quarter faster on the CPU)
        words = words.reshape(-1)
        index = jax.lax.iota(jnp.uint32, words.size)
        return jnp.sum(words * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # the flat index modulo 2**32, from each axis's iota
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.sum(words * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[jax.Array]:
    return [_checksum(x) for x in leaves]


def checksums(tree: Any) -> dict[str, list]:
    """{leaf name: [dtype name, checksum]} of the device arrays of ``tree`` (any sharding)."""
    named = [(name, x) for name, x in zip(leaf_names(tree), jax.tree.leaves(tree)) if isinstance(x, jax.Array)]
    values = jax.device_get(_checksums([x for _, x in named])) if named else []
    return {name: [str(x.dtype), int(value)] for (name, x), value in zip(named, values)}


def host_checksum(array: np.ndarray, chunk: int = 1 << 22) -> int | None:
    """The checksum of a host (NumPy) array, equal to the devices' for the same values, computed a
    chunk of elements at a time (no copy of the array whole); None for 64-bit types."""
    width = array.dtype.itemsize
    if array.dtype == np.bool_:
        words = array.reshape(-1).view(np.uint8)
    elif width in (1, 2, 4):
        words = np.ascontiguousarray(array).reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[width])
    else:
        return None
    total = 0
    for start in range(0, words.size, chunk):
        part = words[start:start + chunk].astype(np.uint32)
        index = (np.arange(start, start + part.size, dtype=np.uint64) % 2**32).astype(np.uint32)
        total = (total + int(np.sum(part * (index * np.uint32(2) + np.uint32(1)), dtype=np.uint64))) % 2**32
    return total


def verify_host(name: str, array: np.ndarray, saved: dict[str, list] | None, where: str) -> None:
    """``verify`` for one array read into host memory under the leaf name ``name``."""
    if not saved or name not in saved or saved[name][0] != str(array.dtype):
        return
    value = host_checksum(array)
    if value is not None and value != int(saved[name][1]):
        raise ChecksumMismatch(f"{where}: array {name} does not match the checksum saved with it "
                               f"(its files are damaged)")


def verify(tree: Any, saved: dict[str, list] | None, where: str) -> None:
    """Raise ``ChecksumMismatch`` naming the first array of ``tree`` whose checksum differs from
    ``saved`` (the checkpoint's record). Arrays read in another dtype than they were saved in
    (a ``like`` of other dtypes), arrays the record does not name and checkpoints saved without a
    record are not checked."""
    if not saved:
        return
    wanted = [(name, x) for name, x in zip(leaf_names(tree), jax.tree.leaves(tree))
              if isinstance(x, jax.Array) and name in saved and saved[name][0] == str(x.dtype)]
    if not wanted:
        return
    for (name, _), value in zip(wanted, jax.device_get(_checksums([x for _, x in wanted]))):
        if int(saved[name][1]) != int(value):
            raise ChecksumMismatch(f"{where}: array {name} does not match the checksum saved with it "
                                   f"(its files are damaged)")

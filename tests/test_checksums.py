"""Checkpoint checksums (``jaxtrain.checkpoint.checksums``): the definition, and what they catch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.checkpoint.checksums import ChecksumMismatch, _checksum, checksums, host_checksum, verify


def reference(x: np.ndarray) -> int:
    """sum((2i + 1) * w_i) mod 2**32 over the elements' bits ``w_i``, in NumPy."""
    words = x.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64)
    index = np.arange(words.size, dtype=np.uint64)
    return int((words * (2 * index + 1)).sum() % 2**32)


def test_checksums_follow_their_definition_for_every_dtype_and_layout():
    rng = np.random.default_rng(0)
    arrays = {"f32": rng.standard_normal((3, 5, 7)).astype(np.float32),
              "bf16": rng.standard_normal((4, 9)).astype(jnp.bfloat16),
              "i8": rng.integers(-128, 127, (33,), dtype=np.int8),
              "u32": rng.integers(0, 2**32, (6, 6), dtype=np.uint32)}
    sums = checksums({name: jnp.asarray(x) for name, x in arrays.items()})
    for name, x in arrays.items():
        assert sums[name] == [str(x.dtype), reference(np.asarray(x))], name
        # arrays of 2**32 elements or more take the index from each axis: the same number
        assert int(_checksum(jnp.asarray(x), flat_below=0)) == reference(np.asarray(x)), name
        # in host memory, a few elements at a time: the same number
        assert host_checksum(np.asarray(x), chunk=4) == reference(np.asarray(x)), name
    transposed = arrays["f32"].transpose(2, 0, 1)  # not contiguous: its elements in row-major order
    assert host_checksum(transposed, chunk=8) == reference(np.ascontiguousarray(transposed))
    assert checksums({"key": jax.random.key(3)})["key"][1] == reference(np.asarray(jax.random.key_data(jax.random.key(3))))


def test_one_changed_bit_or_two_swapped_elements_are_caught_and_other_dtypes_are_not_checked():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32))
    saved = checksums({"params": {"w": x}})
    verify({"params": {"w": x}}, saved, "ckpt/3")
    flipped = np.asarray(x).copy()
    flipped.view(np.uint32)[5, 3] ^= 1 << 7
    swapped = np.asarray(x).copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    for changed in (flipped, swapped):
        with pytest.raises(ChecksumMismatch, match=r"^ckpt/3: array params.w does not match the checksum"):
            verify({"params": {"w": jnp.asarray(changed)}}, saved, "ckpt/3")
    # read into another dtype (a like of other dtypes): not comparable, so not checked
    verify({"params": {"w": x.astype(jnp.bfloat16) + 1}}, saved, "ckpt/3")
    verify({"params": {"w": jnp.asarray(flipped)}}, None, "ckpt/3")  # saved without a record

"""``TokenRows``: the pre-tokenized rows of MDS datasets for training, gathered by index from the
mapped shards (strided views where the samples are laid out alike, else each row from its own
byte position); ``ShardedRows`` is the indexing they share with the streamed datasets' rows.
"""

from __future__ import annotations

import numpy as np

from jaxtrain.config.schema import ConfigError
from jaxtrain.data.mds import encodings
from jaxtrain.data.mds.reader import MDSDataset, Shard

# LLM Foundry's older converters stored `tokens` as raw bytes of int64 ids.
DEFAULT_BYTES_TOKEN_DTYPE = "int64"


class ShardedRows:
    """Row indexing over token rows split across shards: ``rows[indices]``, ``rows[a:b]``.

    Subclasses set ``_starts`` (the first row of each shard, then the total), ``seq_len`` and
    ``shape``, and give ``_shard_view(shard)``: that shard's rows as a ``[rows, seq_len]`` array.
    """

    ndim = 2
    dtype = np.dtype(np.int32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item) -> np.ndarray:
        if isinstance(item, slice):
            indices = np.arange(*item.indices(len(self)))
        elif np.isscalar(item):
            return self[np.array([item])][0]
        else:
            indices = np.asarray(item, dtype=np.int64)
        indices = np.where(indices < 0, indices + len(self), indices)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        rows = np.empty((len(indices), self.seq_len), np.int32)
        for shard in np.unique(shards):
            mask = shards == shard
            rows[mask] = self._shard_view(int(shard))[indices[mask] - self._starts[shard]]
        return rows

    def where(self, row: int) -> str:
        """Where row ``row`` is stored: ``shard <file>, sample <n>``."""
        shard = int(np.searchsorted(self._starts, row, side="right") - 1)
        return f"shard {self._shard_name(shard)}, sample {row - int(self._starts[shard])}"

    def _shard_name(self, shard: int) -> str:
        return f"#{shard}"

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype)


class TokenRows(ShardedRows):
    """``[num_rows, seq_len]`` token rows read from the ``column`` of MDS datasets, for ``BatchLoader``.

    The column is ``ndarray`` of integers (LLM Foundry's ``--concat_tokens`` output,
    ``ndarray:int32``) or ``bytes`` of ``bytes_dtype`` ids (its older converters: int64). Every
    row must hold exactly ``seq_len`` tokens; other columns (e.g. the source text) may vary. Rows are
    strided views into the mapped shards (or, where samples differ in layout, each row's byte
    position), so indexing (``rows[indices]``, ``rows[a:b]``) gathers only the rows asked for, as int32.
    """

    def __init__(self, datasets: list[MDSDataset], *, seq_len: int, column: str = "tokens",
                 bytes_dtype: str = DEFAULT_BYTES_TOKEN_DTYPE, key: str = "train_loader.dataset"):
        self.seq_len = seq_len
        self._views: list[np.ndarray] = []
        self._paths: list[str] = []
        for dataset in datasets:
            for number in range(dataset.num_shards):
                shard = dataset.shard(number)
                view = token_view(shard, column, seq_len, np.dtype(bytes_dtype), key)
                if len(view):
                    self._views.append(view)
                    self._paths.append(shard.path)
        self._starts = np.concatenate([[0], np.cumsum([len(view) for view in self._views])]).astype(np.int64)
        self.shape = (int(self._starts[-1]), seq_len)

    def _shard_view(self, shard: int) -> np.ndarray:
        return self._views[shard]

    def _shard_name(self, shard: int) -> str:
        return self._paths[shard]


class _GatheredRows:
    """A shard's token rows whose samples differ in layout (another column of variable length):
    ``rows[indices]`` copies each row from its own byte position."""

    def __init__(self, data, positions: np.ndarray, length: int, dtype: np.dtype):
        self._bytes = np.frombuffer(data, np.uint8)
        self._positions, self._dtype = positions, dtype
        self._span = np.arange(length * dtype.itemsize, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, indices) -> np.ndarray:
        picked = self._bytes[self._positions[indices][:, None] + self._span]
        return picked.view(self._dtype).reshape(len(picked), -1)


def token_view(shard: Shard, column: str, seq_len: int, bytes_dtype: np.dtype, key: str):
    """int[n, seq_len] rows of ``column`` in every sample of ``shard``: a strided view when the
    samples are laid out alike (the usual case), else a gather by each sample's position."""
    if column not in shard.column_names:
        raise ConfigError(f"{key}: shard {shard.path} has no {column!r} column (it has {', '.join(shard.column_names)}): "
                          f"every shard of pre-tokenized rows needs one; re-write the dataset with `jaxtrain data prepare`")
    count = shard.num_samples
    if count == 0:
        return np.zeros((0, seq_len), np.int32)
    starts = shard.offsets[:-1].astype(np.int64)
    # Each sample: a uint32 size per variable-length column, then the columns in order.
    num_variable = sum(size is None for size in shard.column_sizes)
    all_bytes = np.frombuffer(shard.data, np.uint8)
    if num_variable:
        prefixes = all_bytes[starts[:, None] + np.arange(4 * num_variable)].view("<u4").astype(np.int64)
    position, variable = starts + 4 * num_variable, 0
    for name, size in zip(shard.column_names, shard.column_sizes):
        width = prefixes[:, variable] if size is None else np.full(count, size, np.int64)
        variable += size is None
        if name == column:
            break
        position = position + width
    if (width != width[0]).any():
        raise ConfigError(f"{key}: shard {shard.path} holds {column} rows of different lengths; pre-tokenized rows "
                          f"must all be {seq_len} tokens: re-run `jaxtrain data prepare --concat-tokens {seq_len}`")
    first = shard.column_bytes(shard.sample_bytes(0))[column]
    encoding = shard.column_encodings[shard.column_names.index(column)]
    if encoding.startswith("ndarray"):
        dtype, shape, header = encodings.ndarray_header(encoding, first)
        if header:
            headers = all_bytes[position[:, None] + np.arange(header)]
            if (headers != headers[0]).any():
                raise ConfigError(f"{key}: shard {shard.path} has {column} arrays of different shapes; they must all "
                                  f"be {seq_len} tokens")
        if len(shape) != 1 or dtype.kind not in "iu":
            raise ConfigError(f"{key}: shard {shard.path} column {column!r} holds {dtype.name} arrays of shape {shape}, "
                              f"not 1-D integer token rows")
        length, position = shape[0], position + header
    elif encoding == "bytes":
        dtype = bytes_dtype
        if len(first) % dtype.itemsize:
            raise ConfigError(f"{key}: shard {shard.path} column {column!r} is not a whole number of {dtype.name} "
                              f"token ids: set the token dtype (extra.token_encoding_type) the dataset was written with")
        length = len(first) // dtype.itemsize
    else:
        raise ConfigError(f"{key}: shard {shard.path} column {column!r} is {encoding}; token rows must be ndarray or "
                          f"bytes (a str column is read as text: name it 'text' or set text_field)")
    if length != seq_len:
        raise ConfigError(f"{key}: shard {shard.path} holds rows of {length} tokens but max_seq_len is {seq_len}: set "
                          f"max_seq_len to {length} or re-run `jaxtrain data prepare --concat-tokens {seq_len}`")
    steps = np.diff(position)
    if count == 1 or (steps == steps[0]).all() and steps[0] > 0:
        stride = int(steps[0]) if count > 1 else length * dtype.itemsize
        return np.ndarray((count, length), dtype, buffer=shard.data, offset=int(position[0]),
                          strides=(stride, dtype.itemsize))
    return _GatheredRows(shard.data, position, length, dtype)

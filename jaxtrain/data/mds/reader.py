"""``MDSDataset``: random access to an MDS dataset on local disk (its token rows for training are
``jaxtrain.data.mds.rows``).

A shard is opened the first time one of its samples is read: its hashes (every algorithm
``index.json`` records) are checked, a compressed shard is decompressed next to its ``.zstd``
file (as Streaming does; kept in memory when the folder is read-only), and the raw shard is
memory-mapped, so reading a sample touches only its bytes.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import mmap
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxtrain.config.schema import ConfigError
from jaxtrain.data.mds import encodings
from jaxtrain.data.mds.writer import INDEX_BASENAME
from jaxtrain.data.order import WEIGHT_KEYS, stream_weight
from jaxtrain.tempfiles import temp_path

# The keys of a ``streams`` entry read here; and those of Streaming's ``Stream`` that are not (yet).
STREAM_KEYS = ("local", "split", *WEIGHT_KEYS)
STREAMING_STREAM_KEYS = ("remote", "download_retry", "download_timeout", "validate_hash", "keep_zip")


def dataset_root(local: str, split: str | None) -> str:
    """The folder holding ``index.json``: ``local/split`` (LLM Foundry's layout), or ``local`` itself
    when it has no ``split`` sub-folder but an ``index.json`` of its own."""
    local = os.path.expanduser(local)
    if split:
        nested = os.path.join(local, split)
        if os.path.isfile(os.path.join(nested, INDEX_BASENAME)) or not os.path.isfile(os.path.join(local, INDEX_BASENAME)):
            return nested
    return local


class Shard:
    """One opened shard: its bytes (memory-mapped or in memory) and sample offsets."""

    def __init__(self, path: str, entry: dict[str, Any], data, offsets: np.ndarray):
        self.path = path
        self.column_names: list[str] = entry["column_names"]
        self.column_encodings: list[str] = entry["column_encodings"]
        self.column_sizes: list[int | None] = entry["column_sizes"]
        self.data = data
        self.offsets = offsets
        self.num_samples = len(offsets) - 1

    def sample_bytes(self, index: int) -> memoryview:
        begin, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return memoryview(self.data)[begin:end]

    def column_bytes(self, data: memoryview) -> dict[str, memoryview]:
        """Each column's bytes within one sample's bytes."""
        position, sizes = 0, []
        for size in self.column_sizes:
            if size is None:
                size = int(np.frombuffer(data, np.uint32, count=1, offset=position)[0])
                position += 4
            sizes.append(size)
        columns = {}
        for name, size in zip(self.column_names, sizes):
            columns[name] = data[position:position + size]
            position += size
        return columns

    def sample(self, index: int) -> dict[str, Any]:
        raw = self.column_bytes(self.sample_bytes(index))
        return {name: encodings.decode(encoding, raw[name]) for name, encoding in zip(self.column_names, self.column_encodings)}


class MDSDataset:
    """The samples of the MDS dataset in ``local`` (or ``local/split``), as dicts of column values.

    ``len(dataset)`` is the number of samples; ``dataset[i]`` decodes sample ``i``. With
    ``verify_hashes`` (the default), each shard's recorded hashes are checked when it is opened.
    """

    def __init__(self, local: str, split: str | None = None, *, verify_hashes: bool = True):
        self.root = dataset_root(local, split)
        self.verify_hashes = verify_hashes
        index_path = os.path.join(self.root, INDEX_BASENAME)
        try:
            with open(index_path, "rb") as handle:
                self.index_bytes = handle.read()
        except (FileNotFoundError, NotADirectoryError):
            where = f"{local} (split {split!r})" if split else local
            problem = (f"{local} is a file, not a dataset folder" if os.path.isfile(os.path.expanduser(local))
                       else f"{index_path} does not exist")
            raise ConfigError(f"no MDS dataset at {where}: {problem}; write one with `jaxtrain data prepare` or "
                              f"point local/split at a folder with an index.json") from None
        except OSError as error:
            raise ConfigError(f"{index_path}: cannot read it ({error.strerror or error})") from None
        try:
            index = json.loads(self.index_bytes)
            self.shards: list[dict[str, Any]] = index["shards"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{index_path} is not an MDS index (JSON with a 'shards' list): re-write the dataset") from None
        if not isinstance(self.shards, list):
            raise ConfigError(f"{index_path} is not an MDS index ('shards' is not a list): re-write the dataset")
        if index.get("version") != 2:
            raise ConfigError(f"{index_path} has index version {index.get('version')!r}; only version 2 is supported")
        for number, entry in enumerate(self.shards):
            self._check_entry(index_path, number, entry)
        counts = np.array([entry["samples"] for entry in self.shards], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._opened: dict[int, Shard] = {}

    def _check_entry(self, index_path: str, number: int, entry: Any) -> None:
        """Every field of a shard's index entry that the reader reads: present and of the right type."""
        if not isinstance(entry, dict):
            raise ConfigError(f"{index_path} shard {number} is {type(entry).__name__}, not an object of shard "
                              f"fields: index.json is damaged; re-write the dataset")
        raw_data = entry.get("raw_data")
        basename = raw_data.get("basename") if isinstance(raw_data, dict) else None
        where = f"{index_path} shard {number} ({basename})"

        def bad(field: str, wanted: str) -> ConfigError:
            problem = (f"has no {field!r} field" if field not in entry
                       else f"field {field!r} is {entry[field]!r}, not {wanted}")
            return ConfigError(f"{where} {problem}: index.json is damaged; re-write the dataset")

        if entry.get("format") != "mds" or entry.get("version") != 2:
            raise ConfigError(f"{where} is format {entry.get('format')!r} version {entry.get('version')!r}; "
                              f"only MDS version 2 shards are supported")
        samples = entry.get("samples")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise bad("samples", "a sample count (an integer >= 0)")
        names = entry.get("column_names")
        if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
            raise bad("column_names", "a list of column names")
        lists = {"column_encodings": ("encoding names", lambda v: isinstance(v, str)),
                 "column_sizes": ("byte sizes or nulls", lambda v: v is None or type(v) is int and v >= 0)}
        for field, (what, valid) in lists.items():
            values = entry.get(field)
            if not isinstance(values, list) or len(values) != len(names) or not all(map(valid, values)):
                raise bad(field, f"a list of {what}, one per column of column_names")
        for name, encoding in zip(entry["column_names"], entry["column_encodings"]):
            encodings.check_encoding(encoding, where=f"{where} column {name!r}")
        if not (entry.get("compression") is None or isinstance(entry["compression"], str)):
            raise bad("compression", "null or a compression name such as 'zstd'")
        try:
            encodings.parse_compression(entry.get("compression"))
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        for field in ("raw_data", "zip_data"):
            info = entry.get(field)
            if field == "zip_data" and info is None:
                continue
            if (not isinstance(info, dict) or not isinstance(info.get("basename"), str) or not info["basename"]
                    or isinstance(info.get("bytes"), bool) or not isinstance(info.get("bytes"), (int, type(None)))
                    or not isinstance(info.get("hashes"), (dict, type(None)))):
                raise bad(field, "an object with a file 'basename', its 'bytes' and 'hashes'"
                          + (" (or null)" if field == "zip_data" else ""))

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def columns(self) -> dict[str, str]:
        """Column name -> encoding, from the first shard."""
        if not self.shards:
            return {}
        return dict(zip(self.shards[0]["column_names"], self.shards[0]["column_encodings"]))

    @property
    def fingerprint(self) -> str:
        """A hex digest of the dataset's location and its index (changes when the dataset is re-written)."""
        return hashlib.sha1(os.path.realpath(self.root).encode() + b"\0" + self.index_bytes).hexdigest()

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, sample within that shard) of global sample ``index``."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside this dataset of {len(self)} samples")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, local_index = self.locate(int(index))
        return self.shard(shard).sample(local_index)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for number in range(self.num_shards):
            shard = self.shard(number)
            for local_index in range(shard.num_samples):
                yield shard.sample(local_index)

    def shard_start(self, number: int) -> int:
        """Global index of shard ``number``'s first sample."""
        return int(self._starts[number])

    def shard(self, number: int) -> Shard:
        """Shard ``number``, opened (hash-checked, decompressed, mapped) on first use."""
        if number not in self._opened:
            self._opened[number] = self._open(number)
        return self._opened[number]

    def _verify(self, path: str, data, info: dict[str, Any]) -> None:
        if info.get("bytes") is not None and len(data) != info["bytes"]:
            raise ConfigError(f"shard {path} is {len(data)} bytes but index.json records {info['bytes']}: the file is "
                              f"truncated or was changed; re-download or re-write the dataset")
        if not self.verify_hashes:
            return
        for algo, expected in sorted((info.get("hashes") or {}).items()):
            actual = encodings.file_hash(algo, data)
            if actual != expected:
                raise ConfigError(f"shard {path} fails its {algo} check (index.json records {expected}, the file "
                                  f"hashes to {actual}): the file is corrupt; re-download or re-write the dataset")

    def _open(self, number: int) -> Shard:
        entry = self.shards[number]
        raw_info, zip_info = entry["raw_data"], entry.get("zip_data")
        raw_path = os.path.join(self.root, raw_info["basename"])
        if os.path.isfile(raw_path):
            data = _read(raw_path)
        elif zip_info and os.path.isfile(os.path.join(self.root, zip_info["basename"])):
            zip_path = os.path.join(self.root, zip_info["basename"])
            zipped = _read(zip_path)
            self._verify(zip_path, zipped, zip_info)
            try:
                data = encodings.decompress(entry["compression"], bytes(zipped))
            except Exception as error:
                if isinstance(error, ConfigError):
                    raise
                raise ConfigError(f"shard {zip_path} does not decompress as {entry['compression']} ({error}): "
                                  f"re-download or re-write the dataset") from None
            data = _keep_decompressed(raw_path, data)
        else:
            missing = zip_info["basename"] if zip_info else raw_info["basename"]
            raise ConfigError(f"shard {os.path.join(self.root, missing)} is listed in index.json but missing: "
                              f"re-download or re-write the dataset")
        self._verify(raw_path, data, raw_info)
        count = int(np.frombuffer(data, np.uint32, count=1)[0]) if len(data) >= 4 else -1
        if count != int(entry["samples"]) or len(data) < 4 * (count + 2):
            raise ConfigError(f"shard {raw_path} holds {count} samples but index.json records {entry['samples']}: "
                              f"the shard and index do not belong together; re-write the dataset")
        offsets = np.frombuffer(data, np.uint32, count=count + 1, offset=4)
        if count and (int(offsets[-1]) > len(data) or (np.diff(offsets.astype(np.int64)) < 0).any()):
            raise ConfigError(f"shard {raw_path} has sample offsets outside the file: it is corrupt; re-write it")
        return Shard(raw_path, entry, data, offsets)

    def texts(self, column: str = "text") -> Iterator[str]:
        """The ``column`` of every sample, in order (a str column)."""
        for number in range(self.num_shards):
            shard = self.shard(number)
            if column not in shard.column_names:
                raise ConfigError(f"shard {shard.path} has no column {column!r} (it has {', '.join(shard.column_names)}): "
                                  f"set text_field to the column holding the text")
            encoding = shard.column_encodings[shard.column_names.index(column)]
            for local_index in range(shard.num_samples):
                value = encodings.decode(encoding, shard.column_bytes(shard.sample_bytes(local_index))[column])
                yield value.decode("utf-8") if isinstance(value, bytes) else str(value)


def mds_datasets(dataset, *, key: str) -> list[MDSDataset]:
    """The local MDS datasets a ``DatasetConfig`` names: ``local``/``split``, or each of its ``streams``.

    A stream may carry one of Streaming's weights (``proportion``, ``repeat``, ``choose``); they
    are checked here and applied by the loader's sample order (``jaxtrain.data.order``).
    """
    if dataset.remote:
        raise ConfigError(f"{key}.remote is set, but streaming MDS from remote storage is not supported yet: copy the "
                          f"dataset to local disk (e.g. `aws s3 sync`) and set {key}.local")
    verify = bool((dataset.extra or {}).get("validate_hash", True))
    if not dataset.streams:
        if not dataset.local:
            raise ConfigError(f"{key}.local is not set: give the folder of an MDS dataset (the one with index.json)")
        return [MDSDataset(dataset.local, dataset.split, verify_hashes=verify)]
    datasets = []
    for name, stream in dataset.streams.items():
        if not isinstance(stream, (dict, type(None))):
            raise ConfigError(f"{key}.streams.{name} is {stream!r}: each stream is a mapping of keys "
                              f"({', '.join(STREAM_KEYS)}), e.g. {{local: /data/mds}}")
        stream = dict(stream or {})
        unsupported = sorted(set(stream) - set(STREAM_KEYS), key=str)
        for unknown in unsupported:
            if unknown in STREAMING_STREAM_KEYS:
                continue
            close = difflib.get_close_matches(str(unknown), STREAM_KEYS, n=1, cutoff=0.6)
            hint = (f"did you mean '{key}.streams.{name}.{close[0]}'?" if close
                    else f"valid keys: {', '.join(STREAM_KEYS)}")
            raise ConfigError(f"unknown key '{key}.streams.{name}.{unknown}'; {hint}")
        if unsupported or stream.get("remote"):
            unsupported = unsupported or ["remote"]
            raise ConfigError(f"{key}.streams.{name}: {', '.join(unsupported)} not supported yet; streams are read "
                              f"from local folders (keys: {', '.join(STREAM_KEYS)})")
        stream_weight(str(name), stream, key)  # at most one weight, none negative
        if not stream.get("local"):
            raise ConfigError(f"{key}.streams.{name}.local is not set: give the folder of an MDS dataset")
        datasets.append(MDSDataset(stream["local"], stream.get("split", dataset.split), verify_hashes=verify))
    return datasets


def _read(path: str):
    """The file's bytes, memory-mapped read-only (empty files as b"")."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return b""
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def _keep_decompressed(raw_path: str, data: bytes):
    """Write the decompressed shard beside its compressed file and map it; in memory if the folder is read-only."""
    tmp = temp_path(raw_path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, raw_path)
    except OSError:
        return data
    return _read(raw_path)

"""``MDSWriter``: samples in, ``index.json`` and ``shard.NNNNN.mds[.zstd]`` files out, as Streaming writes them.

A shard is ``uint32 n``, ``uint32 offsets[n + 1]`` (absolute byte positions of each sample),
the shard's JSON config, then the samples; a sample is a ``uint32`` size for each variable-size
column, then every column's bytes, columns in name order. A shard is closed before it would
exceed ``size_limit``. ``index.json`` is written last, so a folder with one holds a finished
dataset. An ``out`` URL (``s3://``, ``gs://``, ``memory://`` ...) is written to a local
temporary folder and uploaded with fsspec, index last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from types import TracebackType
from typing import Any

import numpy as np

from jaxtrain.config.schema import ConfigError
from jaxtrain.data.mds import encodings

INDEX_BASENAME = "index.json"
DEFAULT_SIZE_LIMIT = 1 << 26
_SIZE_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}


def parse_size(size: int | str | None) -> int | None:
    """Bytes in ``size``: an int, or a string such as ``"64mb"`` or ``"100kb"`` (powers of 1024)."""
    if size is None or size == 0:
        return None
    if isinstance(size, (int, float)):
        value = int(size)
    else:
        match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?b)?\s*", str(size).lower())
        if not match:
            raise ConfigError(f"size limit {size!r} is not a size: write bytes or e.g. 64mb, 512kb")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or "b"])
    if not 0 < value < 1 << 32:
        raise ConfigError(f"size limit {size!r} must be positive and below 4gb (shard offsets are uint32)")
    return value


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class MDSWriter:
    """Write an MDS dataset that MosaicML Streaming (and ``MDSDataset``) can read.

    ``columns`` maps column names to MDS encodings (``{"tokens": "ndarray:int32"}``).
    ``compression`` is e.g. ``"zstd"`` or ``"zstd:7"``; ``hashes`` are hash algorithms
    (``["sha1", "xxh64"]``) recorded for every shard file. Use as a context manager, or call
    ``finish()``: leaving the ``with`` block on an exception writes no ``index.json``.
    """

    format = "mds"

    def __init__(self, out: str, columns: dict[str, str], *, compression: str | None = None,
                 hashes: list[str] | tuple[str, ...] | None = None, size_limit: int | str | None = DEFAULT_SIZE_LIMIT,
                 exist_ok: bool = False):
        if not columns:
            raise ConfigError("MDSWriter needs at least one column")
        for name, encoding in columns.items():
            encodings.check_encoding(encoding, where=f"column {name!r}")
        encodings.parse_compression(compression)
        hashes = list(hashes or [])
        if hashes != sorted(set(hashes)):
            raise ConfigError(f"hashes {hashes} must be unique and sorted (Streaming requires it): use {sorted(set(hashes))}")
        for algo in hashes:
            encodings.check_hash(algo)
        self.out = out
        self.compression = compression or None
        self.hashes = hashes
        self.size_limit = parse_size(size_limit)
        self.column_names = sorted(columns)
        self.column_encodings = [columns[name] for name in self.column_names]
        self.column_sizes = [encodings.encoded_size(encoding) for encoding in self.column_encodings]
        self.remote = out if is_remote(out) else None
        self.local = tempfile.mkdtemp(prefix="jaxtrain-mds-") if self.remote else os.path.expanduser(out)
        if not self.remote:
            self._prepare_local(exist_ok)
        self.config_bytes = json.dumps(self._config(), sort_keys=True).encode("utf-8")
        self.shards: list[dict[str, Any]] = []
        self.num_samples = 0
        self._samples: list[bytes] = []
        self._shard_size = 0
        self._finished = False
        self._reset()

    def _prepare_local(self, exist_ok: bool) -> None:
        if os.path.isdir(self.local) and os.listdir(self.local):
            if not exist_ok:
                raise ConfigError(f"{self.local} exists and is not empty: choose an empty folder or overwrite it "
                                  f"(exist_ok=True; --overwrite for jaxtrain data prepare)")
            shutil.rmtree(self.local)
        os.makedirs(self.local, exist_ok=True)

    def _config(self) -> dict[str, Any]:
        return {"version": 2, "format": self.format, "compression": self.compression, "hashes": self.hashes,
                "size_limit": self.size_limit, "column_names": self.column_names,
                "column_encodings": self.column_encodings, "column_sizes": self.column_sizes}

    def _reset(self) -> None:
        self._samples = []
        self._shard_size = 4 + 4 + len(self.config_bytes)

    def encode_sample(self, sample: dict[str, Any]) -> bytes:
        """One sample's bytes: the sizes of its variable-size columns, then each column's bytes."""
        sizes, parts = [], []
        for name, encoding, size in zip(self.column_names, self.column_encodings, self.column_sizes):
            if name not in sample:
                raise ConfigError(f"sample {self.num_samples} has no column {name!r} (columns: {self.column_names})")
            try:
                data = encodings.encode(encoding, sample[name])
            except (TypeError, ValueError, OverflowError) as error:
                raise ConfigError(f"sample {self.num_samples}, column {name!r} ({encoding}): {error}") from None
            if size is None:
                sizes.append(len(data))
            elif size != len(data):
                raise ConfigError(f"sample {self.num_samples}, column {name!r}: {len(data)} bytes, expected {size} "
                                  f"for {encoding}")
            parts.append(data)
        return np.array(sizes, np.uint32).tobytes() + b"".join(parts)

    def write(self, sample: dict[str, Any]) -> None:
        """Add one sample (a dict with every column); may close the current shard first."""
        data = self.encode_sample(sample)
        sample_size = len(data) + 4
        if self._samples and self.size_limit and self.size_limit < self._shard_size + sample_size:
            self._flush()
        self._samples.append(data)
        self._shard_size += sample_size
        self.num_samples += 1

    def _flush(self) -> None:
        sizes = np.array([0] + [len(sample) for sample in self._samples], np.int64)
        header = 4 + 4 * len(sizes) + len(self.config_bytes)
        offsets = (np.cumsum(sizes) + header).astype(np.uint32)
        raw = np.uint32(len(self._samples)).tobytes() + offsets.tobytes() + self.config_bytes + b"".join(self._samples)
        raw_basename = f"shard.{len(self.shards):05d}.{self.format}"
        raw_info = self._file_info(raw_basename, raw)
        zip_info = None
        if self.compression:
            zip_basename = f"{raw_basename}.{encodings.compression_extension(self.compression)}"
            zipped = encodings.compress(self.compression, raw)
            zip_info = self._file_info(zip_basename, zipped)
            self._write_file(zip_basename, zipped)
        else:
            self._write_file(raw_basename, raw)
        shard = {"samples": len(self._samples), "raw_data": raw_info, "zip_data": zip_info}
        shard.update(self._config())
        self.shards.append(shard)
        self._reset()

    def _file_info(self, basename: str, data: bytes) -> dict[str, Any]:
        return {"basename": basename, "bytes": len(data),
                "hashes": {algo: encodings.file_hash(algo, data) for algo in self.hashes}}

    def _write_file(self, basename: str, data: bytes) -> None:
        path = os.path.join(self.local, basename)
        with open(path, "wb") as handle:
            handle.write(data)
        if self.remote:
            upload_file(path, f"{self.remote.rstrip('/')}/{basename}")
            os.remove(path)

    def finish(self) -> None:
        """Close the last shard and write ``index.json`` (idempotent)."""
        if self._finished:
            return
        if self._samples:
            self._flush()
        index = json.dumps({"version": 2, "shards": self.shards}, sort_keys=True)
        path = os.path.join(self.local, INDEX_BASENAME)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(index)
        if self.remote:
            upload_file(path, f"{self.remote.rstrip('/')}/{INDEX_BASENAME}")
            shutil.rmtree(self.local, ignore_errors=True)
        self._finished = True

    def __enter__(self) -> MDSWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc_type is None:
            self.finish()
        elif self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def upload_file(path: str, url: str) -> None:
    """Copy the local file ``path`` to ``url``: boto3 for ``s3://`` (as streaming reads it), fsspec otherwise."""
    from jaxtrain.data.remote import ObjectStore  # imported here: remote.py builds on this module

    prefix, _, name = url.rstrip("/").rpartition("/")
    try:
        ObjectStore(prefix).put(path, name)
    except ConfigError:
        raise
    except ImportError as error:
        raise ConfigError(f"writing to {url} needs a filesystem package fsspec could not import ({error})") from None
    except Exception as error:  # noqa: BLE001 - any storage failure becomes one line naming the URL
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"could not write {url} ({first}): check the URL, credentials and endpoint") from None

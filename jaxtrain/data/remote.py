"""MDS datasets streamed from object storage (``s3://``, ``gs://``) through a bounded local cache.

``remote`` names the dataset's folder (``remote/split`` in LLM Foundry's layout, or ``remote``
itself when it holds the ``index.json``). Its ``index.json`` is downloaded first; a shard is
downloaded into ``local`` the first time one of its samples is read, and the shards the next
batches need are predownloaded by a background thread. ``extra`` carries Streaming's options:
``download_retry`` (default 2, exponential backoff), ``cache_limit`` (e.g. ``"100mb"``: the least
recently used shards are deleted to stay under it), ``keep_local`` (default false: the cache is
deleted when the loader closes or the process exits; true keeps it for the next run),
``predownload`` (rows of the upcoming batches whose shards are fetched ahead, default 256; 0 for
none). Booleans may be written as true/false, yes/no or 1/0 (strings too, as values read from the
environment are); a value that is none of these, or a count that is not a whole number, is a
one-line ``ConfigError`` naming ``extra.<key>``. A key that neither jaxtrain nor Streaming reads
is a one-line warning naming the nearest known one.

A downloaded shard that fails its checks (size, or the hashes ``index.json`` records unless
``validate_hash`` is false) is deleted and downloaded once more; failing again is a one-line
``ConfigError`` naming the shard's URL.

Training shuffles rows across the whole dataset, so a shard evicted under ``cache_limit`` may be
downloaded again later in the epoch; the limit bounds disk use, not traffic.

``s3://`` goes through boto3, whose credentials and endpoint come from the standard AWS
environment and config files (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``; ``S3_ENDPOINT_URL`` is
honoured too); ``gs://`` goes through fsspec (gcsfs), as does any other scheme fsspec knows
(``jaxtrain.data.object_store``); a scheme it does not know is refused up front, as is a URL
without a bucket. A missing bucket or object, or access denied, is reported at once; other
download failures (network, throttling) are retried.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import hashlib
import os
import re
import shutil
import sys
import tempfile
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jaxtrain.config.foundry_data import STREAMING_OPTIONS
from jaxtrain.config.schema import ConfigError, DatasetConfig
from jaxtrain.data.mds.reader import MDSDataset, mds_datasets
from jaxtrain.data.mds.rows import DEFAULT_BYTES_TOKEN_DTYPE, ShardedRows, token_view
from jaxtrain.data.mds.writer import _SIZE_UNITS, INDEX_BASENAME, is_remote
from jaxtrain.data.object_store import (  # noqa: F401 - also imported from here
    DEFAULT_DOWNLOAD_RETRY, DEFAULT_PREDOWNLOAD_ROWS, ObjectStore, RemoteDenied, RemoteMissing, describe_error,
    download_with_retry, store_url_problem)


class RemoteMDSDataset(MDSDataset):
    """An ``MDSDataset`` whose shards are downloaded from ``remote`` on first use into a bounded cache."""

    def __init__(self, remote: str, local: str | None, split: str | None, *, verify_hashes: bool = True,
                 retries: int = DEFAULT_DOWNLOAD_RETRY, cache_limit: int | None = None, keep_local: bool = False,
                 key: str = "train_loader.dataset"):
        self.remote_url, self.retries, self.cache_limit, self.key = remote.rstrip("/"), retries, cache_limit, key
        problem = store_url_problem(self.remote_url, local=f"a local copy of the dataset in {key}.local")
        if problem:
            raise ConfigError(f"{key}.remote={remote}: {problem}")
        created = local is None
        local = tempfile.mkdtemp(prefix="jaxtrain-mds-") if created else os.path.expanduser(local)
        try:
            self.store, root = self._fetch_index(local, split)
        except BaseException:
            if created:
                shutil.rmtree(local, ignore_errors=True)
            raise
        try:
            super().__init__(root, None, verify_hashes=verify_hashes)
        except ConfigError as error:  # a damaged index: named by its URL, not by the cache's copy
            os.remove(os.path.join(root, INDEX_BASENAME))
            if created:
                shutil.rmtree(local, ignore_errors=True)
            text = str(error).replace(os.path.join(root, INDEX_BASENAME), self.store.where(INDEX_BASENAME))
            text = text.replace("re-write the dataset", f"upload it again, or write the dataset there again with "
                                                        f"jaxtrain data prepare --out {self.remote_url}")
            raise ConfigError(f"{key}.remote: {text}") from None
        self._lock = threading.Lock()
        self._shard_locks = collections.defaultdict(threading.Lock)
        self._cached: collections.OrderedDict[int, list[str]] = collections.OrderedDict()  # LRU: shard -> files
        self._downloading: dict[int, int] = {}  # shard -> bytes
        self._cleanup = None if keep_local else weakref.finalize(self, _remove_cache, root, local if created else None)

    def _fetch_index(self, local: str, split: str | None) -> tuple[ObjectStore, str]:
        """Download ``index.json`` from ``remote/split`` or else ``remote``; returns the store that
        has it and the local folder it went to. Neither having it is one line naming both URLs (or
        the missing bucket); other failures are retried, then reported, at the first URL."""
        candidates = [(f"{self.remote_url}/{split}", os.path.join(local, split))] if split else []
        candidates.append((self.remote_url, local))  # the dataset sits at remote itself
        failed: list[RemoteMissing | RemoteDenied] = []
        for url, root in candidates:
            store = ObjectStore(url)
            try:
                download_with_retry(store, INDEX_BASENAME, os.path.join(root, INDEX_BASENAME), retries=self.retries,
                                    what=f"{self.key}.remote")
                return store, root
            except (RemoteMissing, RemoteDenied) as error:
                failed.append(error)
        where = f"{self.key}.remote={self.remote_url}"
        tried = " or ".join(error.url for error in failed)
        denied = [error for error in failed if isinstance(error, RemoteDenied)]
        if denied:
            hint = (" (S3 answers 403 for a missing object too when the credentials may not list the bucket)"
                    if any("(403)" in error.error for error in denied) else "")
            raise ConfigError(f"{where}: cannot read {tried} ({denied[0].error}): access denied or no credentials"
                              f"{hint}; check the credentials, the endpoint and the bucket's permissions, and "
                              f"the URL") from None
        bucket = store.missing_bucket()
        if bucket:
            raise ConfigError(f"{where}: {bucket}; check the bucket's name in the URL, and that the endpoint and "
                              f"credentials are those of the account that has it") from None
        folder = "the folder holding index.json" + (f" (or its {split} folder)" if split else "")
        raise ConfigError(f"{where}: no index.json at {tried}; point remote at {folder}, or write the dataset "
                          f"there with jaxtrain data prepare --out {self.remote_url}") from None

    @property
    def fingerprint(self) -> str:
        """Keyed by the remote URL and its index, so packed-row caches outlive the shard cache."""
        return hashlib.sha1(self.store.url.encode() + b"\0" + self.index_bytes).hexdigest()

    def _files(self, number: int) -> list[dict]:
        entry = self.shards[number]
        return [info for info in (entry.get("zip_data") or entry["raw_data"], entry["raw_data"]) if info]

    def cached_bytes(self) -> int:
        total = 0
        for name in os.listdir(self.root):
            if name != INDEX_BASENAME:
                total += os.path.getsize(os.path.join(self.root, name))
        return total

    def fetch(self, number: int, *, only_if_room: bool = False) -> bool:
        """Download shard ``number`` unless cached; evicts older shards to fit ``cache_limit``."""
        entry = self.shards[number]
        info = entry.get("zip_data") or entry["raw_data"]
        size = int(info.get("bytes") or 0) + (int(entry["raw_data"].get("bytes") or 0) if entry.get("zip_data") else 0)
        if self.cache_limit is not None and size > self.cache_limit:
            raise ConfigError(f"{self.key}: shard {self.store.where(info['basename'])} needs {size} bytes of cache but "
                              f"extra.cache_limit is {self.cache_limit}: raise extra.cache_limit")
        with self._shard_locks[number]:
            with self._lock:
                if number in self._cached:
                    self._cached.move_to_end(number)
                    return True
                if only_if_room and self.cache_limit is not None and self._used() + size > self.cache_limit:
                    return False
                self._evict(size, keep=number)
                self._downloading[number] = size  # counted against the limit while it downloads
            try:
                download_with_retry(self.store, info["basename"], os.path.join(self.root, info["basename"]),
                                    retries=self.retries, what=f"{self.key} shard {number}",
                                    retry_missing=True)  # listed in the index: an upload may still be writing it
            finally:
                with self._lock:
                    del self._downloading[number]
            with self._lock:
                self._cached[number] = [file["basename"] for file in (info, entry["raw_data"])]
        return True

    def _used(self) -> int:
        return sum(self._downloading.values()) + sum(int(self.shards[n]["raw_data"].get("bytes") or 0)
                   + int((self.shards[n].get("zip_data") or {}).get("bytes") or 0) for n in self._cached)

    def _evict(self, incoming: int, keep: int) -> None:
        """Delete least recently used shards until ``incoming`` more bytes fit (lock held)."""
        if self.cache_limit is None:
            return
        for number in list(self._cached):
            if self._used() + incoming <= self.cache_limit:
                return
            if number == keep:
                continue
            self._opened.pop(number, None)  # mapped bytes stay valid until their last view goes
            for name in set(self._cached.pop(number)):
                try:
                    os.remove(os.path.join(self.root, name))
                except FileNotFoundError:
                    pass

    def _verify(self, path: str, data, info: dict) -> None:
        super()._verify(path, data, {name: value for name, value in info.items() if name != "hashes"})  # the size
        try:
            super()._verify(path, data, {"hashes": info.get("hashes")})
        except ConfigError as error:
            raise HashMismatch(str(error)) from None

    def _open(self, number: int):
        """Open a downloaded shard; one that fails its checks is deleted and downloaded once more."""
        try:
            return super()._open(number)
        except ConfigError:
            self._discard(number)
        self.fetch(number)
        try:
            return super()._open(number)
        except ConfigError as error:
            self._discard(number)
            info = self.shards[number].get("zip_data") or self.shards[number]["raw_data"]
            skip = (", or set extra.validate_hash: false to read it unchecked" if isinstance(error, HashMismatch)
                    else "")
            raise ConfigError(f"{self.key}: shard {self.store.where(info['basename'])} failed its checks again after a "
                              f"fresh download ({_reason(error)}): the remote copy is corrupt; re-upload it or "
                              f"regenerate the dataset{skip}") from None

    def _discard(self, number: int) -> None:
        """Forget shard ``number`` and delete its files from the local cache."""
        with self._lock:
            self._opened.pop(number, None)
            self._cached.pop(number, None)
        for info in self._files(number):
            try:
                os.remove(os.path.join(self.root, info["basename"]))
            except FileNotFoundError:
                pass

    def shard(self, number: int):
        if number not in self._opened:
            self.fetch(number)
        else:
            with self._lock:
                if number in self._cached:
                    self._cached.move_to_end(number)
        return super().shard(number)

    def close(self) -> None:
        """Delete the local cache now (unless ``keep_local``)."""
        self._opened.clear()
        if self._cleanup is not None:
            self._cleanup()


class HashMismatch(ConfigError):
    """A shard whose bytes do not hash to what its index records."""


def _reason(error: ConfigError) -> str:
    """What went wrong, without the advice meant for a local dataset (which follows the colon)."""
    text = str(error).strip().splitlines()[0]
    return text.rsplit(": ", 1)[0] if ": " in text else text


def _remove_cache(root: str, created: str | None) -> None:
    shutil.rmtree(created or root, ignore_errors=True)


class StreamingTokenRows(ShardedRows):
    """``TokenRows`` over ``RemoteMDSDataset``s: rows are gathered shard by shard, downloading on demand.

    Row ``i`` is the same row ``TokenRows`` would give for a local copy, so batches match exactly.
    ``prefetch(indices)`` downloads the shards those rows live in on a background thread.
    """

    def __init__(self, datasets: list[RemoteMDSDataset], *, seq_len: int, column: str = "tokens",
                 bytes_dtype: str = DEFAULT_BYTES_TOKEN_DTYPE, predownload: int = DEFAULT_PREDOWNLOAD_ROWS,
                 key: str = "train_loader.dataset"):
        self.datasets, self.seq_len, self.column, self.key = datasets, seq_len, column, key
        self.bytes_dtype, self.predownload = np.dtype(bytes_dtype), predownload
        self._shards = [(dataset, number) for dataset in datasets for number in range(dataset.num_shards)
                        if int(dataset.shards[number]["samples"])]
        counts = [int(dataset.shards[number]["samples"]) for dataset, number in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.shape = (int(self._starts[-1]), seq_len)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mds-predownload")
        self._pending: set[int] = set()

    def _shard_view(self, shard: int) -> np.ndarray:
        dataset, number = self._shards[shard]
        return token_view(dataset.shard(number), self.column, self.seq_len, self.bytes_dtype, self.key)

    def _shard_name(self, shard: int) -> str:
        dataset, number = self._shards[shard]
        return dataset.store.where(dataset.shards[number]["raw_data"]["basename"])

    def prefetch(self, indices: np.ndarray) -> None:
        """Start downloading the shards holding rows ``indices`` (as far as the cache has room)."""
        shards = np.unique(np.searchsorted(self._starts, np.asarray(indices, np.int64), side="right") - 1)
        for shard in shards.tolist():
            if shard not in self._pending:
                self._pending.add(shard)
                self._pool.submit(self._fetch, shard)

    def _fetch(self, shard: int) -> None:
        dataset, number = self._shards[shard]
        try:
            dataset.fetch(number, only_if_room=True)
        except Exception:
            pass  # the read that needs this shard downloads it again and reports the failure
        finally:
            self._pending.discard(shard)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for dataset in self.datasets:
            dataset.close()


def open_mds_datasets(dataset, *, key: str) -> list[MDSDataset]:
    """The MDS datasets a ``DatasetConfig`` names: streamed from ``remote`` when it is set, else local."""
    extra = dataset.extra or {}
    warn_unknown_extra(extra, key)
    if "validate_hash" in extra:  # read as a boolean here, so that "false" (from ${oc.env:...}) is false
        extra = dict(extra, validate_hash=bool_option(extra, "validate_hash", key, True))
        dataset = dataclasses.replace(dataset, extra=extra)
    if not dataset.remote:
        return mds_datasets(dataset, key=key)
    if dataset.streams:
        raise ConfigError(f"{key}: remote and streams together are not supported: stream one remote dataset, or "
                          f"copy the streams to local folders")
    if not is_remote(dataset.remote):
        raise ConfigError(f"{key}.remote={dataset.remote!r} is not a URL: give s3://bucket/path (or gs://...), or "
                          f"set local instead")
    problem = store_url_problem(dataset.remote, local=f"a local copy of the dataset in {key}.local")
    if problem:
        raise ConfigError(f"{key}.remote={dataset.remote}: {problem}")
    retries = int_option(extra, "download_retry", key, DEFAULT_DOWNLOAD_RETRY)
    cache_limit = parse_cache_limit(extra.get("cache_limit"), key)
    keep_local = bool_option(extra, "keep_local", key, False)
    int_option(extra, "predownload", key, DEFAULT_PREDOWNLOAD_ROWS)  # read by token_rows: checked before any download
    return [RemoteMDSDataset(dataset.remote, dataset.local, dataset.split,
                             verify_hashes=bool_option(extra, "validate_hash", key, True), retries=retries,
                             cache_limit=cache_limit, keep_local=keep_local, key=key)]


_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def bool_option(extra: dict, name: str, key: str, default: bool) -> bool:
    """``extra[name]`` as a boolean: true/false, or the strings true/false/yes/no/1/0 (any case), as a
    value read from the environment arrives; unset or empty is ``default``."""
    value = extra.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"{key}.extra.{name}={value!r} is not a boolean: write true or false")


def int_option(extra: dict, name: str, key: str, default: int) -> int:
    """``extra[name]`` as a whole number >= 0 (an int, or a string of digits as the environment gives
    it); unset or empty is ``default``."""
    value = extra.get(name)
    if value is None or value == "":
        return default
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
        number = int(value)
    if number is None:
        raise ConfigError(f"{key}.extra.{name}={value!r} is not a whole number: write e.g. "
                          f"{name}: {_EXAMPLES.get(name, 2)}")
    if number < 0:
        raise ConfigError(f"{key}.extra.{name}={value!r} is negative: write 0 or more")
    return number


_EXAMPLES = {"download_retry": DEFAULT_DOWNLOAD_RETRY, "predownload": DEFAULT_PREDOWNLOAD_ROWS}
# What jaxtrain reads from an MDS dataset's extra besides Streaming's own options (which it
# accepts, reading those it has a use for).
_JAXTRAIN_EXTRA = ("keep_local",)
_warned: set[tuple[str, str]] = set()


def warn_unknown_extra(extra: dict, key: str) -> None:
    """A one-line warning (once a process) for each ``extra`` key neither jaxtrain nor Streaming reads,
    naming the nearest known key. Not an error: ``extra`` is where Streaming's options are passed
    through, and a newer Streaming may have more of them."""
    known = (*STREAMING_OPTIONS, *_JAXTRAIN_EXTRA)
    fields = [field.name for field in dataclasses.fields(DatasetConfig)]
    for name in extra:
        name = str(name)
        if name in known or (key, name) in _warned:
            continue
        _warned.add((key, name))
        if name in fields:
            hint = f"did you mean '{key}.{name}'?"
        else:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"did you mean '{key}.extra.{close[0]}'?" if close else f"known here: {', '.join(known)}"
        print(f"warning: unknown key '{key}.extra.{name}' (ignored); {hint}", file=sys.stderr, flush=True)


def parse_cache_limit(limit, key: str) -> int | None:
    """Bytes in ``extra.cache_limit`` (an int, or e.g. ``"100mb"``, powers of 1024); None for no limit."""
    if limit in (None, 0, ""):  # false too: no limit
        return None
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]?b)?\s*", str(limit).lower())
    if isinstance(limit, bool) or not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{key}.extra.cache_limit={limit!r} is not a size: write bytes or e.g. 100mb, 2gb")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or "b"])


def token_rows(datasets: list[RemoteMDSDataset], dataset, *, seq_len: int, bytes_dtype: str,
               key: str) -> StreamingTokenRows:
    """Streamed token rows; ``extra.predownload`` rows ahead have their shards fetched (0: none)."""
    predownload = int_option(dataset.extra or {}, "predownload", key, DEFAULT_PREDOWNLOAD_ROWS)
    return StreamingTokenRows(datasets, seq_len=seq_len, bytes_dtype=bytes_dtype, predownload=predownload, key=key)

"""A Hugging Face MPT folder in object storage (``s3://``, ``gs://``, ...) as ``load_path``.

The folder's ``config.json``, safetensors files (with their index) and tokenizer files are
downloaded into a temporary folder, read from there as a local folder is, and deleted when the
process exits: nothing is kept locally. Other files (PyTorch pickles, README, ...) are not
fetched.

With a download cache (the ``download_cache`` setting, or ``JAXTRAIN_DOWNLOAD_CACHE`` for the
commands that read checkpoints) the download is kept there instead, in a folder named after the
URL and the versions (size and ETag) of the folder's files: a later run, a restart, or a resume
that reads a LoRA run's frozen weights back reads it from disk, and a file uploaded again since
is a new version, downloaded anew. A download in progress is written to a ``<key>.partial-<pid>@<host>-*``
folder and renamed into place once whole; a download cut off by a killed process is removed by the
next download into the cache on that host. A download of a new version of a folder removes the
cache's copies of its older versions not read for ``STALE_SECONDS`` (one being read by a run that
started earlier is kept: that run may still be opening its files); nothing else is ever removed.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time

from jaxtrain.config import ConfigError
from jaxtrain.convert.folders import CONFIG_FILE, read_json_object
from jaxtrain.convert.safetensors_io import INDEX_FILE, SINGLE_FILE
from jaxtrain.data.tokenizer import SPECIAL_TOKENS_MAP_FILE, TOKENIZER_FILES

_FETCHED = (CONFIG_FILE, INDEX_FILE, *TOKENIZER_FILES, SPECIAL_TOKENS_MAP_FILE)
_DOWNLOAD_RETRIES = 3
CACHE_ENV = "JAXTRAIN_DOWNLOAD_CACHE"
_COMPLETE = ".complete"  # written last into a cached folder: what lacks it is not used
STALE_SECONDS = 3600.0  # an older version's copy not read for this long is removed by a newer download
_cache_folder: str | None = None


def set_download_cache(folder: str | None) -> None:
    """Keep Hugging Face folders downloaded from buckets in ``folder`` (None: the environment's
    ``JAXTRAIN_DOWNLOAD_CACHE``, else nothing is kept)."""
    global _cache_folder
    _cache_folder = os.path.abspath(os.path.expanduser(folder)) if folder else None


def download_cache() -> str | None:
    """The download cache in effect: ``set_download_cache``'s, else ``JAXTRAIN_DOWNLOAD_CACHE``'s, else None."""
    folder = _cache_folder or os.environ.get(CACHE_ENV) or None
    return os.path.abspath(os.path.expanduser(folder)) if folder else None


def _partial_prefix(key: str) -> str:
    """The name a download into the cache starts with while in progress: whose it is (process and host)."""
    return f"{key}.partial-{os.getpid()}@{socket.gethostname()}-"


def _remove_abandoned_partials(cache: str, print_fn) -> None:
    """Remove the cache's unfinished downloads left by processes of this host that are gone (killed
    mid-download: a preempted run may leave tens of GB). Those of other hosts sharing the folder,
    and of live processes, are left alone."""
    host = socket.gethostname()
    for name in os.listdir(cache):
        _, mark, rest = name.partition(".partial-")
        owner = rest.rsplit("-", 1)[0]  # "<pid>@<host>", before mkdtemp's random suffix
        pid, _, owner_host = owner.partition("@")
        if not mark or not pid.isdigit() or owner_host != host or _alive(int(pid)):
            continue
        shutil.rmtree(os.path.join(cache, name), ignore_errors=True)
        print_fn(f"removed {os.path.join(cache, name)}, an unfinished download of a process that is gone")


def _remove_older_versions(cache: str, url: str, newest: str, print_fn) -> None:
    """Remove the cache's complete copies of ``url`` other than ``newest`` (their ``.complete``
    names the URL) that no run has read for ``STALE_SECONDS``: a folder uploaded again since is
    never read from them again (a LoRA run's checkpoint refuses frozen weights of another version)."""
    for name in os.listdir(cache):
        marker = os.path.join(cache, name, _COMPLETE)
        if name == newest or ".partial-" in name or not os.path.isfile(marker):
            continue
        try:
            with open(marker, encoding="utf-8") as handle:
                same_url = handle.read().strip().rstrip("/") == url.rstrip("/")
            idle = time.time() - os.stat(marker).st_mtime
        except (OSError, UnicodeDecodeError):
            continue
        if same_url and idle > STALE_SECONDS:
            shutil.rmtree(os.path.join(cache, name), ignore_errors=True)
            print_fn(f"removed {os.path.join(cache, name)}, the download cache's copy of an older version of {url}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _wanted(names: list[str]) -> list[str]:
    """The files of a listing that reading the model needs (top-level only): the weights are the
    shards ``model.safetensors.index.json`` lists (fetched first), or ``model.safetensors``, or
    every safetensors file, as a local folder's are found."""
    names = [name for name in names if "/" not in name]
    weights = [name for name in names if name.endswith(".safetensors")]
    if INDEX_FILE not in names and SINGLE_FILE in weights:
        weights = [SINGLE_FILE]
    elif INDEX_FILE in names:
        weights = []  # read from the index once it is here
    return [name for name in names if name in _FETCHED] + weights


def remote_hf_files(url: str) -> list[str] | None:
    """The files to fetch of the Hugging Face folder at ``url``, or None when ``url`` holds no
    ``config.json`` beside safetensors weights (e.g. a jaxtrain checkpoint folder)."""
    from jaxtrain.data.remote import ObjectStore

    names = ObjectStore(url).list()
    wanted = _wanted(names)
    if CONFIG_FILE not in wanted or not (INDEX_FILE in wanted or any(name.endswith(".safetensors") for name in wanted)):
        return None
    return wanted


def fetch_hf_folder(url: str, files: list[str] | None = None, *, print_fn=print) -> str:
    """Download the Hugging Face folder at ``url`` (``files``: ``remote_hf_files(url)``) into a
    temporary local folder, removed when the process exits, or into the download cache (read from
    there when it holds the same versions of the folder's files); returns that folder."""
    from jaxtrain.data.remote import ObjectStore, download_with_retry

    files = files if files is not None else remote_hf_files(url)
    if files is None:
        raise ConfigError(f"{url}: no {CONFIG_FILE} beside safetensors weights there; expected a Hugging Face MPT "
                          f"folder")
    store = ObjectStore(url)
    cache = download_cache()
    if cache is not None:
        versions = {name: version for name, version in store.describe().items()
                    if "/" not in name and (name in _FETCHED or name.endswith(".safetensors"))}
        key = hashlib.sha256(json.dumps([url.rstrip("/"), sorted(versions.items())]).encode()).hexdigest()[:20]
        cached = os.path.join(cache, key)
        if os.path.isfile(os.path.join(cached, _COMPLETE)):
            print_fn(f"reading {url} from the download cache, {cached} (the same versions of its files)")
            try:
                os.utime(os.path.join(cached, _COMPLETE))  # read now: not an older version's idle copy
            except OSError:  # a cache this process may read but not write
                pass
            return cached
        os.makedirs(cache, exist_ok=True)
        _remove_abandoned_partials(cache, print_fn)
        local = tempfile.mkdtemp(prefix=_partial_prefix(key), dir=cache)
        print_fn(f"downloading {len(files)} files of {url} into the download cache, {cached}")
    else:
        local = tempfile.mkdtemp(prefix="jaxtrain-hf-")
        atexit.register(shutil.rmtree, local, ignore_errors=True)
        print_fn(f"downloading {len(files)} files of {url} into {local} (removed when the run ends)")
    try:
        for name in files:
            download_with_retry(store, name, os.path.join(local, name), retries=_DOWNLOAD_RETRIES, what=url)
        if INDEX_FILE in files:  # the shards it lists
            index = read_json_object(local, INDEX_FILE, expected="a safetensors index", what="weight files")
            shards = sorted(set((index.get("weight_map") or {}).values()))
            if not shards or any("/" in name or not name.endswith(".safetensors") for name in shards):
                raise ConfigError(f"{store.where(INDEX_FILE)}: its weight_map lists no safetensors files of the folder")
            print_fn(f"downloading the {len(shards)} weight files {url}/{INDEX_FILE} lists")
            for name in shards:
                download_with_retry(store, name, os.path.join(local, name), retries=_DOWNLOAD_RETRIES, what=url)
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise
    if cache is None:
        return local
    with open(os.path.join(local, _COMPLETE), "w") as handle:
        handle.write(url + "\n")
    try:
        os.rename(local, cached)  # whole or not at all; another process may have put it there first
    except OSError:
        shutil.rmtree(local, ignore_errors=True)
        if not os.path.isfile(os.path.join(cached, _COMPLETE)):
            raise
    _remove_older_versions(cache, url, key, print_fn)
    return cached

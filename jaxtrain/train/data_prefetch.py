"""Prepare a run's data in a forked process while the trainer imports JAX and builds the model.

The first minutes of a local-text run are mostly start-up: importing JAX and Flax (two seconds of
one core, holding the interpreter lock), training the BPE tokenizer and tokenizing the corpus
(seconds of both cores), compiling. A thread cannot overlap the data with the imports, since both
need the interpreter lock, but a child forked before JAX is imported can: it builds the same
loaders the run will build, which leaves the tokenizer and the packed rows in the run's data
cache (written atomically), and exits. The run's own data thread waits for it and then reads the
cache. Whatever goes wrong in the child is left for the run itself to find and report: the child
writes nothing to the terminal, and a child that failed only costs its time.

Only where it is safe and can help: Linux, one process (not a multi-host run), JAX not yet
imported and no other thread running (so forking copies no runtime state), and data that is
tokenized locally (python_stdlib, text or jsonl sources with a trained or local tokenizer).
``JAXTRAIN_DATA_PREFETCH=0`` turns it off.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import threading
import time
from typing import Sequence

_SOURCES = ("python_stdlib", "text", "jsonl")
STALL_SECONDS = 120.0  # a child that used no CPU for this long is stopped
_POLL_SECONDS = 1.0


class DataPrefetch:
    """A forked child building a run's data cache; ``wait()`` until it is done, ``close()`` to stop it.

    A child that uses no CPU for ``stall_seconds`` (a deadlock, a stuck file system) is stopped,
    and the run builds its data itself. A run that ends before it reads its data (a config or
    mesh error) leaves no folder behind: the cache folder, and the run folder when empty, are
    removed if the child created them."""

    def __init__(self, pid: int, cache_dir: str, new_folders: Sequence[str] = (), *,
                 stall_seconds: float = STALL_SECONDS):
        """``new_folders``: the cache folder and its parent, those that did not exist before the fork."""
        self.pid = pid
        self.exit_code: int | None = None
        self.stalled = False
        self._used = False
        self._cache_dir = cache_dir
        self._new_folders = list(new_folders)
        self.stall_seconds = stall_seconds

    def wait(self) -> int:
        """Block until the child has exited; returns its exit code (0 when it built everything)."""
        self._used = True
        cpu, progress_at = -1.0, time.monotonic()
        while self.exit_code is None and not self._reap(block=False):
            _wait_for_exit(self.pid, _POLL_SECONDS)
            now, used = time.monotonic(), _cpu_seconds(self.pid)
            if used < 0 or used != cpu:  # (unreadable: never called stalled)
                cpu, progress_at = used, now
            elif now - progress_at >= self.stall_seconds:
                self.stalled = True
                self._stop()
        return self.exit_code

    def close(self) -> None:
        """Stop the child if it is still running; remove what it made if the run never used it."""
        if self.exit_code is None and not self._reap(block=False):
            self._stop()
        if self._used:
            return
        for path in self._new_folders:  # the cache folder first, then the run folder if nothing else is in it
            if path == self._cache_dir:
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.rmdir(path)
                except OSError:
                    pass
        self._new_folders = []

    def _reap(self, *, block: bool) -> bool:
        """Collect the child's exit status if it has exited (or wait for it); whether it has."""
        try:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:  # collected already, by another thread's call
            if self.exit_code is None:
                self.exit_code = -1
            return True
        if pid == 0:
            return False
        self.exit_code = os.waitstatus_to_exitcode(status)
        return True

    def _stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._reap(block=True)
        self._remove_partial_files()

    def _remove_partial_files(self) -> None:
        """A child stopped mid-write leaves a temporary file (named with its pid) beside the cache's files."""
        from jaxtrain.tempfiles import temp_marker

        marker = temp_marker(self.pid)
        for folder, _, names in os.walk(self._cache_dir):
            for name in names:
                if marker in name:
                    try:
                        os.remove(os.path.join(folder, name))
                    except OSError:
                        pass


def _wait_for_exit(pid: int, timeout: float) -> None:
    """Return when ``pid`` exits or after ``timeout`` seconds, whichever is first."""
    try:
        handle = os.pidfd_open(pid)
    except (AttributeError, OSError):  # before Linux 5.3
        time.sleep(min(timeout, 0.02))
        return
    try:
        select.select([handle], [], [], timeout)
    finally:
        os.close(handle)


def process_cpu(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds used so far, its threads included) of ``pid`` from ``/proc``;
    None where it cannot be read (gone, or not Linux). Children it has reaped are not included."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _cpu_seconds(pid: int) -> float:
    """CPU time ``pid`` has used so far, or -1 where it cannot be read."""
    found = process_cpu(pid)
    return -1.0 if found is None else found[1]


def worth_prefetching(cfg) -> bool:
    """Whether ``cfg``'s data is tokenized locally, so that building it early saves start-up time."""
    datasets = [cfg.train_loader.dataset] + ([cfg.eval_loader.dataset] if cfg.eval_loader is not None else [])
    if any(dataset.source not in _SOURCES or dataset.remote for dataset in datasets):
        return False
    name = cfg.tokenizer.name  # trained here, or a local file (a Hub name may need the network)
    return name == "bpe:default" or os.path.exists(os.path.expanduser(name))


def can_fork() -> bool:
    """Forking is safe here: Linux, no JAX runtime loaded, no thread but this one (not even a
    native library's: a child forked from a threaded process can deadlock on a lock held there)."""
    if not sys.platform.startswith("linux") or "jax" in sys.modules or threading.active_count() != 1:
        return False
    try:
        with open("/proc/self/status") as handle:
            threads = next(int(line.split()[1]) for line in handle if line.startswith("Threads:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return False
    return threads == 1


def start_prefetch(cfg) -> DataPrefetch | None:
    """Fork a child that builds ``cfg``'s loaders into its data cache; None where not worthwhile.

    ``cfg`` has its run paths expanded (``jaxtrain.train.paths.expand_run_paths``).
    """
    if os.environ.get("JAXTRAIN_DATA_PREFETCH", "").strip().lower() in ("0", "false", "no", "off"):
        return None
    if not can_fork() or not worth_prefetching(cfg):
        return None
    from jaxtrain.train.paths import data_cache_dir

    cache_dir = data_cache_dir(cfg)
    sys.stdout.flush()
    sys.stderr.flush()
    new_folders = [path for path in (cache_dir, os.path.dirname(cache_dir)) if path and not os.path.exists(path)]
    pid = os.fork()
    if pid:
        return DataPrefetch(pid, cache_dir, new_folders)
    code = 1
    try:  # the child: silent, and never returns into the caller's code
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        # Not niced: the run waits for this child before its first step, so the child is on the
        # critical path. At a lower priority, other processes on a busy host starve it (with two
        # busy processes beside the quickstart on two cores, its first step came 3x later).
        from jaxtrain.data.build import build_loaders  # here: NumPy's import starts threads

        build_loaders(cfg, cache_dir=cache_dir, process_index=0, process_count=1)
        code = 0
    finally:
        os._exit(code)


def prefetch_for_command(config_path: str | None, overrides: Sequence[str]) -> DataPrefetch | None:
    """``start_prefetch`` for the config a ``jaxtrain train`` command names; None on any config error
    (the command reports it)."""
    if not can_fork():
        return None
    from jaxtrain.config import ConfigError, load_config
    from jaxtrain.train.paths import expand_run_paths, resolve_run_name

    try:
        cfg = load_config(config_path, overrides, notices=[])
    except ConfigError:
        return None
    return start_prefetch(expand_run_paths(cfg, resolve_run_name(cfg, config_path)))

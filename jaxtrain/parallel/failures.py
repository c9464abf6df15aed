"""A process of a multi-host run that stops on an error tells the others, and they stop too.

Without this, a process that stopped (a bucket it cannot reach, data missing on its host) left
the others waiting in a collective or a checkpoint meeting for minutes, then failing with a
traceback or an abort that hid the cause, while it sat in JAX's shutdown barrier itself. Now it
writes its one-line error into the run's key-value store (``announce``) and leaves at once; the
others find it where they wait (``peer_failure``) and stop with one line naming the process and
its error. Process 0 hosts the store: stopping first, it waits (a bounded time) for the others
to read the notice before it leaves.
"""

from __future__ import annotations

import time
from typing import Any

_KEY = "jaxtrain/failed/"
_SEEN = "jaxtrain/failure-seen/"
_noted: list[str] = []
# how long process 0, stopping, keeps the store up for the others to read why (a process in a
# collective learns that the collective failed after about 30 s on CPUs)
LINGER_SECONDS = 40.0


def note(message: str) -> None:
    """Remember the one-line error this process is about to stop with (announced on exit)."""
    _noted.append(message)


def _client() -> Any:
    try:
        import jax
        from jax._src import distributed
    except ImportError:
        return None
    client = distributed.global_state.client
    return client if client is not None and jax.process_count() > 1 else None


def multi_process() -> bool:
    return _client() is not None


def announce(exit_code: int) -> None:
    """Tell the other processes that this one stops (with its noted error, else its exit status);
    process 0 then waits until they have read it, at most ``LINGER_SECONDS``."""
    client = _client()
    if client is None:
        return
    import jax

    message = _noted[-1] if _noted else f"it exited with status {exit_code}; see its output"
    try:
        client.key_value_set(f"{_KEY}{jax.process_index()}", message[:2000])
    except Exception:  # noqa: BLE001 - the store is gone with process 0: nothing to tell
        return
    if jax.process_index() != 0:
        return
    deadline = time.monotonic() + LINGER_SECONDS
    others = jax.process_count() - 1
    while time.monotonic() < deadline:
        try:
            seen = len(client.key_value_dir_get(_SEEN))
            stopped = len(client.key_value_dir_get(_KEY)) - 1
        except Exception:  # noqa: BLE001
            return
        if seen + stopped >= others:
            return
        time.sleep(0.2)


def peer_failure() -> str | None:
    """``process N stopped: <its error>`` for another process that announced it stopped; None
    when none did (or single-process). Reading it is acknowledged to process 0."""
    client = _client()
    if client is None:
        return None
    import jax

    try:
        entries = client.key_value_dir_get(_KEY)
    except Exception:  # noqa: BLE001 - the store is gone: process 0 itself stopped
        return None
    mine = str(jax.process_index())
    for key, value in sorted(entries):
        process = key.rstrip("/").rsplit("/", 1)[-1]
        if process != mine:
            try:
                client.key_value_set(f"{_SEEN}{mine}", process)
            except Exception:  # noqa: BLE001
                pass
            return f"process {process} stopped: {value.removeprefix('error: ')}"
    return None

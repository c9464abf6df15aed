"""Reading Orbax checkpoints quietly: a read-only manager, the restore of parts of a step's state
(into shardings, or into host memory), and the hushing of the tracebacks Orbax's abandoned reads
print when one read fails, so that the failure reaches the user as one line.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxtrain.config.schema import error_line

# Errors that only a defect in the code raises, never an unreadable checkpoint: reading one does
# not turn them into "damaged" (which would send a resume on to older steps)
CODE_DEFECTS = (NameError, ImportError, SyntaxError)



@contextlib.contextmanager
def quiet_orbax():
    """Orbax's warnings (it logs through absl's ``absl`` logger) off inside the block; errors still show."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def discard_abandoned_reads(timeout: float = 30.0) -> None:
    """Wait, hushed, until the reads Orbax abandoned when a restore failed are finished and collected.

    Orbax runs a restore's array reads on an event loop of its own and closes that loop when one
    read fails, leaving the others running in TensorStore. Each of them prints a traceback when it
    finishes (its loop is closed) and again when it is collected, some at exit, burying the error
    message. Here they finish while stderr, unraisable-exception reports and asyncio's log are
    silenced (only on this error path, for at most ``timeout`` seconds), and the failures of those
    that finished are marked as seen, so that collecting them later reports nothing.
    """
    import asyncio
    import gc
    import io
    import sys
    import time

    def abandoned() -> int:
        running = 0
        for obj in gc.get_objects():
            if isinstance(obj, asyncio.Future) and obj.get_loop().is_closed():
                if not obj.done():
                    running += 1
                elif not obj.cancelled():
                    obj.exception()  # retrieved: not reported when it is collected later, e.g. at exit
        return running

    stderr, unraisablehook = sys.stderr, sys.unraisablehook
    asyncio_logger = logging.getLogger("asyncio")
    disabled = asyncio_logger.disabled
    sys.stderr, sys.unraisablehook, asyncio_logger.disabled = io.StringIO(), lambda _: None, True
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            gc.collect()
            if not abandoned():
                break
            time.sleep(0.05)
        gc.collect()
    finally:
        sys.stderr, sys.unraisablehook, asyncio_logger.disabled = stderr, unraisablehook, disabled


@contextlib.contextmanager
def held_back_stderr():
    """What is written to ``sys.stderr`` and reported as unraisable inside the block is held back:
    written out when the block ends normally, dropped when it raises.

    Around a restore: when one of its reads fails, Orbax closes its event loop, and the reads
    still running report the closed loop with tracebacks, some before the failure reaches the
    caller; the caller reports the failure in one line (and then ``discard_abandoned_reads``)."""
    import io
    import sys

    stderr, unraisablehook = sys.stderr, sys.unraisablehook
    buffer, unraisable = io.StringIO(), []
    sys.stderr, sys.unraisablehook = buffer, unraisable.append
    try:
        yield
    except BaseException:
        sys.stderr, sys.unraisablehook = stderr, unraisablehook
        raise
    sys.stderr, sys.unraisablehook = stderr, unraisablehook
    stderr.write(buffer.getvalue())
    for report in unraisable:
        unraisablehook(report)


def read_only_manager(root: str) -> ocp.CheckpointManager:
    """An Orbax manager that lists and reads the steps of the checkpoint folder ``root`` (local or
    staged), and writes nothing."""
    with quiet_orbax():  # Orbax warns that a read-only manager is read-only, on every load
        return ocp.CheckpointManager(
            root, options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
            item_names=("state", "meta"),
        )


def restore_state(manager: ocp.CheckpointManager, step: int, target: dict, damaged: Callable, *,
                   to_host: bool = False) -> dict:
    """The ``target`` parts of a step's state item (``damaged(what)``, a ``ConfigError``, if
    unreadable); ``to_host``: as NumPy arrays in host memory, whole in every process, in the
    dtype they were saved in (a bf16 kernel takes half the host memory of its float32 values)."""

    def restore_args(x):
        if to_host:
            return ocp.RestoreArgs(restore_type=np.ndarray)
        return ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype)

    unreadable = None
    try:
        with held_back_stderr():
            return manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=target,
                        restore_args=jax.tree.map(restore_args, target),
                        partial_restore=True,
                    )
                ),
            )["state"]
    except (jax.errors.JaxRuntimeError, MemoryError, *CODE_DEFECTS):
        raise  # the device (e.g. out of memory) or the code, not the checkpoint
    except Exception as error:  # noqa: BLE001 - Orbax and TensorStore raise bare Exception for unreadable arrays
        unreadable = error_line(error)
    # outside the except block: the error's traceback holds the abandoned reads
    logging.getLogger(__name__).debug("reading a checkpoint's state failed: %s", unreadable)
    discard_abandoned_reads()
    raise damaged("its state item cannot be read")

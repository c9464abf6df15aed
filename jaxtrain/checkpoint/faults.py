"""Rehearsed failures inside the checkpoint write path (the ``faults`` config section).

``kill_during_save_step`` SIGKILLs the process, and ``disk_full_at_save_step`` raises
``OSError(ENOSPC)``, at the start of the finalize stage of Orbax's asynchronous save of that
step: the arrays and the JSON record are on disk in the step's temporary folder, but its OCDBT
manifest is not merged and the folder is not yet renamed into place, so the step is not
committed. That is the moment a real crash or a full disk hurts most, and the code that
handles it (Orbax's background thread, then ``Checkpointer``) is the real one.
"""

from __future__ import annotations

import errno
import os
from typing import Any

_ORIGINAL_FINALIZE: Any = None
_HOOKS: dict[str, Any] = {}  # checkpoint folder (absolute) -> FaultInjector


def _step_of(directory: Any) -> int | None:
    """The step of a (temporary) step folder such as ``4.orbax-checkpoint-tmp-1700000000``."""
    head = os.path.basename(str(directory)).split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _finalize(self, directory):
    faults = _HOOKS.get(os.path.dirname(os.path.abspath(str(directory))))
    step = _step_of(directory)
    if faults is not None and step is not None:
        cfg = faults.cfg
        if cfg.kill_during_save_step == step and faults.once("kill-save", step):
            faults.kill(f"killed while the checkpoint of step {step} is being written (before it commits)")
        if cfg.disk_full_at_save_step == step and faults.once("disk-full", step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return _ORIGINAL_FINALIZE(self, directory)


def install_save_faults(folder: str, faults: Any) -> None:
    """Arm the save faults of ``faults`` (a ``FaultInjector``) for checkpoints written under ``folder``."""
    cfg = faults.cfg
    if getattr(cfg, "kill_during_save_step", None) is None and getattr(cfg, "disk_full_at_save_step", None) is None:
        return
    # Imported here: only a run rehearsing these faults depends on where Orbax keeps this class.
    from orbax.checkpoint._src.handlers.composite_checkpoint_handler import CompositeCheckpointHandler

    global _ORIGINAL_FINALIZE
    if _ORIGINAL_FINALIZE is None:
        _ORIGINAL_FINALIZE = CompositeCheckpointHandler.finalize
        CompositeCheckpointHandler.finalize = _finalize
    _HOOKS[os.path.abspath(folder)] = faults

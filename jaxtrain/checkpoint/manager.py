"""Orbax checkpoints: the train state plus a JSON record (data position, config, layout).

A checkpoint folder holds one step per subfolder, each with two items:
- ``state``: the TrainState pytree (step, params, optimizer state, RNG), saved asynchronously;
- ``meta``: JSON with the loader position, the resolved config, the layer layout and versions.
Orbax writes each step to a temporary folder and renames it when complete, so an interrupted
write never shadows the last good checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

import jaxtrain

FORMAT_VERSION = 1


def _as_path(folder: str) -> str:
    return folder if "://" in folder else os.path.abspath(folder)


class Checkpointer:
    """Save and restore train states under ``folder``; keeps the newest ``keep`` (-1: all)."""

    def __init__(self, folder: str, *, keep: int = -1, async_save: bool = True):
        self.folder = _as_path(folder)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if keep is None or keep < 0 else keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.folder, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Start an asynchronous save; returns whether a save was started."""
        meta = dict(meta, format_version=FORMAT_VERSION, jaxtrain_version=jaxtrain.__version__, step=step)
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore ``step`` into the shapes, dtypes and shardings of ``abstract_state``."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"])

    def restore_meta(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        """Block until the pending asynchronous save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs with shardings, the restore target for a state shaped like ``state``."""

    def to_abstract(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(to_abstract, state)


def log_restore(folder: str, step: int) -> None:
    logging.info("resuming from %s at step %d", folder, step)

"""Orbax checkpoints: the train state plus a JSON record (data position, config, layout).

A checkpoint folder holds one step per subfolder, each with two items:
- ``state``: the TrainState pytree (step, params, optimizer state, RNG), saved asynchronously;
- ``meta``: JSON with the loader position, the resolved config, the layer layout and versions.
Orbax writes each step to a temporary folder and renames it when complete, so an interrupted
write never shadows the last good checkpoint. A remote folder (``s3://...``) is staged locally and
uploaded step by step (see ``checkpoint/remote.py``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

import jaxtrain
from jaxtrain.checkpoint.remote import RemoteSteps, is_remote
from jaxtrain.config.schema import ConfigError

FORMAT_VERSION = 1


def _as_path(folder: str) -> str:
    return folder if "://" in folder else os.path.abspath(folder)


class Checkpointer:
    """Save and restore train states under ``folder``; keeps the newest ``keep`` (-1: all)."""

    def __init__(self, folder: str, *, keep: int = -1, async_save: bool = True):
        self.folder = _as_path(folder)
        self.keep = keep
        self.remote: RemoteSteps | None = None
        if is_remote(folder):
            if jax.process_count() > 1:
                raise ConfigError(f"save_folder={folder}: remote checkpoints are staged on local disk, which needs a "
                                  f"single process; use a shared filesystem path for multi-host runs")
            self.remote = RemoteSteps(folder)
            step = self.remote.download_latest()
            if step is not None:
                logging.info("fetched checkpoint step %d from %s", step, folder)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if keep is None or keep < 0 else keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        local = self.remote.staging if self.remote is not None else self.folder
        self._manager = ocp.CheckpointManager(local, options=options, item_names=("state", "meta"))

    def _upload(self) -> None:
        """Remote folders: wait for the pending write, then upload every finished step not yet there."""
        if self.remote is not None:
            self._manager.wait_until_finished()
            self.remote.sync(list(self._manager.all_steps()), self.keep)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Start an asynchronous save; returns whether a save was started."""
        meta = dict(meta, format_version=FORMAT_VERSION, jaxtrain_version=jaxtrain.__version__, step=step)
        self._upload()
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
        self._upload()

    def close(self) -> None:
        self._manager.wait_until_finished()
        try:
            self._upload()
        finally:
            self._manager.close()
            if self.remote is not None:
                self.remote.remove_staging()


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs with shardings, the restore target for a state shaped like ``state``."""

    def to_abstract(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(to_abstract, state)


def log_restore(folder: str, step: int) -> None:
    logging.info("resuming from %s at step %d", folder, step)

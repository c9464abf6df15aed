"""Orbax checkpoints: the train state plus a JSON record (data position, config, layout).

A checkpoint folder holds one step per subfolder, each with two items:
- ``state``: the TrainState pytree (step, params, optimizer state, RNG), saved asynchronously;
- ``meta``: JSON with the loader position, the resolved config, the layer layout and versions.
Orbax writes each step to a temporary folder and renames it when complete, so an interrupted
write never shadows the last good checkpoint: the next start deletes the leftover temporary
folder and resumes from the newest committed step. A remote folder (``s3://...``) is staged
locally and uploaded step by step (see ``checkpoint/remote.py``); with several processes, each
stages its own part in its own folder (``<staging>/process-<i>``) and Orbax treats every process
as the writer of its local copy.

A step that cannot be read back is moved aside by ``move_aside`` once an older one has been
restored (the folder ``<step>`` is renamed ``<step>.unreadable-<time>``, a name Orbax does not
take for a step): nothing is deleted, and the resumed run saves that step again when it gets
there. For a remote folder the staged copy is moved beside the staging folder (kept when the
staging folder goes), and the step is uploaded again, over the remote copy, once it is saved.
A restarted run stages only the remote steps it reads; the others the retention policy keeps are
not pruned for being absent from the staging folder.

A save that fails (disk full, storage unreachable after retries) raises ``CheckpointSaveError``:
a one-line message naming the checkpoint and what to do, and exit status ``EXIT_CHECKPOINT``.
Orbax reports a failure of its background write only when asked, so the Trainer polls after
every step (``poll``), and every save and close waits for the previous write first; a run never
trains on past a save that did not complete.
"""

from __future__ import annotations

import dataclasses
import errno
import logging as std_logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

import jaxtrain
from jaxtrain.checkpoint import checksums
from jaxtrain.checkpoint.faults import install_save_faults
from jaxtrain.checkpoint.remote import RemoteSteps, RemoteUploadError, is_remote, process_group
from jaxtrain.config.schema import ConfigError, error_line
from jaxtrain.train.health import EXIT_CHECKPOINT

FORMAT_VERSION = 1
# A step folder moved aside because it cannot be read back: ``<step>.unreadable-<time>``. Orbax
# takes only ``<digits>`` (or ``<name>_<digits>``) for a step and ``.orbax-checkpoint-tmp`` for an
# unfinished one, so it neither lists nor cleans up such a folder; no ``_`` may come before digits.
UNREADABLE_MARK = ".unreadable-"


def _as_path(folder: str) -> str:
    return folder if "://" in folder else os.path.abspath(folder)


def holds_checkpoint(folder: str | None) -> bool:
    """Whether ``folder`` holds a finished checkpoint step, nothing read: a local folder, one
    listing of it; a folder in a bucket, one listing for a step whose upload finished (a bucket
    that cannot be listed now answers False: the resume that follows reports it)."""
    if not folder:
        return False
    if is_remote(folder):
        from jaxtrain.checkpoint.remote import complete_steps_in
        from jaxtrain.data.remote import ObjectStore

        try:
            return bool(complete_steps_in(ObjectStore(folder)))
        except Exception:  # noqa: BLE001 - any failure to list is reported by the resume itself
            return False
    if not os.path.isdir(folder):
        return False
    return ocp.path.step.any_checkpoint_step(folder) is not None


class _NoPrimaryHostNotice(std_logging.Filter):
    """Orbax warns on every save that it skips size logging when every process writes its own copy."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return "disabled for `primary_host=None`" not in record.getMessage()


class _SaveFailureReports(std_logging.Filter):
    """Orbax logs a failed background save with its traceback, from the thread that wrote it and
    again from the one that waited for it; the run reports every failed save itself, in one line
    (``CheckpointSaveError``), so these reports go to the debug log instead."""

    MARKS = ("in background save thread", "Save Finalize thread")

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.ERROR and any(mark in record.getMessage() for mark in self.MARKS):
            std_logging.getLogger(__name__).debug("%s", record.getMessage(), exc_info=record.exc_info)
            return False
        return True


def _filter_orbax_logs(kind: type) -> None:
    """Add a filter of ``kind`` to absl's logger (which Orbax logs through), once per process."""
    absl_logger = logging.get_absl_logger()
    if not any(isinstance(f, kind) for f in absl_logger.filters):
        absl_logger.addFilter(kind())


class _PartHandler(ocp.StandardCheckpointHandler):
    """The train state of a process that stages its own part of a multi-process checkpoint on local
    disk: the per-process OCDBT files are not merged when saving (the other parts are elsewhere);
    ``remote.merge_parts`` merges them once a step has been downloaded whole."""

    def finalize(self, directory) -> None:
        pass


@ocp.args.register_with_handler(_PartHandler, for_save=True)
class _PartSave(ocp.args.StandardSave):
    pass


@ocp.args.register_with_handler(_PartHandler, for_restore=True)
class _PartRestore(ocp.args.StandardRestore):
    pass


class CheckpointSaveError(SystemExit):
    """A checkpoint could not be written or uploaded. The process exits with ``EXIT_CHECKPOINT``;
    ``str()`` is the one-line explanation (which checkpoint, why, what to do)."""

    def __init__(self, message: str):
        super().__init__(EXIT_CHECKPOINT)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _disk_full(err: BaseException) -> bool:
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


class Checkpointer:
    """Save and restore train states under ``folder``; keeps the newest ``keep`` (-1: all).

    ``staging``: for a remote ``folder``, the local folder steps are written to before upload
    (default a temporary one; a fixed one lets a restarted run finish an interrupted upload).
    ``faults``: a ``FaultInjector`` whose save faults are armed for this folder.
    """

    def __init__(self, folder: str, *, keep: int = -1, async_save: bool = True, staging: str | None = None,
                 faults: Any = None):
        self.folder = _as_path(folder)
        self.keep = keep
        self.remote: RemoteSteps | None = None
        self._pending: int | None = None  # the step whose asynchronous write may still be running
        self._save_args, self._restore_args = ocp.args.StandardSave, ocp.args.StandardRestore
        parts = is_remote(folder) and jax.process_count() > 1
        if is_remote(folder):
            if parts:
                try:
                    group = process_group()
                except Exception as err:  # noqa: BLE001 - no distributed runtime to meet through
                    raise ConfigError(f"save_folder={folder}: remote checkpoints of {jax.process_count()} processes "
                                      f"need jax.distributed ({error_line(err)}); start the processes with "
                                      f"launch/ or jax.distributed.initialize") from err
                if staging:  # processes may share the run folder: each stages in its own
                    staging = os.path.join(staging, f"process-{group.index}")
            else:
                group = None
            self.remote = RemoteSteps(folder, staging, faults=faults, group=group)
            try:
                step = self.remote.reconcile()
            except RemoteUploadError as err:
                raise self._failed(err.step, err) from err
            if step is not None:
                logging.info("checkpoint step %d of %s is in the staging folder", step, folder)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if keep is None or keep < 0 else keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        _filter_orbax_logs(_SaveFailureReports)
        local = self.remote.staging if self.remote is not None else self.folder
        if faults is not None:
            install_save_faults(local, faults)
        handlers = None
        if parts:  # every process writes (and commits) its local copy; nothing there is shared
            every = ocp.options.MultiprocessingOptions(primary_host=None)
            # Directories are created before anything is written: created asynchronously, a
            # process may be told they exist once another process has created its own.
            synchronous = ocp.options.AsyncOptions(create_directories_asynchronously=False)
            options = dataclasses.replace(options, multiprocessing_options=every, async_options=synchronous)
            handlers = {"state": _PartHandler(multiprocessing_options=every),
                        "meta": ocp.JsonCheckpointHandler(multiprocessing_options=every)}
            self._save_args, self._restore_args = _PartSave, _PartRestore
            _filter_orbax_logs(_NoPrimaryHostNotice)
        self._manager = ocp.CheckpointManager(local, options=options, item_names=("state", "meta"),
                                              item_handlers=handlers)

    # ------------------------------------------------------------------ failures

    def _failed(self, step: int | None, err: BaseException) -> CheckpointSaveError:
        where = f"{self.folder}/{step}" if step is not None else self.folder
        earlier = [s for s in self._manager.all_steps() if step is None or s < step] if hasattr(self, "_manager") else []
        if self.remote is not None and earlier:
            earlier = [s for s in earlier if s in self.remote.uploaded]
        if _disk_full(err):
            advice = "free space where save_folder lives (or lower save_num_checkpoints_to_keep)"
        elif self.remote is not None:
            advice = "check the storage endpoint, credentials and network"
        else:
            advice = "check that save_folder is writable"
        resume = (f"the checkpoint of step {max(earlier)} is intact; {advice}, then run the same command to resume "
                  f"from it" if earlier else f"no earlier checkpoint exists; {advice}, then run the same command")
        return CheckpointSaveError(f"checkpoint {where} could not be saved ({error_line(err)}); {resume}")

    def poll(self) -> None:
        """Raise ``CheckpointSaveError`` if the asynchronous write in flight has failed; cheap otherwise."""
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self._finish_pending()

    def _finish_pending(self) -> None:
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - any failure of the background write
            raise self._failed(step, err) from err

    def _upload(self) -> None:
        """Remote folders: wait for the pending write, then upload every finished step not yet there."""
        self._finish_pending()
        if self.remote is not None:
            try:  # ``sync`` prunes the remote steps not listed: those the retention policy drops
                self.remote.sync(sorted(self._kept()), self.keep)
            except RemoteUploadError as err:
                raise self._failed(err.step, err) from err

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def _kept(self) -> set[int]:
        """The steps here and, for a remote folder, the complete remote steps the retention policy
        keeps. (A restarted run stages only the remote steps it reads.)"""
        local = set(self._manager.all_steps())
        if self.remote is None:
            return local
        if self.keep is None or self.keep < 0:
            return local | self.remote.uploaded
        newest = set(sorted(local | self.remote.uploaded)[-self.keep:]) if self.keep > 0 else set()
        return local | (self.remote.uploaded & newest)

    def restorable_steps(self) -> list[int]:
        """The steps a restore can try, oldest first: those here and, for a remote folder, the
        complete remote steps kept (``restore`` downloads one that is not staged)."""
        return sorted(self._kept())

    def save_tokenizer(self, tokenizer: Any) -> None:
        """Write ``tokenizer``'s files beside the checkpoints (uploaded, for a folder in a bucket),
        so that generation and export need nothing else; one process calls it."""
        folder = self.remote.staging if self.remote is not None else self.folder
        os.makedirs(folder, exist_ok=True)
        for path in tokenizer.save(os.path.join(folder, "tokenizer.json")):
            if self.remote is not None:
                try:
                    self.remote.upload_file(path, os.path.basename(path))
                except RemoteUploadError as err:
                    raise CheckpointSaveError(f"{self.folder}/{os.path.basename(path)} could not be saved ({err}); "
                                              "check the storage endpoint, credentials and network") from err

    def move_aside(self, step: int) -> str | None:
        """Rename the folder of ``step`` (which cannot be read back) to ``<step>.unreadable-<time>``,
        so that it is no longer a step here and the run saves that step again; nothing is deleted.

        Returns the folder's new path (None when there was no folder to move). For a remote folder
        the staged copy goes to ``<staging>.unreadable/`` and the step counts as not uploaded: the
        remote copy stays until the step is saved again, which replaces it (its marker deleted
        first, its files the new save does not write again deleted after); with
        ``save_num_checkpoints_to_keep`` >= 0, a save before that prunes it like any step not kept.
        With several processes sharing a local folder, process 0 renames it (the others return
        None) and they meet after. The caller has waited for any save in flight (``wait``)."""
        if self.remote is not None:
            source = os.path.join(self.remote.staging, str(step))
            aside = self.remote.staging.rstrip(os.sep) + ".unreadable"
            self.remote.uploaded.discard(step)
            moved = _rename_aside(source, aside, step) if os.path.isdir(source) else None
        else:
            source = os.path.join(self.folder, str(step))
            moved = None
            if jax.process_index() == 0 and os.path.isdir(source):
                moved = _rename_aside(source, self.folder, step)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"jaxtrain-move-aside-{step}")
        self._manager.reload()
        return moved

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Start an asynchronous save; returns whether a save was started."""
        meta = dict(meta, format_version=FORMAT_VERSION, jaxtrain_version=jaxtrain.__version__, step=step)
        meta[checksums.META_KEY] = checksums.checksums(state)  # checked when it is read back
        self._upload()
        try:
            started = self._manager.save(
                step,
                args=ocp.args.Composite(state=self._save_args(state), meta=ocp.args.JsonSave(meta)),
                force=force,
            )
        except Exception as err:  # noqa: BLE001 - e.g. the step folder cannot be created
            raise self._failed(step, err) from err
        if started:
            self._pending = step
        return started

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore ``step`` into the shapes, dtypes and shardings of ``abstract_state``; an array
        that differs from the one saved raises ``checksums.ChecksumMismatch``."""
        self._materialize(step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=self._restore_args(abstract_state), meta=ocp.args.JsonRestore()),
        )
        meta = dict(restored["meta"])
        checksums.verify(restored["state"], meta.get(checksums.META_KEY), f"{self.folder}/{step}")
        return restored["state"], meta

    def _materialize(self, step: int) -> None:
        """Remote folders: a staged step may hold only this process's part, or none of it (an older
        step tried after a newer one could not be read); download the rest."""
        if self.remote is not None and step in self.remote.uploaded:
            self.remote.materialize(step)
            if step not in self._manager.all_steps():  # downloaded just now: Orbax lists it once reloaded
                self._manager.reload()

    def restore_meta(self, step: int) -> dict[str, Any]:
        self._materialize(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        """Block until the pending asynchronous save is committed (and uploaded)."""
        self._upload()

    def close(self) -> None:
        """Finish the pending save and upload; the staging folder goes only when everything is uploaded."""
        uploaded = False
        try:
            self._upload()
            uploaded = True
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - a failure was raised above already
                if uploaded:
                    raise
            if self.remote is not None and uploaded:
                self.remote.remove_staging()


def _aside_name(folder: str, step: int) -> str:
    """A new name in ``folder`` for step ``step``'s folder moved aside: ``<step>.unreadable-<time>``."""
    base = os.path.join(folder, f"{step}{UNREADABLE_MARK}{time.strftime('%Y%m%dT%H%M%S')}")
    name, count = base, 1
    while os.path.exists(name):
        count += 1
        name = f"{base}-{count}"
    return name


def _rename_aside(source: str, folder: str, step: int) -> str:
    os.makedirs(folder, exist_ok=True)
    target = _aside_name(folder, step)
    os.rename(source, target)
    return target


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs with shardings, the restore target for a state shaped like ``state``."""

    def to_abstract(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(to_abstract, state)


def log_restore(folder: str, step: int) -> None:
    logging.info("resuming from %s at step %d", folder, step)

"""Checkpoints in object storage (``save_folder: s3://bucket/run/checkpoints``, ``gs://``, ...).

Orbax writes each step to a local staging folder, where its write-then-rename keeps the step
atomic; the finished step is then uploaded file by file, and an upload marker is written last.
Object stores have no atomic rename, so the marker is what makes a remote step complete: steps
without it (an upload cut short) are ignored by autoresume and ``load_checkpoint``.

A step is uploaded when the next save starts or when the checkpointer closes (both wait for
the asynchronous write first), so training never blocks on the network between saves. Each file
is tried ``UPLOAD_RETRY`` more times after a failure; a step that still does not upload stops the
run (``RemoteUploadError``, turned into a one-line error by the checkpointer).

A crash can leave the remote copy one save behind: the newest step was committed in staging but
its upload never finished (or never started). The Trainer therefore stages in a fixed folder,
``<run_folder>/checkpoint-staging``, kept until every step is uploaded, and on start
``reconcile`` uploads the committed staged steps newer than the newest complete remote step
before anything else, so the restarted run resumes from the newest checkpoint and the remote
copy has it too. Staged steps older than that (whose remote copies the retention policy
deleted) are dropped; when the newest remote step is not staged, it is downloaded so that
autoresume sees it. Credentials and endpoints come from the standard environment (``AWS_*``
for ``s3://``).

Several processes (a multi-host run) save one checkpoint together: each stages, in its own
folder, the files Orbax writes for its shards (``.../ocdbt.process_<i>/...``), and process 0 also
the metadata. Every process uploads its own part; the processes then meet (a barrier of the
distributed runtime, which also tells each whether the others' uploads succeeded) and process 0
writes the marker, so a remote step is complete only when all its parts are there. The parts are
not merged into one OCDBT manifest before upload: a reader downloads the whole step and merges
them (``merge_parts``), so nothing can read a step with parts missing. On start, a staged step is
uploaded only if every process has committed it; one that some process lacks is dropped.
Process 0 alone deletes remote steps the retention policy no longer keeps.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Protocol

from jaxtrain.config.schema import ConfigError
from jaxtrain.data.mds.writer import is_remote
from jaxtrain.data.remote import ObjectStore, describe_error, download_with_retry
from jaxtrain.data.tokenizer import TOKENIZER_FILES

UPLOADED_MARKER = "_JAXTRAIN_UPLOADED"
DOWNLOAD_RETRY = 2
UPLOAD_RETRY = 2
UPLOAD_RETRY_BASE_SECONDS = 0.5  # doubles after each failed attempt
# How long a process waits for the others to finish uploading their parts of a step.
BARRIER_TIMEOUT_SECONDS = 1800
OCDBT_MANIFEST = "manifest.ocdbt"
_PROCESS_PART = re.compile(r"(?:^|\.)process_(\d+)$")  # ocdbt.process_<i>/, array_metadatas/process_<i>
_MEETINGS = itertools.count()  # numbers the meetings of the processes: the same sequence on every process

__all__ = ["ProcessGroup", "RemoteSteps", "RemoteUploadError", "fetch_checkpoint", "is_remote", "merge_parts"]


class RemoteUploadError(RuntimeError):
    """A checkpoint file could not be uploaded after its retries (or, with ``message``, another
    process could not upload its part)."""

    def __init__(self, step: int | None, where: str = "", attempts: int = 0, error: BaseException | None = None,
                 *, message: str | None = None):
        if message is None:
            message = f"upload of {where} failed after {attempts} attempts: {describe_error(error)}"
        super().__init__(message)
        self.step = step


class ProcessGroup(Protocol):
    """The processes that save one checkpoint together."""

    index: int
    count: int

    def exchange(self, name: str, value: str) -> list[str]:
        """Wait until every process has made the same call (the n-th call of each meets the n-th of
        the others); returns their values by process index."""


class SingleProcess:
    """A process that saves its checkpoints alone."""

    index, count = 0, 1

    def exchange(self, name: str, value: str) -> list[str]:
        return [value]


class DistributedProcesses:
    """All processes of a ``jax.distributed`` job, meeting through its key-value store."""

    def __init__(self):
        import jax
        from jax._src import distributed

        self.client = distributed.global_state.client
        if self.client is None:
            raise RuntimeError("jax.distributed is not initialized")
        self.index, self.count = jax.process_index(), jax.process_count()

    def exchange(self, name: str, value: str) -> list[str]:
        from jaxtrain.parallel.failures import peer_failure

        key = f"jaxtrain/checkpoint/{next(_MEETINGS)}-{name}"
        deadline = time.monotonic() + BARRIER_TIMEOUT_SECONDS
        values: list[str] = []
        try:
            self.client.key_value_set(f"{key}/{self.index}", value)
            while len(values) < self.count:  # each value in turn, a second at a time: a process that
                try:  # stopped on an error says so meanwhile (``jaxtrain.parallel.failures``)
                    values.append(self.client.blocking_key_value_get(f"{key}/{len(values)}", 1000))
                    continue
                except Exception as err:  # noqa: BLE001 - the runtime's own error type
                    if "DEADLINE_EXCEEDED" not in str(err) or time.monotonic() > deadline:
                        raise
                failure = peer_failure()
                if failure is not None:
                    raise RemoteUploadError(None, message=failure)
            return values
        except RemoteUploadError:
            raise
        except Exception as err:  # noqa: BLE001 - a process died or never came: the step cannot be marked
            detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise RemoteUploadError(None, message=f"process {self.index} waited in vain for the other processes "
                                                  f"to upload their parts ({detail})") from err


def process_group() -> ProcessGroup:
    """The group of this job's processes; a single process needs no distributed runtime."""
    import jax

    if jax.process_count() == 1:
        return SingleProcess()
    return DistributedProcesses()


def _part_owner(name: str) -> int | None:
    """The process whose part of a step ``name`` (a path relative to the staging folder) belongs
    to; None for the metadata, which process 0 uploads."""
    for component in name.split("/"):
        match = _PROCESS_PART.search(component)
        if match:
            return int(match.group(1))
    return None


def _unmerged(folder: str) -> bool:
    """Whether the step ``folder`` is missing, or an item of it holds per-process OCDBT parts
    without the merged manifest (the step is not whole here)."""
    if not os.path.isdir(folder):
        return True
    for item in os.listdir(folder):
        path = os.path.join(folder, item)
        if (os.path.isdir(path) and not os.path.exists(os.path.join(path, OCDBT_MANIFEST))
                and any(name.startswith("ocdbt.process_") for name in os.listdir(path))):
            return True
    return False


def merge_parts(folder: str) -> None:
    """Merge the per-process OCDBT parts of each item of the step ``folder`` into one manifest,
    which Orbax reads; items already merged are left as they are."""
    import orbax.checkpoint as ocp
    from etils import epath

    for item in sorted(os.listdir(folder)):
        path = os.path.abspath(os.path.join(folder, item))
        if not os.path.isdir(path) or os.path.exists(os.path.join(path, OCDBT_MANIFEST)):
            continue
        if any(name.startswith("ocdbt.process_") for name in os.listdir(path)):
            asyncio.run(ocp.type_handlers.merge_ocdbt_per_process_files(
                epath.Path(path), ts_context=ocp.type_handlers.get_ts_context(use_ocdbt=True), use_zarr3=False,
                enable_validation=False))


def complete_steps_in(store: ObjectStore) -> list[int]:
    """The steps under ``store`` whose upload finished (their marker exists), oldest first."""
    steps = set()
    for name in store.list():
        step, _, rest = name.partition("/")
        if rest == UPLOADED_MARKER and step.isdigit():
            steps.add(int(step))
    return sorted(steps)


class RemoteSteps:
    """The step folders under a remote ``url``, mirrored through a local staging folder.

    ``group``: the processes that save each step together (default this process alone); each
    stages and uploads its own part, and process 0 writes the marker once all parts are uploaded.
    """

    def __init__(self, url: str, staging: str | None = None, *, faults: Any = None, group: ProcessGroup | None = None):
        self.url = url.rstrip("/")
        self.store = ObjectStore(self.url)
        if staging:
            os.makedirs(staging, exist_ok=True)
        self.staging = staging or tempfile.mkdtemp(prefix="jaxtrain-checkpoints-")
        self.uploaded: set[int] = set()
        self.faults = faults
        self.group = group or SingleProcess()

    def staged_steps(self) -> list[int]:
        """Committed steps in the staging folder (Orbax renames a step folder into place when complete)."""
        if not os.path.isdir(self.staging):
            return []
        return sorted(int(name) for name in os.listdir(self.staging)
                      if name.isdigit() and os.path.isdir(os.path.join(self.staging, name)))

    def _everywhere(self, steps: list[int], what: str) -> list[int]:
        """The ``steps`` that every process of the group also has."""
        if self.group.count == 1:
            return sorted(steps)
        reports = self.group.exchange(what, ",".join(map(str, sorted(steps))))
        common = set(steps)
        for report in reports:
            common &= {int(step) for step in report.split(",") if step}
        return sorted(common)

    def reconcile(self) -> int | None:
        """Make staging and remote agree before a run starts; returns the newest step, or None.

        Committed staged steps newer than the newest complete remote step (an upload a crash cut
        short) are uploaded now, if every process has committed them (otherwise they are dropped);
        older staged steps the remote lacks are dropped; the newest remote step is downloaded when
        it is not staged whole."""
        remote = self.complete_steps()
        newest_remote = remote[-1] if remote else -1
        self.uploaded.update(remote)
        newer = [step for step in self.staged_steps() if step > newest_remote]
        finish = self._everywhere(newer, "staged")
        for step in newer:
            if step in finish:
                print(f"checkpoint step {step} was saved but not uploaded to {self.url} before the last run ended; "
                      f"uploading it now", file=sys.stderr, flush=True)
            else:
                print(f"checkpoint step {step} was saved by some processes only before the last run ended; "
                      f"dropping it", file=sys.stderr, flush=True)
                shutil.rmtree(os.path.join(self.staging, str(step)), ignore_errors=True)
        self.commit(finish)
        for step in self.staged_steps():
            if step not in self.uploaded:
                shutil.rmtree(os.path.join(self.staging, str(step)), ignore_errors=True)
        steps = sorted(self.uploaded)
        if steps:
            self.materialize(steps[-1])
        return steps[-1] if steps else None

    def complete_steps(self) -> list[int]:
        """Steps whose upload finished (their marker exists), oldest first."""
        return complete_steps_in(self.store)

    def download(self, step: int, into: str | None = None) -> str:
        """Copy remote ``step`` into ``into`` (default the staging folder), every process's part, and
        merge the parts; files already there are kept. Returns the step's local folder."""
        root = into or self.staging
        folder = os.path.join(root, str(step))
        for name in self.store.list(str(step)):
            path = os.path.join(root, name)
            if not name.endswith(UPLOADED_MARKER) and not os.path.exists(path):
                download_with_retry(self.store, name, path, retries=DOWNLOAD_RETRY, what=f"checkpoint step {step}")
        merge_parts(folder)
        self.uploaded.add(step)
        return folder

    def materialize(self, step: int) -> str:
        """Make the staged copy of the complete remote ``step`` whole: a process stages only its own
        part of the steps it saves, so the other parts are downloaded (and merged) before a restore."""
        folder = os.path.join(self.staging, str(step))
        if _unmerged(folder):
            self.download(step)
        return folder

    def download_latest(self) -> int | None:
        """Bring the newest complete remote step into staging (for autoresume); None when there is none."""
        steps = self.complete_steps()
        if not steps:
            return None
        self.download(steps[-1])
        self.uploaded.update(steps)  # already remote: never upload them again
        return steps[-1]

    def _put(self, path: str, name: str, step: int | None) -> None:
        """``store.put`` with up to ``UPLOAD_RETRY`` further attempts, waiting 0.5 s, 1 s, ... between."""
        for attempt in range(UPLOAD_RETRY + 1):
            try:
                self.store.put(path, name)
                return
            except Exception as error:  # noqa: BLE001 - network, throttling, credentials: worth another try
                if attempt == UPLOAD_RETRY:
                    raise RemoteUploadError(step, self.store.where(name), attempt + 1, error) from error
                time.sleep(UPLOAD_RETRY_BASE_SECONDS * 2 ** attempt)

    def _owns(self, name: str) -> bool:
        """Whether this process uploads ``name`` (relative to the staging folder, or the store's
        prefix): its own part, plus the metadata and markers on process 0 (everything, alone)."""
        owner = _part_owner(name)
        return self.group.count == 1 or owner == self.group.index or (owner is None and self.group.index == 0)

    def _own_files(self, step: int) -> list[tuple[str, str]]:
        """(local path, remote name) of the files of ``step`` that this process uploads."""
        folder = os.path.join(self.staging, str(step))
        files = []
        for parent, _, names in sorted(os.walk(folder)):
            for name in sorted(names):
                path = os.path.join(parent, name)
                relative = os.path.relpath(path, self.staging).replace(os.sep, "/")
                if self._owns(relative):
                    files.append((path, relative))
        return files

    def _earlier_copy(self, step: int) -> list[str]:
        """This process's files of ``step`` already in the store: a step saved again after its copy
        there could not be read back, or an upload a crash cut short. Its marker, if any, is
        deleted now, so that no reader trusts the step while it is replaced."""
        try:
            earlier = [name for name in self.store.list(str(step)) if self._owns(name)]
            marker = f"{step}/{UPLOADED_MARKER}"
            if marker in earlier:
                self.store.delete([marker])
                earlier.remove(marker)
        except Exception as error:  # noqa: BLE001 - the store cannot be listed or written: the upload fails
            raise RemoteUploadError(step, self.store.where(str(step)), 1, error) from error
        return earlier

    def upload_part(self, step: int) -> None:
        """Upload this process's files of the local ``step`` folder (no marker), then delete the
        files of an earlier copy of the step that this save did not write again, so that the store
        holds this save alone under the step (and a later download fetches nothing else)."""
        earlier = self._earlier_copy(step)
        files = self._own_files(step)
        for index, (path, name) in enumerate(files):
            if index == len(files) // 2 and self.faults is not None:
                if self.faults.cfg.kill_during_upload_step == step and self.faults.once("kill-upload", step):
                    self.faults.kill(f"killed midway through uploading checkpoint step {step}")
            self._put(path, name, step)
        stale = sorted(set(earlier) - {name for _, name in files})
        if stale:
            try:
                self.store.delete(stale)
            except Exception as error:  # noqa: BLE001 - the step is whole; leftovers cost only storage
                print(f"warning: could not delete {len(stale)} files an earlier copy of checkpoint step {step} left "
                      f"in {self.url} ({describe_error(error)}); they stay there", file=sys.stderr, flush=True)

    def _write_marker(self, step: int) -> None:
        marker = os.path.join(self.staging, f".{step}{UPLOADED_MARKER}")
        with open(marker, "w") as handle:
            handle.write(f"{step}\n")
        try:
            self._put(marker, f"{step}/{UPLOADED_MARKER}", step)
        finally:
            os.remove(marker)

    def upload(self, step: int) -> None:
        """Upload the local ``step`` folder, marker last (one process alone)."""
        self.upload_part(step)
        self._write_marker(step)
        self.uploaded.add(step)

    def _agree(self, step: int, what: str, error: RemoteUploadError | None) -> None:
        """Meet the other processes after ``what``; raise this process's ``error``, or one naming
        the first process that failed."""
        reports = self.group.exchange(f"{what}-{step}", "" if error is None else str(error) or "failed")
        if error is not None:
            raise error
        for index, report in enumerate(reports):
            if report:
                raise RemoteUploadError(step, message=f"process {index} could not upload its part: {report}")

    def commit(self, steps: list[int]) -> None:
        """Upload ``steps`` (staged by every process of the group) and mark each complete once all
        its parts are uploaded."""
        if self.group.count == 1:
            for step in steps:
                self.upload(step)
            return
        for step in steps:
            error = None
            try:
                self.upload_part(step)
            except RemoteUploadError as err:
                error = err
            self._agree(step, "parts", error)
            error = None
            if self.group.index == 0:
                try:
                    self._write_marker(step)
                except RemoteUploadError as err:
                    error = err
            self._agree(step, "marker", error)
            self.uploaded.add(step)

    def upload_file(self, path: str, name: str) -> None:
        self._put(path, name, None)

    def sync(self, local_steps: list[int], keep: int) -> None:
        """Upload local steps not yet remote; with ``keep`` >= 0, delete remote steps Orbax no longer keeps."""
        self.commit(self._everywhere(sorted(set(local_steps) - self.uploaded), "saved"))
        if keep is None or keep < 0 or self.group.index != 0:
            return
        try:
            stale = sorted(set(self.complete_steps()) - set(local_steps))
            for step in stale:
                names = self.store.list(str(step))
                marker = f"{step}/{UPLOADED_MARKER}"
                self.store.delete([marker])  # incomplete first, so no reader trusts a half-deleted step
                self.store.delete([name for name in names if name != marker])
        except Exception as err:  # noqa: BLE001 - the new step is uploaded; old ones staying costs only storage
            print(f"warning: could not delete older checkpoints from {self.url} ({describe_error(err)}); they stay "
                  f"there, and the next save tries again", file=sys.stderr, flush=True)

    def remove_staging(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.group.count > 1:  # the run's staging folder, once no process has anything left in it
            try:
                os.rmdir(os.path.dirname(os.path.abspath(self.staging)))
            except OSError:
                pass


def fetch_checkpoint(url: str, step: int | None) -> str:
    """Download remote step ``step`` (newest complete by default) and the tokenizer into a local folder.

    The folder is a checkpoint folder holding that one step, deleted when the process exits.
    """
    steps = RemoteSteps(url)
    atexit.register(steps.remove_staging)
    complete = steps.complete_steps()
    if not complete:
        raise ConfigError(f"{url}: no complete jaxtrain checkpoint found (expected numbered step folders with "
                          f"{UPLOADED_MARKER}); give the save_folder of a run whose checkpoints were uploaded there")
    step = complete[-1] if step is None else step
    if step not in complete:
        raise ConfigError(f"{url}: step {step} is not a complete checkpoint there; complete steps: "
                          f"{', '.join(map(str, complete))}")
    steps.download(step)
    listed = steps.store.list()
    for name in TOKENIZER_FILES:
        if name in listed:
            download_with_retry(steps.store, name, os.path.join(steps.staging, name), retries=DOWNLOAD_RETRY, what=url)
    return steps.staging

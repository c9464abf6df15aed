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
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from jaxtrain.config.schema import ConfigError
from jaxtrain.data.mds.writer import is_remote
from jaxtrain.data.remote import ObjectStore, download_with_retry

UPLOADED_MARKER = "_JAXTRAIN_UPLOADED"
TOKENIZER_FILE = "tokenizer.json"
DOWNLOAD_RETRY = 2
UPLOAD_RETRY = 2
UPLOAD_RETRY_BASE_SECONDS = 0.5  # doubles after each failed attempt

__all__ = ["RemoteSteps", "RemoteUploadError", "fetch_checkpoint", "is_remote"]


class RemoteUploadError(RuntimeError):
    """A checkpoint file could not be uploaded after its retries."""

    def __init__(self, step: int | None, where: str, attempts: int, error: BaseException):
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        super().__init__(f"upload of {where} failed after {attempts} attempts: {type(error).__name__}"
                         + (f": {detail}" if detail else ""))
        self.step = step


class RemoteSteps:
    """The step folders under a remote ``url``, mirrored through a local staging folder."""

    def __init__(self, url: str, staging: str | None = None, *, faults: Any = None):
        self.url = url.rstrip("/")
        self.store = ObjectStore(self.url)
        if staging:
            os.makedirs(staging, exist_ok=True)
        self.staging = staging or tempfile.mkdtemp(prefix="jaxtrain-checkpoints-")
        self.uploaded: set[int] = set()
        self.faults = faults

    def staged_steps(self) -> list[int]:
        """Committed steps in the staging folder (Orbax renames a step folder into place when complete)."""
        if not os.path.isdir(self.staging):
            return []
        return sorted(int(name) for name in os.listdir(self.staging)
                      if name.isdigit() and os.path.isdir(os.path.join(self.staging, name)))

    def reconcile(self) -> int | None:
        """Make staging and remote agree before a run starts; returns the newest step, or None.

        Committed staged steps newer than the newest complete remote step (an upload a crash cut
        short) are uploaded now; older staged steps the remote lacks are dropped; the newest
        remote step is downloaded when it is not staged."""
        remote = self.complete_steps()
        newest_remote = remote[-1] if remote else -1
        self.uploaded.update(remote)
        for step in self.staged_steps():
            if step > newest_remote:
                print(f"checkpoint step {step} was saved but not uploaded to {self.url} before the last run ended; "
                      f"uploading it now", file=sys.stderr, flush=True)
                self.upload(step)
            elif step not in self.uploaded:
                shutil.rmtree(os.path.join(self.staging, str(step)), ignore_errors=True)
        steps = sorted(self.uploaded)
        if steps and steps[-1] not in self.staged_steps():
            self.download(steps[-1])
        return steps[-1] if steps else None

    def complete_steps(self) -> list[int]:
        """Steps whose upload finished (their marker exists), oldest first."""
        steps = set()
        for name in self.store.list():
            step, _, rest = name.partition("/")
            if rest == UPLOADED_MARKER and step.isdigit():
                steps.add(int(step))
        return sorted(steps)

    def download(self, step: int, into: str | None = None) -> str:
        """Copy remote ``step`` into ``into`` (default the staging folder); returns the step's local folder."""
        folder = os.path.join(into or self.staging, str(step))
        for name in self.store.list(str(step)):
            if not name.endswith(UPLOADED_MARKER):
                download_with_retry(self.store, name, os.path.join(into or self.staging, name), retries=DOWNLOAD_RETRY,
                                    what=f"checkpoint step {step}")
        self.uploaded.add(step)
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

    def upload(self, step: int) -> None:
        """Upload the local ``step`` folder, marker last."""
        folder = os.path.join(self.staging, str(step))
        files = [os.path.join(parent, name) for parent, _, names in sorted(os.walk(folder)) for name in sorted(names)]
        for index, path in enumerate(files):
            if index == len(files) // 2 and self.faults is not None:
                if self.faults.cfg.kill_during_upload_step == step and self.faults.once("kill-upload", step):
                    self.faults.kill(f"killed midway through uploading checkpoint step {step}")
            self._put(path, os.path.relpath(path, self.staging).replace(os.sep, "/"), step)
        marker = os.path.join(self.staging, f".{step}{UPLOADED_MARKER}")
        with open(marker, "w") as handle:
            handle.write(f"{step}\n")
        self._put(marker, f"{step}/{UPLOADED_MARKER}", step)
        os.remove(marker)
        self.uploaded.add(step)

    def upload_file(self, path: str, name: str) -> None:
        self._put(path, name, None)

    def sync(self, local_steps: list[int], keep: int) -> None:
        """Upload local steps not yet remote; with ``keep`` >= 0, delete remote steps Orbax no longer keeps."""
        for step in sorted(set(local_steps) - self.uploaded):
            self.upload(step)
        if keep is None or keep < 0:
            return
        stale = sorted(set(self.complete_steps()) - set(local_steps))
        for step in stale:
            names = self.store.list(str(step))
            marker = f"{step}/{UPLOADED_MARKER}"
            self.store.delete([marker])  # incomplete first, so no reader trusts a half-deleted step
            self.store.delete([name for name in names if name != marker])

    def remove_staging(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def fetch_checkpoint(url: str, step: int | None) -> str:
    """Download remote step ``step`` (newest complete by default) and the tokenizer into a local folder.

    The folder is a checkpoint folder holding that one step, deleted when the process exits.
    """
    steps = RemoteSteps(url)
    atexit.register(steps.remove_staging)
    complete = steps.complete_steps()
    if not complete:
        raise ConfigError(f"{url}: no complete jaxtrain checkpoint found (expected numbered step folders with "
                          f"{UPLOADED_MARKER}); check save_folder")
    step = complete[-1] if step is None else step
    if step not in complete:
        raise ConfigError(f"{url}: step {step} is not a complete checkpoint there; complete steps: "
                          f"{', '.join(map(str, complete))}")
    steps.download(step)
    if TOKENIZER_FILE in steps.store.list():
        download_with_retry(steps.store, TOKENIZER_FILE, os.path.join(steps.staging, TOKENIZER_FILE),
                            retries=DOWNLOAD_RETRY, what=url)
    return steps.staging

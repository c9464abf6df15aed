"""Checkpoints in object storage (``save_folder: s3://bucket/run/checkpoints``, ``gs://``, ...).

Orbax writes each step to a local staging folder, where its write-then-rename keeps the step
atomic; the finished step is then uploaded file by file, and an upload marker is written last.
Object stores have no atomic rename, so the marker is what makes a remote step complete: steps
without it (an upload cut short) are ignored by autoresume and ``load_checkpoint``.

A step is uploaded when the next save starts or when the checkpointer closes (both wait for
the asynchronous write first), so training never blocks on the network between saves. On
start, the newest complete remote step is downloaded into staging so that autoresume sees it.
Credentials and endpoints come from the standard environment (``AWS_*`` for ``s3://``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from jaxtrain.config.schema import ConfigError
from jaxtrain.data.mds.writer import is_remote
from jaxtrain.data.remote import ObjectStore, download_with_retry

UPLOADED_MARKER = "_JAXTRAIN_UPLOADED"
TOKENIZER_FILE = "tokenizer.json"
DOWNLOAD_RETRY = 2

__all__ = ["RemoteSteps", "fetch_checkpoint", "is_remote"]


class RemoteSteps:
    """The step folders under a remote ``url``, mirrored through a local staging folder."""

    def __init__(self, url: str, staging: str | None = None):
        self.url = url.rstrip("/")
        self.store = ObjectStore(self.url)
        self.staging = staging or tempfile.mkdtemp(prefix="jaxtrain-checkpoints-")
        self.uploaded: set[int] = set()

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

    def upload(self, step: int) -> None:
        """Upload the local ``step`` folder, marker last."""
        folder = os.path.join(self.staging, str(step))
        for parent, _, names in os.walk(folder):
            for name in sorted(names):
                path = os.path.join(parent, name)
                self.store.put(path, os.path.relpath(path, self.staging).replace(os.sep, "/"))
        marker = os.path.join(self.staging, f".{step}{UPLOADED_MARKER}")
        with open(marker, "w") as handle:
            handle.write(f"{step}\n")
        self.store.put(marker, f"{step}/{UPLOADED_MARKER}")
        os.remove(marker)
        self.uploaded.add(step)

    def upload_file(self, path: str, name: str) -> None:
        self.store.put(path, name)

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

"""Remote checkpoints (``s3://``) written by several processes: each uploads its own part, process 0
marks a step complete once every part is there, and readers download and merge the parts.

The protocol is checked with two threads standing in for two processes (memory:// store), then for
real: two processes of 4 CPU devices train the tiny quickstart data-parallel against a moto S3
server on 127.0.0.1, and the step-3 checkpoint resumes in a fresh pair of processes on a
data x fsdp x tensor mesh (2 x 2 x 2, so parameters are split across the processes) with the losses
and final parameters of the uninterrupted run (read back in a single process).
"""

from __future__ import annotations

import os
import shutil
import threading

import jax
import numpy as np
import pytest

import jaxtrain.checkpoint.remote as remote
from jaxtrain.checkpoint.remote import UPLOADED_MARKER, RemoteSteps, RemoteUploadError
from test_multihost import _train

BUCKET = "multihost"
URL = f"s3://{BUCKET}/run/checkpoints"
SHORT = ["max_duration=6ba", "save_interval=3ba"]  # saves steps 3 and 6


# ----------------------------------------------------------------------------- protocol, two threads


class ThreadGroup:
    """Two "processes" in one: ``exchange`` waits for both threads, like the distributed key-value store."""

    def __init__(self, count: int):
        self.count, self.values, self.barrier = count, {}, threading.Barrier(count, timeout=30)

    def member(self, index: int):
        group = self

        class Member:
            def __init__(self):
                self.index, self.count, self.calls = index, group.count, 0

            def exchange(self, name: str, value: str) -> list[str]:
                self.calls += 1
                name = f"{self.calls}-{name}"
                group.values.setdefault(name, {})[index] = value
                group.barrier.wait()
                return [group.values[name][i] for i in range(group.count)]

        return Member()


def _stage(staging, step: int, process: int) -> None:
    """A staged step as a process writes it: its own OCDBT part; process 0 also the metadata."""
    files = {f"{step}/state/ocdbt.process_{process}/manifest.ocdbt": f"part {process}",
             f"{step}/state/array_metadatas/process_{process}": f"arrays {process}",
             f"{step}/_CHECKPOINT_METADATA": f"written by {process}", f"{step}/state/_METADATA": f"tree {process}"}
    for name, text in files.items():
        path = os.path.join(staging, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)


def _both(function, *steps_objects):
    """Run ``function(steps, index)`` for each process in its own thread; returns results or exceptions."""
    results = [None] * len(steps_objects)

    def target(index):
        try:
            results[index] = function(steps_objects[index], index)
        except BaseException as err:  # noqa: BLE001 - reported to the test
            results[index] = err

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(steps_objects))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_each_process_uploads_its_part_and_process_0_marks_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "UPLOAD_RETRY_BASE_SECONDS", 0.0)
    merged = []
    monkeypatch.setattr(remote, "merge_parts", lambda folder: merged.append(os.path.basename(folder)))
    url = f"memory://{tmp_path.name}/ckpt"
    group = ThreadGroup(2)
    stagings = [str(tmp_path / f"process-{i}") for i in range(2)]
    steps = [RemoteSteps(url, stagings[i], group=group.member(i)) for i in range(2)]
    for i in range(2):
        _stage(stagings[i], 2, i)
    assert _both(lambda s, i: s.sync([2], keep=-1), *steps) == [None, None]
    store = steps[0].store
    names = set(store.list())
    assert {"2/state/ocdbt.process_0/manifest.ocdbt", "2/state/ocdbt.process_1/manifest.ocdbt",
            "2/state/array_metadatas/process_1", f"2/{UPLOADED_MARKER}"} <= names
    store.get("2/_CHECKPOINT_METADATA", str(tmp_path / "check"))
    assert (tmp_path / "check").read_text() == "written by 0"  # the shared files are process 0's

    # Process 1 cannot upload step 4: both processes fail, and step 4 gets no marker.
    for i in range(2):
        _stage(stagings[i], 4, i)
    monkeypatch.setattr(steps[1], "store", type("Failing", (), {
        "put": lambda self, path, name: (_ for _ in ()).throw(OSError("503")),
        "where": lambda self, name: f"{url}/{name}", "list": lambda self, under="": store.list(under)})())
    results = _both(lambda s, i: s.sync([2, 4], keep=-1), *steps)
    assert all(isinstance(err, RemoteUploadError) and err.step == 4 for err in results), results
    assert str(results[0]).startswith("process 1 could not upload its part: upload of")
    assert RemoteSteps(url).complete_steps() == [2]

    # The next start: both staged step 4, only process 0 staged step 6 (process 1 crashed before
    # committing it). Step 4 is uploaded and marked, step 6 dropped; the newest step is made whole.
    _stage(stagings[0], 6, 0)
    group = ThreadGroup(2)
    steps = [RemoteSteps(url, stagings[i], group=group.member(i)) for i in range(2)]
    assert _both(lambda s, i: s.reconcile(), *steps) == [4, 4]
    assert RemoteSteps(url).complete_steps() == [2, 4]
    assert not os.path.exists(os.path.join(stagings[0], "6"))
    assert os.path.exists(os.path.join(stagings[0], "4/state/ocdbt.process_1/manifest.ocdbt"))  # downloaded
    assert os.path.exists(os.path.join(stagings[1], "4/state/ocdbt.process_0/manifest.ocdbt"))
    assert merged == ["4", "4"]


# ----------------------------------------------------------------------------- two real processes


@pytest.fixture(scope="module")
def s3_env(moto_s3):
    """A moto S3 server on 127.0.0.1 and a bucket; the AWS_* variables (inherited by the training
    processes) point every client at it."""
    boto3 = pytest.importorskip("boto3")
    with moto_s3() as (_, aws_env), pytest.MonkeyPatch.context() as patch:
        for name, value in aws_env.items():
            patch.setenv(name, value)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client


def _keys(client) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_two_processes_save_remotely_and_resume_with_the_same_losses(s3_env, tmp_path):
    client = s3_env
    whole = tmp_path / "whole"
    reference = _train(str(whole), processes=2, devices_per_process=4, extra=[*SHORT, f"save_folder={URL}"])
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    keys = set(_keys(client))
    for step in (3, 6):
        assert f"run/checkpoints/{step}/{UPLOADED_MARKER}" in keys
        for process in (0, 1):  # both parts uploaded; they are merged by whoever downloads the step
            assert f"run/checkpoints/{step}/state/ocdbt.process_{process}/manifest.ocdbt" in keys
        assert f"run/checkpoints/{step}/state/manifest.ocdbt" not in keys
    assert "run/checkpoints/tokenizer.json" in keys
    assert not (whole / "checkpoint-staging").exists()  # everything uploaded: staging removed

    from jaxtrain.checkpoint.load import load_checkpoint

    uninterrupted = load_checkpoint(URL)  # downloaded and merged in this single process
    assert uninterrupted.step == 6

    # As if the run had stopped after step 3: step 6 gone from the bucket. A fresh pair of
    # processes (new run folders, nothing staged) resumes from the remote step 3 on a mixed mesh.
    client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": key} for key in keys
                                                             if key.startswith("run/checkpoints/6/")]})
    run = tmp_path / "resumed"
    shutil.copytree(whole / "cache", run / "cache")  # the same tokenizer and rows, without preparing them again
    mixed = ["parallelism.fsdp=2", "parallelism.tensor=2"]
    resumed = _train(str(run), processes=2, devices_per_process=4, extra=[*SHORT, *mixed, f"save_folder={URL}"])
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5)
    again = load_checkpoint(URL)
    assert again.step == 6
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(uninterrupted.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)

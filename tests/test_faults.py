"""Faults at fixed points, then the same command: SIGKILL while a step computes, while a checkpoint
is being written and during eval; a disk that fills up while saving; and remote checkpoints whose
upload fails or is cut short by a crash. Every resumed run must end with exactly the parameters of
an uninterrupted run (CPU, float32, tiny model)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxtrain.checkpoint.load import load_checkpoint
from jaxtrain.checkpoint.manager import Checkpointer, CheckpointSaveError
from jaxtrain.checkpoint.remote import RemoteSteps, RemoteUploadError
from test_end_to_end import command, run, step_losses

# Saves at 2, 4, 6 and 8; held-out eval (one batch) at 3 and 6.
OVERRIDES = ("max_duration=8ba", "save_interval=2ba", "eval_interval=3ba", "eval_subset_num_batches=1",
             "precision=fp32")


def committed(folder: Path) -> list[int]:
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit()) if folder.exists() else []


def uncommitted(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if not name.isdigit() and name[:1].isdigit())


def assert_same_params(folder: Path | str, reference: Path) -> None:
    ours, theirs = load_checkpoint(str(folder)), load_checkpoint(str(reference))
    assert ours.step == theirs.step
    for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(theirs.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def killed(result) -> None:
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def resumed_step(result) -> int | None:
    for line in result.stdout.splitlines():
        if line.startswith("resumed from"):
            return int(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    result = run(command(folder, *OVERRIDES))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_kill_9_during_eval_save_and_step_then_same_command_is_bitwise_equal(reference, tmp_path):
    # Each kill happens once per run folder, so the same command meets them one after another.
    # A later fault never comes before the save that the save fault kills: the next save waits
    # for the previous write.
    args = command(tmp_path, *OVERRIDES, "faults.kill_during_eval_step=3", "faults.kill_during_save_step=4",
                   "faults.kill_during_step=7")
    checkpoints = tmp_path / "checkpoints"

    # (c) SIGKILL during the held-out eval at step 3.
    killed(first := run(args))
    assert "killed during the held-out eval at step 3" in first.stderr
    before = committed(checkpoints)
    assert before in ([], [2])  # step 2's asynchronous write may not have committed

    # (b) SIGKILL while step 4's checkpoint is written: its files are in a temporary folder that is
    # never mistaken for a checkpoint; the rerun resumes from step 2 and removes it.
    killed(second := run(args))
    assert resumed_step(second) == (2 if before else None)
    assert "checkpoint of step 4 is being written" in second.stderr
    assert committed(checkpoints) == [2]
    partial = uncommitted(checkpoints)
    assert len(partial) == 1 and partial[0].startswith("4.")
    # Some of its files: the arrays are written, the merged OCDBT manifest is not.
    assert list((checkpoints / partial[0]).glob("state*/ocdbt.process_0/manifest.ocdbt"))
    assert not list((checkpoints / partial[0]).glob("state*/manifest.ocdbt"))

    # (a) SIGKILL while step 7 computes.
    killed(third := run(args))
    assert resumed_step(third) == 2
    assert "killed while step 7 computes" in third.stderr
    assert not [name for name in uncommitted(checkpoints) if name.startswith("4.")]  # removed at the restart
    latest = committed(checkpoints)[-1]
    assert latest in (4, 6)  # step 6's write may still have been running

    done = run(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert resumed_step(done) == latest
    assert committed(checkpoints)[-1] == 8 and uncommitted(checkpoints) == []
    assert step_losses(tmp_path / "run") == step_losses(reference / "run")
    assert_same_params(checkpoints, reference / "checkpoints")


def test_disk_full_while_saving_fails_loudly_and_keeps_the_previous_checkpoint(reference, tmp_path):
    args = command(tmp_path, *OVERRIDES, "faults.disk_full_at_save_step=4")
    checkpoints = tmp_path / "checkpoints"
    failed = run(args)
    assert failed.returncode == 4, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, failed.stderr[-3000:]
    assert f"checkpoint {checkpoints}/4 could not be saved" in errors[0]
    assert "No space left on device" in errors[0] and "free space" in errors[0]
    assert "checkpoint of step 2 is intact" in errors[0] and "run the same command" in errors[0]
    # the one-line error is all that is said about it (Orbax's own reports go to the debug log)
    assert failed.stderr.strip().splitlines() == errors, failed.stderr[-3000:]
    assert committed(checkpoints) == [2]
    # The failure surfaces as soon as the background write fails, at the latest by the next save.
    assert max(step_losses(tmp_path / "run")) <= 6
    assert "checkpoint_failed" in (tmp_path / "run" / "metrics.jsonl").read_text()

    done = run(args)  # space freed: the same command resumes from the intact step 2
    assert done.returncode == 0, done.stderr[-3000:]
    assert resumed_step(done) == 2
    assert_same_params(checkpoints, reference / "checkpoints")


# ----------------------------------------------------------------------------- remote


def test_failing_upload_is_retried_then_raises_naming_the_step(tmp_path, monkeypatch):
    import jaxtrain.checkpoint.remote as remote

    monkeypatch.setattr(remote, "UPLOAD_RETRY_BASE_SECONDS", 0.0)
    steps = RemoteSteps(f"memory://{tmp_path.name}/ckpt", str(tmp_path / "staging"))
    (tmp_path / "staging" / "3" / "state").mkdir(parents=True)
    (tmp_path / "staging" / "3" / "state" / "data").write_bytes(b"x")
    calls = []

    def put(path, name):
        calls.append(name)
        raise ConnectionError("endpoint unreachable")

    monkeypatch.setattr(steps.store, "put", put)
    with pytest.raises(RemoteUploadError) as info:
        steps.upload(3)
    assert info.value.step == 3 and len(calls) == remote.UPLOAD_RETRY + 1
    assert "3/state/data failed after 3 attempts: ConnectionError: endpoint unreachable" in str(info.value)
    assert steps.complete_steps() == []


def test_checkpointer_turns_a_failed_upload_into_one_line_naming_the_checkpoint(tmp_path, monkeypatch):
    import jaxtrain.checkpoint.remote as remote

    monkeypatch.setattr(remote, "UPLOAD_RETRY_BASE_SECONDS", 0.0)
    url = f"memory://{tmp_path.name}/ckpt"
    state = {"w": jax.numpy.arange(4.0)}
    checkpointer = Checkpointer(url, staging=str(tmp_path / "staging"))
    checkpointer.save(1, state, {})
    checkpointer.wait()
    assert checkpointer.remote.complete_steps() == [1]
    checkpointer.save(2, state, {})
    monkeypatch.setattr(checkpointer.remote.store, "put", lambda path, name: (_ for _ in ()).throw(OSError("503")))
    with pytest.raises(CheckpointSaveError) as info:
        checkpointer.close()
    message = str(info.value)
    assert info.value.code == 4 and "\n" not in message
    assert message.startswith(f"checkpoint {url}/2 could not be saved (upload of {url}/2/")
    assert "the checkpoint of step 1 is intact" in message and "credentials" in message
    assert (tmp_path / "staging" / "2").is_dir(), "the staged step stays for the next run to upload"
    assert RemoteSteps(url).complete_steps() == [1]


def test_upload_cut_short_by_a_crash_is_finished_by_the_next_run(reference, tmp_path, s3_checkpoints):
    client, bucket, url = s3_checkpoints
    args = command(tmp_path, *OVERRIDES, f"save_folder={url}", "faults.kill_during_upload_step=4")

    def keys():
        return [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]

    # Step 4 is committed in staging, then uploaded when the step-6 save starts; the kill lands midway.
    killed(crashed := run(args))
    assert "midway through uploading checkpoint step 4" in crashed.stderr
    assert RemoteSteps(url).complete_steps() == [2]
    assert any(key.startswith("run/checkpoints/4/") for key in keys())  # some files, no marker
    assert (tmp_path / "run" / "checkpoint-staging" / "4").is_dir()

    done = run(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checkpoint step 4 was saved but not uploaded" in done.stderr
    assert resumed_step(done) == 4  # not 2: the remote copy no longer lags behind
    assert RemoteSteps(url).complete_steps()[-1] == 8
    assert not (tmp_path / "run" / "checkpoint-staging").exists()  # everything uploaded: staging removed
    assert step_losses(tmp_path / "run") == step_losses(reference / "run")
    assert_same_params(url, reference / "checkpoints")

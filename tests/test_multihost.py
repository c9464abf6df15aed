"""Multi-host runs: cluster detection from the environment, and a real two-process run on this machine.

Two processes of 4 CPU devices each join over 127.0.0.1 (launch/local.py), train the tiny
quickstart through the CLI and checkpoint; the step-4 checkpoint then resumes in one process of 4
devices with the losses of the uninterrupted two-process run. Resuming on two processes, there on
a data x fsdp x tensor mesh, is test_multihost_remote's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cpu_devices_env

from jaxtrain.parallel.distributed import ClusterSpec, DistributedError, detect_cluster, first_slurm_host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "variables.max_seq_len=64", "model.d_model=64", "model.n_layers=2", "model.vocab_size=1024",
    "tokenizer.kwargs.vocab_size=1024", "train_loader.dataset.max_files=60", "eval_loader.dataset.max_files=200",
    "global_train_batch_size=8", "device_train_microbatch_size=1", "eval_interval=0", "progress_bar=false",
    "max_duration=8ba", "save_interval=4ba", "save_num_checkpoints_to_keep=-1", "eval_first=false",
    "eval_subset_num_batches=1",
    # Layouts agree to float32 tolerance; in bf16 a different reduction order moves the last bits.
    "precision=fp32",
]


# ----------------------------------------------------------------------------- detection


def test_explicit_env_names_the_cluster():
    env = {"JAXTRAIN_COORDINATOR_ADDRESS": "10.0.0.2:9999", "JAXTRAIN_NUM_PROCESSES": "4", "JAXTRAIN_PROCESS_ID": "3"}
    assert detect_cluster(env) == ClusterSpec("env", "10.0.0.2:9999", 4, 3)
    env["JAXTRAIN_COORDINATOR_ADDRESS"] = "head-node"  # the default port is added
    assert detect_cluster(env).coordinator_address == "head-node:8476"


def test_kubernetes_indexed_job_takes_the_completion_index():
    env = {"JOB_COMPLETION_INDEX": "2", "JAXTRAIN_COORDINATOR_ADDRESS": "run-workers-0-0.run:8476",
           "JAXTRAIN_NUM_PROCESSES": "4"}
    assert detect_cluster(env) == ClusterSpec("kubernetes", "run-workers-0-0.run:8476", 4, 2)


def test_slurm_uses_the_first_node_and_a_port_from_the_job_id():
    env = {"SLURM_NTASKS": "3", "SLURM_PROCID": "1", "SLURM_JOB_NODELIST": "gpu[007-009]", "SLURM_JOB_ID": "123456"}
    assert detect_cluster(env) == ClusterSpec("slurm", "gpu007:8932", 3, 1)
    assert detect_cluster({**env, "JAXTRAIN_COORDINATOR_PORT": "7000"}).coordinator_address == "gpu007:7000"
    assert detect_cluster({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "a1"}) is None


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("gpu[003-006,9],cpu1", "gpu003"), ("a-b-[10,12]", "a-b-10"), ("x1,x2", "x1"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_nothing_set_or_off_is_a_single_process():
    assert detect_cluster({}) is None
    assert detect_cluster({"JAXTRAIN_DISTRIBUTED": "off", "SLURM_NTASKS": "8"}) is None
    assert detect_cluster({"JAXTRAIN_DISTRIBUTED": "tpu"}) == ClusterSpec("tpu")


@pytest.mark.parametrize("env, message", [
    ({"JAXTRAIN_COORDINATOR_ADDRESS": "h:1"}, "JAXTRAIN_COORDINATOR_ADDRESS is set but JAXTRAIN_NUM_PROCESSES is not"),
    ({"JAXTRAIN_COORDINATOR_ADDRESS": "h:1", "JAXTRAIN_NUM_PROCESSES": "2"}, "neither JAXTRAIN_PROCESS_ID nor"),
    ({"JAXTRAIN_COORDINATOR_ADDRESS": "h:1", "JAXTRAIN_NUM_PROCESSES": "2", "JAXTRAIN_PROCESS_ID": "2"},
     "process id 2 is outside [0, 2) processes"),
    ({"JAXTRAIN_COORDINATOR_ADDRESS": "h:1", "JAXTRAIN_NUM_PROCESSES": "two", "JAXTRAIN_PROCESS_ID": "0"},
     "JAXTRAIN_NUM_PROCESSES='two' is not an integer"),
    ({"JAXTRAIN_DISTRIBUTED": "maybe"}, "JAXTRAIN_DISTRIBUTED='maybe': use auto, off or tpu"),
])
def test_incomplete_environments_say_what_is_missing(env, message):
    with pytest.raises(DistributedError, match=None) as info:
        detect_cluster(env)
    assert message in str(info.value)


def test_unreachable_coordinator_is_one_line_naming_address_and_timeout(tmp_path):
    env = dict(os.environ, JAXTRAIN_COORDINATOR_ADDRESS="127.0.0.1:1", JAXTRAIN_NUM_PROCESSES="2",
               JAXTRAIN_PROCESS_ID="1", JAXTRAIN_DISTRIBUTED_TIMEOUT="2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: process 1 of 2 (env): the coordinator at 127.0.0.1:1 did not answer within 2s")


@pytest.mark.parametrize("env, message", [
    ({"JAXTRAIN_PROCESS_ID": "1"}, "JAXTRAIN_PROCESS_ID (--process_id) is set but JAXTRAIN_COORDINATOR_ADDRESS and "
                                   "JAXTRAIN_NUM_PROCESSES (--coordinator_address, --num_processes) are not"),
    ({"JAXTRAIN_COORDINATOR_ADDRESS": "127.0.0.1:abc", "JAXTRAIN_NUM_PROCESSES": "2", "JAXTRAIN_PROCESS_ID": "0"},
     "JAXTRAIN_COORDINATOR_ADDRESS: coordinator address '127.0.0.1:abc': expected host:port with a port from 1"),
])
def test_a_process_id_alone_or_a_port_that_is_not_a_number_is_refused_at_once(env, message):
    with pytest.raises(DistributedError) as info:
        detect_cluster(env)
    assert message in str(info.value)


def _check_in(port: int, processes: list[tuple[int, int]], timeout_s: float = 20) -> dict:
    """Run the check-in of ``processes`` ((process id, process count) each; id 0 gathers) in threads;
    returns {index: "ok" or the error} in the order given."""
    import threading

    from jaxtrain.parallel import rendezvous

    results: dict = {}

    def one(index: int, process_id: int, count: int) -> None:
        try:
            if process_id == 0 and index == 0:
                rendezvous.gather(port, count, timeout_s)
            else:
                rendezvous.report("127.0.0.1", port, process_id, count, timeout_s)
            results[index] = "ok"
        except rendezvous.CheckInError as err:
            results[index] = str(err)

    threads = [threading.Thread(target=one, args=(i, *p)) for i, p in enumerate(processes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_processes_check_in_before_joining_and_every_one_reports_why_they_cannot_run_together():
    """Before JAX's runtime (which aborts a process whose peers do not all register, and takes
    processes started with other counts), each process checks in with process 0: all ok, or every
    process gets the same one-line reason."""
    assert _check_in(free_port(), [(0, 3), (2, 3), (1, 3)]) == {0: "ok", 1: "ok", 2: "ok"}
    counts = _check_in(free_port(), [(0, 2), (1, 3)])
    assert set(counts.values()) == {"process 1 was started with 3 processes and process 0 with 2; start every "
                                    "process with the same count"}
    twice = _check_in(free_port(), [(0, 3), (1, 3), (1, 3)])
    assert len(twice) == 3 and set(twice.values()) == {
        "two processes were started as process 1; give each process its own id from 0 to 2"}
    started = time.monotonic()
    alone = _check_in(free_port(), [(0, 3), (2, 3)], timeout_s=1.5)
    assert time.monotonic() - started < 20
    assert set(alone.values()) == {"only 2 of 3 processes started within 1.5s (missing: process 1); start the "
                                   "command on every host, each with its own process id"}


def test_process_0_alone_is_one_line_after_the_timeout(tmp_path):
    env = dict(os.environ, JAXTRAIN_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAXTRAIN_NUM_PROCESSES="2",
               JAXTRAIN_PROCESS_ID="0", JAXTRAIN_DISTRIBUTED_TIMEOUT="2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: process 0 of 2 (env): only 1 of 2 processes started within 2s (missing: "
                               "process 1)"), lines[0]


STOPPING_PEER = """
import os
from jaxtrain.parallel.distributed import initialize_from_env
initialize_from_env()
import jax
from jaxtrain.checkpoint.remote import DistributedProcesses, RemoteUploadError
from jaxtrain.parallel import failures
if jax.process_index() == 1:  # stops on an error before the checkpoint meeting
    failures.note("cannot list s3://bucket/run (EndpointConnectionError); check the URL")
    failures.announce(4)
    os._exit(4)
try:
    DistributedProcesses().exchange("uploaded", "0")
except RemoteUploadError as err:
    print(f"caught: {err}", flush=True)
os._exit(0)  # as the entry point leaves after an error: JAX's shutdown would wait for process 1
"""


def test_a_process_that_stops_on_an_error_is_named_where_the_others_wait():
    """A process of a multi-host run that stops on an error writes it into the run's key-value
    store and leaves; another waiting for it at a checkpoint meeting (30 minutes at most) stops
    within seconds, naming the process and its error."""
    port = free_port()
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", STOPPING_PEER], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu", JAXTRAIN_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                       JAXTRAIN_NUM_PROCESSES="2", JAXTRAIN_PROCESS_ID=str(index)))
             for index in (0, 1)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert procs[1].returncode == 4, outputs[1][1][-2000:]
    assert procs[0].returncode == 0, outputs[0][1][-2000:]
    assert ("caught: process 1 stopped: cannot list s3://bucket/run (EndpointConnectionError); check the URL"
            in outputs[0][0]), outputs[0]
    assert time.monotonic() - started < 60


# ----------------------------------------------------------------------------- two processes on this machine


def _cli(run_folder, *, processes: int, devices_per_process: int, extra=()) -> subprocess.CompletedProcess:
    """Run the tiny quickstart via the CLI on ``processes`` x ``devices_per_process`` CPU devices."""
    args = ["--config", "configs/quickstart.yaml"]
    for override in TINY + [f"run_folder={run_folder}", f"save_folder={run_folder}/ckpt", *extra]:
        args += ["--set", override]
    if processes > 1:
        command = [sys.executable, "launch/local.py", "--num_processes", str(processes),
                   "--cpu_devices_per_process", str(devices_per_process), "--", *args]
        env = dict(os.environ)
    else:
        command = [sys.executable, "-m", "jaxtrain.main", *args]
        env = cpu_devices_env(devices_per_process)
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _train(run_folder, *, processes: int, devices_per_process: int, extra=(), output: list | None = None) -> dict[int, float]:
    """Train via the CLI; returns {step: train/loss} from metrics.jsonl (one value per step). The
    run's output lines are appended to ``output`` when given."""
    proc = _cli(run_folder, processes=processes, devices_per_process=devices_per_process, extra=extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{processes * devices_per_process} device(s)" in proc.stdout
    if output is not None:
        output.extend(proc.stdout.splitlines())
    losses: dict[int, float] = {}
    with open(os.path.join(run_folder, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "train/loss" in record:
                assert losses.setdefault(record["step"], record["train/loss"]) == record["train/loss"]
    return losses


def _resume_copy(source, target) -> str:
    """A copy of ``source`` as it was after step 4: the step-8 checkpoint and the metrics removed."""
    shutil.copytree(source, target)
    shutil.rmtree(os.path.join(target, "ckpt", "8"))
    os.remove(os.path.join(target, "metrics.jsonl"))
    return str(target)


# remat auto: every process settles its train step itself, on the capacity all of them agree on
AUTO = ["model.remat=auto"]


def _two_processes(folder: Path) -> dict:
    output: list[str] = []
    losses = _train(str(folder / "two"), processes=2, devices_per_process=4, extra=AUTO, output=output)
    settled = sorted(line.split("]")[0] for line in output if "model.remat auto: settled on none" in line)
    return {"folder": str(folder / "two"), "losses": losses, "settled": settled}


@pytest.fixture(scope="module")
def two_process_run(once_per_session):
    """The uninterrupted run (its folder is only read; tests copy what they change)."""
    run = once_per_session("multihost-two-processes", _two_processes)
    return Path(run["folder"]), {int(step): loss for step, loss in run["losses"].items()}, run["settled"]


def test_two_processes_train_and_checkpoint(two_process_run):
    folder, losses, settled = two_process_run
    assert settled == ["[0", "[1"]  # both processes settled remat auto, the same way
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1]
    state = folder / "ckpt" / "4" / "state"
    assert (state / "commit_success.txt").exists()
    # each process wrote its own shards of the one checkpoint
    assert (state / "ocdbt.process_0").exists() and (state / "ocdbt.process_1").exists()


def test_checkpoint_resumes_in_one_process_with_half_the_devices_and_the_same_losses(two_process_run, tmp_path):
    folder, reference, _ = two_process_run
    resumed = _train(_resume_copy(folder, tmp_path / "resumed"), processes=1, devices_per_process=4, extra=AUTO)
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5)


def test_tensor_axis_spanning_processes_is_refused_with_the_rows(tmp_path):
    proc = _cli(str(tmp_path), processes=2, devices_per_process=4,
                extra=["parallelism.tensor=8", "model.n_heads=8", "save_folder=null"])
    assert proc.returncode == 2
    assert ("[0] error: process 0 of 2 loads batch rows 0-3 of 8, but mesh {'data': 1, 'fsdp': 1, 'tensor': 8} "
            "puts rows 0-7 on its devices") in proc.stdout


def test_cluster_launchers_parse_and_agree_on_the_process_count():
    import yaml

    for script in ("launch/tpu_pod.sh", "launch/slurm.sbatch"):
        subprocess.run(["bash", "-n", os.path.join(ROOT, script)], check=True)
    with open(os.path.join(ROOT, "launch/k8s-jobset.yaml")) as f:
        jobset = yaml.safe_load(f)
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert job["completionMode"] == "Indexed"
    assert job["parallelism"] == job["completions"] == int(env["JAXTRAIN_NUM_PROCESSES"])
    spec = detect_cluster({**env, "JOB_COMPLETION_INDEX": "1"})
    assert spec == ClusterSpec("kubernetes", "jaxtrain-workers-0-0.jaxtrain:8476", 2, 1)
    assert container["command"] == ["python", "-m", "jaxtrain.main"]


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_the_run_resumes(tmp_path):
    """JAX's preemption service: a SIGTERM to process 1 alone makes both processes agree on a step,
    save that step's checkpoint together and exit 143; the same command then continues."""
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    from local import free_port, process_env

    run = tmp_path / "run"
    args = ["-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"]
    for override in TINY + [f"run_folder={run}", f"save_folder={run}/ckpt", "max_duration=400ba", "save_interval=1000ba"]:
        args += ["--set", override]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *args], env=process_env(index, 2, port, 4), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for index in range(2)]
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and all(proc.poll() is None for proc in procs):
        if metrics.exists() and metrics.read_text().count("train/loss") >= 2:
            break
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [143, 143], outputs[0][-2000:] + outputs[1][-2000:]
    stops = [re.findall(r"stopping at step (\d+) \(SIGTERM\)", out) for out in outputs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops
    step = int(stops[0][0])
    assert 2 <= step < 400
    state = run / "ckpt" / str(step) / "state"
    assert (state / "commit_success.txt").exists()
    assert (state / "ocdbt.process_0").exists() and (state / "ocdbt.process_1").exists()

    resumed = _cli(run, processes=2, devices_per_process=4, extra=[f"max_duration={step + 2}ba"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {run}/ckpt at step {step}" in resumed.stdout
    with open(metrics) as f:
        logged = {json.loads(line)["step"] for line in f if "train/loss" in line}
    assert {step + 1, step + 2} <= logged

"""Session-wide test settings."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import socket
import subprocess

import pytest

# XLA:CPU compiles its kernels with LLVM at -O2 by default; most of this suite's time is compiling
# small programs, and LLVM's optimisation is about 40 % of each compile. The tests check
# programs (the optimized HLO is the same at every LLVM level) and numbers, not speed, so they
# compile at -O0; runs the tests launch inherit the setting. Set XLA_FLAGS with another
# --xla_backend_optimization_level to test at that level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

from jaxtrain.train.host_allocator import retain_freed_memory  # noqa: E402

retain_freed_memory()  # as the entry points do: tests run the CPU train step the way users do

# Test processes (``-n auto`` in pyproject.toml): one per core, at most four. Most of the time
# goes to single-threaded XLA compiles and Python start-up of launched runs, so two processes on
# two cores finish the suite about 30 % sooner; more than four mostly add memory.
MAX_TEST_PROCESSES = 4


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(MAX_TEST_PROCESSES, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """Runs launched by tests (subprocesses inherit the variable), the test process itself and the
    session's other test processes share one XLA compilation cache: most of them train the same
    tiny model, so each program is compiled about once per session (a cached program is the same
    executable, so the numbers are the same; an entry read while another process writes it is
    compiled again, as JAX reads a damaged entry)."""
    if "JAXTRAIN_COMPILATION_CACHE_DIR" in os.environ:
        yield
        return
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the session's test processes
    folder = str(root / "xla-cache")
    os.makedirs(folder, exist_ok=True)
    os.environ["JAXTRAIN_COMPILATION_CACHE_DIR"] = folder
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    yield
    os.environ.pop("JAXTRAIN_COMPILATION_CACHE_DIR", None)


REFERENCE_PYTHON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-ref", "bin", "python")


TPU_COMPILER_PYTHON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-tpu", "bin", "python")


@pytest.fixture(scope="session")
def tpu_compiler_python() -> str:
    """jaxtrain with libtpu in a side environment (built by ``.ci/tpu-env``), for compiling to TPU
    chips without one; tests that need it skip only where that environment is absent."""
    if not os.path.isfile(TPU_COMPILER_PYTHON):
        pytest.skip(f"no TPU compiler environment at {TPU_COMPILER_PYTHON} (built by .ci/tpu-env)")
    return TPU_COMPILER_PYTHON


@pytest.fixture(scope="session")
def streaming_python() -> str:
    """The Python 3.11 reference environment with mosaicml-streaming (built by ``.ci/reference-env``);
    tests that compare against the package skip only where that environment is absent."""
    if not os.path.isfile(REFERENCE_PYTHON):
        pytest.skip(f"no reference environment at {REFERENCE_PYTHON} (Python 3.11 with mosaicml-streaming)")
    probe = subprocess.run([REFERENCE_PYTHON, "-c", "import importlib.util as u; print(u.find_spec('streaming') is not None)"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        pytest.skip(f"mosaicml-streaming is not installed in {REFERENCE_PYTHON}")
    return REFERENCE_PYTHON


@pytest.fixture(scope="session")
def run_streaming(streaming_python, tmp_path_factory):
    """``run_streaming(args, **subprocess_kwargs)``: ``streaming_python`` with ``args``, one at a time
    across the session's test processes. Streaming names its shared memory by the lowest free
    prefix, so two of its processes starting at once can claim the same one and fail."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the session's test processes

    def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
        with open(root / "streaming.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            return subprocess.run([streaming_python, *args], **kwargs)

    return run


@contextlib.contextmanager
def _moto_s3_server():
    moto_server = pytest.importorskip("moto.server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_s3():
    """Starts a moto S3 server on a free 127.0.0.1 port: ``with moto_s3() as (url, aws_env):``,
    where ``aws_env`` holds the AWS_* variables that point boto3 (and the runs tests launch) at it."""
    return _moto_s3_server


def cpu_devices_env(count: int) -> dict:
    """The environment of a child process on ``count`` simulated CPU devices (other XLA flags,
    such as the optimisation level above, kept). Tests import it: ``from conftest import ...``."""
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    return dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")


@pytest.fixture(scope="session")
def once_per_session(tmp_path_factory):
    """``once_per_session(name, compute)``: a JSON-able result computed once for the whole session.

    With ``-n`` several test processes may each run a module's tests and so each set up its
    module-scoped fixtures; a costly one (a child process that trains on 8 simulated devices)
    should run once. The processes share the parent of their temporary folders: the first to
    ask computes ``compute(folder)`` under a lock and writes the result there; the others wait
    for the lock and read it. A failing ``compute`` writes nothing, so each asker fails alike."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the session's test processes

    def run(name: str, compute):
        result_file = root / f"{name}.json"
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if result_file.exists():
                return json.loads(result_file.read_text())
            folder = root / name
            folder.mkdir(exist_ok=True)
            result = compute(folder)
            result_file.write_text(json.dumps(result))
            return result

    return run


_BUCKETS = itertools.count()


@pytest.fixture
def s3_checkpoints(moto_s3, monkeypatch):
    """``s3://`` checkpoints on a moto server at 127.0.0.1; yields (boto3 client, bucket, save_folder URL).
    Each use gets a bucket of its own: moto keeps its buckets in the process, across servers."""
    boto3 = pytest.importorskip("boto3")
    bucket = f"checkpoints-{os.getpid()}-{next(_BUCKETS)}"
    with moto_s3() as (_, aws_env):
        for name, value in aws_env.items():
            monkeypatch.setenv(name, value)
        client = boto3.client("s3")
        client.create_bucket(Bucket=bucket)
        yield client, bucket, f"s3://{bucket}/run/checkpoints"

"""Session-wide test settings."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess

import pytest

from jaxtrain.train.host_allocator import retain_freed_memory

retain_freed_memory()  # as the entry points do: tests run the CPU train step the way users do

# Test processes (``-n auto`` in pyproject.toml): one per core, at most four. Most of the time
# goes to single-threaded XLA compiles and Python start-up of launched runs, so two processes on
# two cores finish the suite about 30 % sooner; more than four mostly add memory.
MAX_TEST_PROCESSES = 4


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(MAX_TEST_PROCESSES, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """Runs launched by tests (subprocesses inherit the variable) share one XLA compilation cache:
    most of them train the same tiny model, so each program is compiled once per session."""
    if "JAXTRAIN_COMPILATION_CACHE_DIR" in os.environ:
        yield
        return
    os.environ["JAXTRAIN_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla-cache"))
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

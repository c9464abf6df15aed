"""Multi-host start-up: find the cluster from the environment and join it with ``jax.distributed``.

Every process of a multi-host run calls ``initialize_from_env()`` before any other JAX call; one
process per host (or per GPU node) sees that host's devices, and ``jax.devices()`` then lists
them all. The cluster is read from, in order:

1. ``JAXTRAIN_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAXTRAIN_NUM_PROCESSES`` and
   ``JAXTRAIN_PROCESS_ID``; on a Kubernetes indexed Job or JobSet ``JOB_COMPLETION_INDEX`` stands
   in for the process id;
2. SLURM (``SLURM_NTASKS`` > 1): ``SLURM_PROCID``, and the first host of ``SLURM_JOB_NODELIST``
   as the coordinator;
3. a Cloud TPU VM (TPU devices and libtpu present): JAX's own detection of the pod slice.

Anything else is a single process, and nothing is initialised. ``JAXTRAIN_DISTRIBUTED=off``
skips detection; ``JAXTRAIN_DISTRIBUTED_TIMEOUT`` (seconds, default 300) bounds the wait for
all processes to join.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
from typing import Mapping

DEFAULT_PORT = 8476
DEFAULT_TIMEOUT_S = 300


class DistributedError(RuntimeError):
    """The cluster could not be described or joined."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins the run; ``coordinator_address`` None means JAX detects it (TPU)."""

    source: str  # "env", "kubernetes", "slurm" or "tpu"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[003-006,9],cpu1"`` -> ``"gpu003"``."""
    match = re.match(r"\s*([^,\[]+)(\[([^\]]*)\])?", nodelist)
    if not match or not match.group(1).strip():
        raise DistributedError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read a host name from it")
    prefix, ranges = match.group(1).strip(), match.group(3)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0].strip()


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DistributedError(f"{name}={env[name]!r} is not an integer") from None


def _on_tpu_vm(env: Mapping[str, str]) -> bool:
    has_chips = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")) or "TPU_WORKER_HOSTNAMES" in env
    return has_chips and importlib.util.find_spec("libtpu") is not None


def detect_cluster(env: Mapping[str, str] | None = None) -> ClusterSpec | None:
    """The cluster this process belongs to, or None for a single-process run."""
    env = os.environ if env is None else env
    mode = env.get("JAXTRAIN_DISTRIBUTED", "auto").strip().lower()
    if mode in ("off", "0", "false", "no"):
        return None
    if mode not in ("auto", "tpu"):
        raise DistributedError(f"JAXTRAIN_DISTRIBUTED={mode!r}: use auto, off or tpu")
    if mode == "tpu":
        return ClusterSpec(source="tpu")

    explicit = [name for name in ("JAXTRAIN_COORDINATOR_ADDRESS", "JAXTRAIN_NUM_PROCESSES") if env.get(name)]
    if env.get("JAXTRAIN_PROCESS_ID") and not explicit:  # a host that would train alone on a shared run's folders
        raise DistributedError("JAXTRAIN_PROCESS_ID (--process_id) is set but JAXTRAIN_COORDINATOR_ADDRESS and "
                               "JAXTRAIN_NUM_PROCESSES (--coordinator_address, --num_processes) are not; set all "
                               "three, or none for a single process")
    if explicit:
        if len(explicit) == 1:
            missing = ({"JAXTRAIN_COORDINATOR_ADDRESS", "JAXTRAIN_NUM_PROCESSES"} - set(explicit)).pop()
            raise DistributedError(f"{explicit[0]} is set but {missing} is not; set both (and JAXTRAIN_PROCESS_ID)")
        address = env["JAXTRAIN_COORDINATOR_ADDRESS"].strip()
        if ":" not in address:
            address = f"{address}:{DEFAULT_PORT}"
        _check_address("JAXTRAIN_COORDINATOR_ADDRESS", address)
        num_processes = _int_env(env, "JAXTRAIN_NUM_PROCESSES")
        if env.get("JAXTRAIN_PROCESS_ID"):
            process_id, source = _int_env(env, "JAXTRAIN_PROCESS_ID"), "env"
        elif env.get("JOB_COMPLETION_INDEX"):
            process_id, source = _int_env(env, "JOB_COMPLETION_INDEX"), "kubernetes"
        else:
            raise DistributedError("JAXTRAIN_COORDINATOR_ADDRESS is set but neither JAXTRAIN_PROCESS_ID nor "
                                   "JOB_COMPLETION_INDEX is; set this process's id")
        return _checked(ClusterSpec(source, address, num_processes, process_id))

    if env.get("SLURM_NTASKS") and _int_env(env, "SLURM_NTASKS") > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise DistributedError("SLURM_NTASKS > 1 but SLURM_JOB_NODELIST is unset; run the job under srun")
        if "SLURM_PROCID" not in env:
            raise DistributedError("SLURM_NTASKS > 1 but SLURM_PROCID is unset; start each task with srun")
        if env.get("JAXTRAIN_COORDINATOR_PORT"):
            port = _int_env(env, "JAXTRAIN_COORDINATOR_PORT")
        else:  # two jobs whose first node is the same must not share a port
            port = DEFAULT_PORT + (_int_env(env, "SLURM_JOB_ID") % 1000 if env.get("SLURM_JOB_ID") else 0)
        return _checked(ClusterSpec("slurm", f"{first_slurm_host(nodelist)}:{port}",
                                    _int_env(env, "SLURM_NTASKS"), _int_env(env, "SLURM_PROCID")))

    if _on_tpu_vm(env):
        return ClusterSpec(source="tpu")
    return None


def _check_address(name: str, address: str) -> None:
    from jaxtrain.parallel.rendezvous import CheckInError, split_address

    try:
        split_address(address)
    except CheckInError as err:
        raise DistributedError(f"{name}: {err}") from None


def _checked(spec: ClusterSpec) -> ClusterSpec:
    if spec.num_processes is None or spec.num_processes < 1:
        raise DistributedError(f"{spec.source}: the number of processes must be positive, got {spec.num_processes}")
    if not 0 <= spec.process_id < spec.num_processes:
        raise DistributedError(
            f"{spec.source}: process id {spec.process_id} is outside [0, {spec.num_processes}) processes"
        )
    return spec


def initialize_from_env(env: Mapping[str, str] | None = None, *, timeout_s: int | None = None) -> ClusterSpec | None:
    """Join the multi-host run the environment describes; returns its spec, or None when single-process.

    Call once per process before any JAX computation. A coordinator that does not answer
    within the timeout raises DistributedError naming the address and the timeout.
    """
    env = os.environ if env is None else env
    spec = detect_cluster(env)
    if spec is None or (spec.num_processes == 1 and spec.source != "tpu"):
        return spec
    if timeout_s is None:
        has_timeout = bool(env.get("JAXTRAIN_DISTRIBUTED_TIMEOUT"))
        timeout_s = _int_env(env, "JAXTRAIN_DISTRIBUTED_TIMEOUT") if has_timeout else DEFAULT_TIMEOUT_S
    import jax

    if spec.source == "tpu":
        try:
            jax.distributed.initialize(initialization_timeout=timeout_s)
        except Exception as err:  # noqa: BLE001 - the cause is named in the message
            raise DistributedError(
                f"TPU pod start-up did not complete within {timeout_s}s ({_first_line(err)}); start the command on "
                "every worker (--worker=all)"
            ) from None
        return spec
    # The runtime aborts the process when the coordinator cannot be reached or not every process
    # registers, and takes processes started with other counts: check in first, where each of
    # those can still be reported (``jaxtrain.parallel.rendezvous``).
    from jaxtrain.parallel import rendezvous

    who = f"process {spec.process_id} of {spec.num_processes} ({spec.source})"
    print(f"{who}: checking in with the coordinator at {spec.coordinator_address} (waiting up to {timeout_s}s "
          f"for all processes)", flush=True)  # progress, on stdout: stderr holds errors alone
    try:
        host, port = rendezvous.split_address(spec.coordinator_address)
        if spec.process_id == 0:
            rendezvous.gather(port, spec.num_processes, timeout_s)
        else:
            rendezvous.report(host, port, spec.process_id, spec.num_processes, timeout_s)
    except rendezvous.CheckInError as err:
        raise DistributedError(f"{who}: {err}") from None
    try:  # every process has started: joining takes seconds
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            initialization_timeout=timeout_s,
        )
    except Exception as err:  # noqa: BLE001 - the cause is named in the message
        raise DistributedError(
            f"process {spec.process_id} of {spec.num_processes} could not join the coordinator at "
            f"{spec.coordinator_address} within {timeout_s}s ({spec.source}; {_first_line(err)})"
        ) from None
    return spec


def _first_line(err: Exception) -> str:
    from jaxtrain.config.schema import error_line

    return error_line(err, 200)


def env_with_flags(coordinator_address: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None) -> dict[str, str]:
    """The process environment with command-line values in place of the JAXTRAIN_* variables."""
    env = dict(os.environ)
    for name, value in (("JAXTRAIN_COORDINATOR_ADDRESS", coordinator_address),
                        ("JAXTRAIN_NUM_PROCESSES", num_processes), ("JAXTRAIN_PROCESS_ID", process_id)):
        if value is not None:
            env[name] = str(value)
    return env

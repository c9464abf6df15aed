#!/usr/bin/env python3
# Run N jaxtrain processes on this machine as one multi-host job (a rehearsal for a real cluster):
#
#   python launch/local.py --num_processes 2 --cpu_devices_per_process 4 -- --config configs/quickstart.yaml
#
# Everything after "--" goes to `python -m jaxtrain.main`. Each process gets JAXTRAIN_COORDINATOR_ADDRESS
# (127.0.0.1 and a free port), JAXTRAIN_NUM_PROCESSES and JAXTRAIN_PROCESS_ID; with
# --cpu_devices_per_process it runs on the CPU with that many simulated devices. Output lines are
# prefixed with the process id; if one process fails, the others are stopped.
"""Launch N local processes of one multi-host jaxtrain run."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, cpu_devices: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAXTRAIN_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAXTRAIN_NUM_PROCESSES=str(num_processes),
        JAXTRAIN_PROCESS_ID=str(process_id),
    )
    if cpu_devices:
        env["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
    return env


def _relay(process_id: int, stream, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            sys.stdout.write(f"[{process_id}] {line}")
            sys.stdout.flush()
    stream.close()


def launch(args: list[str], *, num_processes: int, cpu_devices: int | None = None, port: int | None = None,
           module: str = "jaxtrain.main") -> int:
    """Run ``python -m module args`` as ``num_processes`` processes; returns the first non-zero exit code."""
    port = port or free_port()
    lock = threading.Lock()
    procs, relays = [], []
    for process_id in range(num_processes):
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=process_env(process_id, num_processes, port, cpu_devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(proc)
        relay = threading.Thread(target=_relay, args=(process_id, proc.stdout, lock), daemon=True)
        relay.start()
        relays.append(relay)

    def forward(signum, frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        exit_code = 0
        remaining = list(procs)
        while remaining:
            for proc in list(remaining):
                try:
                    code = proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                remaining.remove(proc)
                if code != 0 and exit_code == 0:
                    exit_code = code
                    for other in remaining:  # a job with a dead process can only hang
                        other.terminate()
        for relay in relays:
            relay.join(timeout=5)
        return exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, usage="%(prog)s [options] -- JAXTRAIN_ARGS...")
    parser.add_argument("--num_processes", type=int, default=2, help="processes to start (default 2)")
    parser.add_argument("--cpu_devices_per_process", type=int, default=None,
                        help="run on the CPU with this many simulated devices per process")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--module", default="jaxtrain.main", help="python module to run (default jaxtrain.main)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the module, after --")
    options = parser.parse_args()
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    if options.num_processes < 1:
        parser.error(f"--num_processes must be at least 1, got {options.num_processes}")
    return launch(args, num_processes=options.num_processes, cpu_devices=options.cpu_devices_per_process,
                  port=options.port, module=options.module)


if __name__ == "__main__":
    sys.exit(main())

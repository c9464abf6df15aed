"""Every process of a multi-host run checks in with process 0 before JAX's runtime joins them.

JAX's coordination service aborts the process (SIGABRT and a C++ dump, after the whole timeout)
when the processes do not all register, and accepts processes started with different process
counts. So process 0 first listens on the coordinator's port itself; every other process
connects and sends its id and the process count it was started with. Process 0 answers each
with ``ok`` once all have checked in with the same count and distinct ids, or with the one-line
reason they cannot run together (a count that differs, an id given twice, processes missing
when the timeout ran out), which every process then reports as its error. Then process 0 closes
the port and JAX's runtime starts on it.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

_LINE_BYTES = 4096
_REPLY_SECONDS = 5.0  # for a connected process to send its line, and to close after the answer


class CheckInError(RuntimeError):
    """The processes cannot run together (or did not all start); the message says why."""


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); CheckInError for a port that is not a number in 1..65535."""
    host, _, port = address.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = 0
    if not 0 < number < 65536 or not host:
        raise CheckInError(f"coordinator address {address!r}: expected host:port with a port from 1 to 65535")
    return host.strip("[]"), number


def gather(port: int, num_processes: int, timeout_s: float) -> None:
    """Process 0: wait on ``port`` for processes 1..n-1 to check in; answer them all; raise
    CheckInError (after answering) when they cannot run together or did not all come in time."""
    try:
        server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True) \
            if socket.has_dualstack_ipv6() else socket.create_server(("", port))
    except OSError as err:
        raise CheckInError(f"cannot listen on the coordinator port {port} ({err.strerror or err}): another run "
                           "uses it, or another process was also started as process 0; choose a free port") from None
    joined: dict[int, socket.socket] = {}
    problem = None
    deadline = time.monotonic() + timeout_s
    try:
        while problem is None and len(joined) < num_processes - 1:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [i for i in range(1, num_processes) if i not in joined]
                problem = (f"only {len(joined) + 1} of {num_processes} processes started within {timeout_s:g}s "
                           f"(missing: process {', '.join(map(str, missing[:8]))}{' ...' if len(missing) > 8 else ''}); "
                           f"start the command on every host, each with its own process id")
                break
            server.settimeout(min(remaining, 1.0))
            try:
                conn, _ = server.accept()
            except (socket.timeout, TimeoutError):
                continue
            hello = _read_line(conn)
            try:
                message = json.loads(hello) if hello else {}
                their_id, their_count = int(message["process_id"]), int(message["num_processes"])
            except (ValueError, KeyError, TypeError):
                conn.close()  # not one of ours (a port scanner, a health check): ignored
                continue
            if their_count != num_processes:
                problem = (f"process {their_id} was started with {their_count} processes and process 0 with "
                           f"{num_processes}; start every process with the same count")
            elif their_id in joined or their_id == 0:
                problem = (f"two processes were started as process {their_id}; give each process its own id "
                           f"from 0 to {num_processes - 1}")
            elif not 0 < their_id < num_processes:
                problem = f"a process was started with id {their_id}, outside 0..{num_processes - 1}"
            if their_id in joined or problem is not None:
                _answer(conn, problem or "")
                conn.close()
            else:
                joined[their_id] = conn
    finally:
        for conn in joined.values():
            _answer(conn, problem or "")
        for conn in joined.values():  # the other side closes first: the port is left free at once
            _wait_closed(conn)
        server.close()
    if problem is not None:
        raise CheckInError(problem)


def report(host: str, port: int, process_id: int, num_processes: int, timeout_s: float) -> None:
    """Process ``process_id`` > 0: check in with process 0 at ``host:port`` and wait for its answer;
    CheckInError with process 0's reason, or when it did not answer within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=min(5.0, timeout_s))
            break
        except OSError as err:
            last_error = str(err) or type(err).__name__
        if time.monotonic() >= deadline:
            raise CheckInError(f"the coordinator at {host}:{port} did not answer within {timeout_s:g}s "
                               f"({last_error}); check that process 0 is running and that this host and port "
                               f"are reachable")
        time.sleep(0.5)
    with conn:
        conn.sendall((json.dumps({"process_id": process_id, "num_processes": num_processes}) + "\n").encode())
        answer = _read_line(conn, max(deadline - time.monotonic(), _REPLY_SECONDS) + _REPLY_SECONDS)
    if answer is None:
        raise CheckInError(f"process 0 at {host}:{port} did not confirm that all {num_processes} processes started "
                           f"within {timeout_s:g}s; see its output")
    if answer != "ok":
        raise CheckInError(answer.removeprefix("error: "))


def _read_line(conn: socket.socket, timeout: float = _REPLY_SECONDS) -> str | None:
    """One line from ``conn`` (without its newline), or None when it closed or timed out first."""
    conn.settimeout(timeout)
    data = b""
    try:
        while b"\n" not in data and len(data) < _LINE_BYTES:
            chunk = conn.recv(_LINE_BYTES)
            if not chunk:
                return None
            data += chunk
    except OSError:
        return None
    return data.split(b"\n", 1)[0].decode(errors="replace") if b"\n" in data else None


def _answer(conn: socket.socket, problem: str) -> None:
    try:
        conn.sendall((f"error: {problem}" if problem else "ok").encode() + b"\n")
    except OSError:
        pass


def _wait_closed(conn: Any) -> None:
    conn.settimeout(_REPLY_SECONDS)
    try:
        while conn.recv(_LINE_BYTES):
            pass
    except OSError:
        pass
    conn.close()

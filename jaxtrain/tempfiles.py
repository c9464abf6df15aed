"""Names of the temporary files jaxtrain writes before renaming them into place.

A file is written whole under ``temp_path(final)`` and then ``os.replace``d onto ``final``, so a
reader never sees half a file. The name carries the writer's process id (``temp_marker``), so
that whoever stops a writer mid-write can find and remove what it left: the data prefetch does
this for its forked child. Standard library only: the prefetch imports it before NumPy or JAX.
"""

from __future__ import annotations

import os
import time


def temp_marker(pid: int) -> str:
    """The part of a temporary file's name that says which process is writing it."""
    return f".tmp-{pid}-"


def is_temp_of(name: str, entry: str) -> bool:
    """Whether the file name ``entry`` is a ``temp_path`` of the file named ``name``, by any process."""
    rest = entry[len(name):] if entry.startswith(name + ".tmp-") else ""
    pid, _, stamp = rest[len(".tmp-"):].partition("-")
    return pid.isdigit() and stamp.isdigit()


def temp_path(path: str, suffix: str = "") -> str:
    """A temporary name beside ``path``, unique to this process and moment; ``suffix`` is kept
    last (``np.save`` adds ``.npy`` to a name without it)."""
    return f"{path}{temp_marker(os.getpid())}{time.monotonic_ns()}{suffix}"


def file_in_the_way(folder: str) -> str | None:
    """The existing file that keeps ``folder`` from being (or being made) a folder: ``folder``
    itself, or the nearest of the folders above it that exists; None when there is none."""
    path = os.path.abspath(os.path.expanduser(folder))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path if os.path.exists(path) and not os.path.isdir(path) else None


def probe_write(path: str) -> None:
    """Create the folder of the file ``path`` and write (then remove) a temporary file beside it;
    ``OSError`` when that cannot be done."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    probe = temp_path(os.path.abspath(path))
    with open(probe, "w", encoding="utf-8"):
        pass
    os.remove(probe)


def check_output_file(path: str, flag: str = "--out") -> None:
    """Create the folder of the output file ``path`` and check that a file can be written there,
    before a command does its work: a one-line ``ConfigError`` (naming ``flag``) when it cannot."""
    from jaxtrain.config.schema import ConfigError  # here: the data prefetch imports this module early

    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a folder; pass a file path such as {os.path.join(path, 'results.json')}")
    folder = os.path.dirname(os.path.abspath(path))
    blocking = file_in_the_way(folder)
    if blocking:
        raise ConfigError(f"{flag} {path}: {blocking} is a file, not a folder; pass a path in a folder")
    try:
        probe_write(path)
    except OSError as error:
        raise ConfigError(f"{flag} {path}: cannot write a file in {folder} ({error.strerror or error}); "
                          "pass a path in a writable folder") from None

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


def temp_path(path: str, suffix: str = "") -> str:
    """A temporary name beside ``path``, unique to this process and moment; ``suffix`` is kept
    last (``np.save`` adds ``.npy`` to a name without it)."""
    return f"{path}{temp_marker(os.getpid())}{time.monotonic_ns()}{suffix}"

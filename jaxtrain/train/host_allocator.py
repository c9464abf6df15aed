"""Keep the C allocator's freed memory for reuse when XLA runs on the host CPU.

XLA:CPU allocates each step's temporaries (activations, logits, gradients) as one or a few large
blocks with ``malloc``. glibc serves blocks above its mmap threshold (at most 32 MB) with a fresh
``mmap`` and returns them with ``munmap`` on free, so every step touches new pages: at the
benchmark's s shape (50k vocabulary, 4k tokens) that is about 400k page faults and 0.6 s of
kernel time per step, a third of the output head's time. Two settings together let each step
reuse the previous step's pages (no faults after warm-up):

- glibc allocates from the heap instead of ``mmap`` (``M_MMAP_MAX = 0``) and never trims it
  (``M_TRIM_THRESHOLD``). Only the main thread's arena can grow past 64 MB without ``mmap``;
- so XLA:CPU runs computations on the calling (main) thread (``jax_cpu_enable_async_dispatch``
  off) instead of handing them to a worker thread whose arena would ``mmap`` the block again.
  Restricting all threads to one arena would do the same but serialises the compiler's threads
  on the arena lock (compiles 60% slower on two cores).

The cost: the process keeps its peak host memory, which a training process reaches every step
anyway, and a call into a compiled step returns when the step is done (the train loop reads
each step's metrics at log steps anyway; the data loader prefetches on its own threads).

It applies only where XLA will run on the CPU (``JAX_PLATFORMS`` naming ``cpu`` first, or no
GPU/TPU plugin installed), and must run before JAX creates its CPU client: the entry points call
it before importing JAX. ``JAXTRAIN_HOST_ALLOCATOR=retain|default`` overrides the choice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                        "libtpu")
_applied: bool | None = None


def runs_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, decided without initialising JAX."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def retain_freed_memory() -> bool:
    """Switch glibc to heap allocation that keeps freed pages, when running on the CPU.

    Returns whether the setting is in effect. Safe to call more than once; a no-op off Linux/glibc.
    """
    global _applied
    if _applied is not None:
        return _applied
    choice = os.environ.get("JAXTRAIN_HOST_ALLOCATOR", "").strip().lower()
    if choice not in ("", "retain", "default"):
        print(f"warning: JAXTRAIN_HOST_ALLOCATOR={choice!r} is not 'retain' or 'default'; using the default choice",
              file=sys.stderr)
        choice = ""
    wanted = choice == "retain" or (choice == "" and runs_on_cpu())
    _applied = wanted and _mallopt_retain()
    if _applied:
        _synchronous_cpu_dispatch()
    return _applied


def _synchronous_cpu_dispatch() -> None:
    import jax  # importing JAX starts no threads; its CPU client is created on first use

    jax.config.update("jax_cpu_enable_async_dispatch", False)


def _mallopt_retain() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # -1 is SIZE_MAX once glibc widens it: never give the heap top back
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1))

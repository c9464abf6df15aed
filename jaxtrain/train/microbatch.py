"""``device_train_microbatch_size: auto`` and ``model.remat: auto``: the fastest train step that
fits the device.

Like Composer's automatic microbatching: start with the whole per-device batch as one
microbatch; when the compiled step needs more memory than the device has, or compiling or the
first execution runs out of memory, halve the microbatch (twice the microbatches), rebuild the
step and try again. Accumulation over microbatches gives the same update as one pass, so the
choice changes memory and speed, not the math (the gradient's float sums are taken in another
order: equal to rounding, not bit for bit). ``model.remat: auto`` does the same over
activation recompute: no remat, then ``dots_saveable`` (keep the matmul outputs), then ``full``
(keep only each block's input); recomputing changes no number either. With both auto, a smaller
microbatch is preferred to recompute down to ``MIN_MICROBATCH_TOKENS`` (``step_candidates``).

The device's capacity is ``device.memory_stats()['bytes_limit']`` where JAX reports it (GPU,
TPU). The environment variable ``JAXTRAIN_DEVICE_MEMORY_BYTES`` overrides it, for a device
that reports nothing (CPU) or to keep head-room on one that does.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np

from jaxtrain.config import ConfigError

DEVICE_MEMORY_ENV = "JAXTRAIN_DEVICE_MEMORY_BYTES"
_OUT_OF_MEMORY_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")


def device_capacity(device: Any = None) -> tuple[int | None, str]:
    """(bytes of memory per device, where the figure came from); (None, "not reported") when unknown."""
    override = os.environ.get(DEVICE_MEMORY_ENV, "").strip()
    if override:
        try:
            value = int(float(override))
        except ValueError:
            value = 0
        if value <= 0:
            raise ConfigError(f"{DEVICE_MEMORY_ENV}={override!r}: expected a positive number of bytes, e.g. 80e9")
        return value, DEVICE_MEMORY_ENV
    device = jax.local_devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "reported by the device"
    return None, "not reported"


def agreed_capacity(capacity: int | None) -> int | None:
    """The smallest capacity any process of the run reports (None when none reports one).

    Every process settles the auto settings on its own, and a process whose step differed from
    the others' would wait for them in its collectives forever: a host with less memory (or
    ``JAXTRAIN_DEVICE_MEMORY_BYTES`` set on some hosts only) decides for all."""
    if jax.process_count() == 1:
        return capacity
    from jax.experimental import multihost_utils

    mib = 1 << 20  # exchanged in MiB: JAX's default integers are 32 bits
    gathered = multihost_utils.process_allgather(np.int32((capacity or 0) // mib))
    reported = [int(value) for value in np.ravel(gathered) if int(value) > 0]
    return min(reported) * mib if reported else None


def is_out_of_memory(err: BaseException) -> bool:
    """True for XLA's out-of-memory errors (raised at compile or at run time)."""
    runtime_errors = (getattr(jax.errors, "JaxRuntimeError", RuntimeError), MemoryError)
    return isinstance(err, runtime_errors) and any(marker in str(err) for marker in _OUT_OF_MEMORY_MARKERS)


def out_of_memory_line(err: BaseException, advice: str) -> str:
    """One line for the device running out of memory: XLA's own reason (what it tried to
    allocate), then ``advice`` (what the user can lower)."""
    detail = next((line.strip() for line in str(err).splitlines() if "Out of memory" in line), "out of memory")
    return f"the device ran out of memory ({detail[:160]}): {advice}"


def compiled_step_bytes(memory: Any) -> int | None:
    """Peak device bytes of a compiled step from ``compiled.memory_analysis()``: arguments,
    outputs not aliased to (donated) arguments, temporaries and code; None when unavailable."""
    if memory is None:
        return None
    try:
        return int(
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes
            + memory.generated_code_size_in_bytes
        )
    except AttributeError:
        return None


def memory_analysis(compiled: Any) -> Any:
    """``compiled.memory_analysis()``, or None where the backend has none."""
    try:
        return compiled.memory_analysis()
    except Exception:  # not implemented on every backend
        return None


def smaller_microbatch(microbatch: int, per_device_batch: int) -> int | None:
    """The next microbatch to try: the largest divisor of the per-device batch <= half of ``microbatch``."""
    for candidate in range(microbatch // 2, 0, -1):
        if per_device_batch % candidate == 0:
            return candidate
    return None


# ``model.remat: auto`` tries these in order: least recompute first
REMAT_ORDER = ("none", "dots_saveable", "full")
# with both settings auto, remat none and dots_saveable are tried only down to microbatches of this
# many tokens (smaller ones make short matmuls), then full recompute from the largest microbatch
MIN_MICROBATCH_TOKENS = 4096
# a candidate the memory planner puts above this multiple of the capacity is not compiled (the
# planner is within 25% of XLA's figure on the models it is checked against)
ESTIMATE_SLACK = 1.5


@dataclasses.dataclass
class SettledStep:
    """The microbatch (and remat policy) chosen for the train step, the step compiled for them,
    and why the candidates before them failed."""

    microbatch: int
    num_microbatches: int
    step: Any  # the jitted train step
    memory: Any  # its compiled.memory_analysis(), or None
    rejected: list[str]
    remat: str | None = None  # the policy the step was built with, when model.remat is auto
    auto: tuple[str, ...] = ("microbatch",)  # which settings were settled: microbatch, remat
    executable: Any = None  # the step compiled ahead of time for the example arguments

    def describe(self) -> str:
        why = f" ({'; '.join(self.rejected)})" if self.rejected else ""
        if self.auto == ("microbatch",):
            return f"device_train_microbatch_size auto: settled on {self.microbatch}{why}"
        if self.auto == ("remat",):
            return f"model.remat auto: settled on {self.remat}{why}"
        return (f"device_train_microbatch_size and model.remat auto: settled on microbatch {self.microbatch}, "
                f"remat {self.remat}{why}")


def step_candidates(per_device_batch: int, *, microbatch: int | str | None, remat: str,
                    seq_len: int) -> list[tuple[int, str]]:
    """(microbatch, remat) pairs to try in order, fastest first, for the auto settings.

    Microbatch auto alone: the per-device batch, then halving. Remat auto alone: none,
    dots_saveable, full at the configured microbatch. Both: none, then dots_saveable, each from
    the whole per-device batch down to ``MIN_MICROBATCH_TOKENS`` per microbatch (recomputing
    costs more than a smaller microbatch until its matmuls get short), then full from the whole
    batch down to one sequence.
    """
    halvings = _halvings(per_device_batch, per_device_batch)
    auto_microbatch = microbatch in (None, "auto")
    if remat != "auto":
        return [(m, remat) for m in halvings] if auto_microbatch else [(int(microbatch), remat)]
    if not auto_microbatch:
        return [(int(microbatch), policy) for policy in REMAT_ORDER]
    long_enough = [m for m in halvings if m * seq_len >= MIN_MICROBATCH_TOKENS] or halvings[:1]
    return [(m, policy) for policy in REMAT_ORDER[:-1] for m in long_enough] + [(m, "full") for m in halvings]


def settle_step(
    build_step: Callable[[int, str | None], Any],
    example_args: tuple,
    candidates: list[tuple[int, str | None]],
    *,
    per_device_batch: int,
    capacity: int | None,
    auto: tuple[str, ...] = ("microbatch",),
    estimate: Callable[[int, str | None], float | None] | None = None,
) -> SettledStep:
    """Compile ``build_step(num_microbatches, remat)`` ahead of time for ``example_args`` (arrays
    or ``jax.ShapeDtypeStruct``s) for each candidate ``(microbatch, remat)`` in turn and take the
    first whose compiled step fits ``capacity`` bytes (compiling out of memory counts as not
    fitting). With no capacity known, the first that compiles is taken.

    ``estimate(microbatch, remat)``, the planner's bytes for a candidate, skips the compile of
    candidates it puts beyond ``ESTIMATE_SLACK`` times the capacity (a large model's compile can
    take a minute); the last candidate is always compiled, so a failure reports XLA's figure."""
    rejected: list[str] = []

    def label(microbatch: int, remat: str | None) -> str:
        if auto == ("microbatch",):
            return str(microbatch)
        if auto == ("remat",):
            return str(remat)
        return f"{remat} x {microbatch}"

    for index, (microbatch, remat) in enumerate(candidates):
        guess = estimate(microbatch, remat) if estimate is not None and capacity is not None else None
        if guess is not None and guess > ESTIMATE_SLACK * capacity and index < len(candidates) - 1:
            rejected.append(f"{label(microbatch, remat)}: estimated {guess:,.0f} of {capacity:,} bytes")
            continue
        num_microbatches = per_device_batch // microbatch
        step = build_step(num_microbatches, remat)
        try:
            executable = step.lower(*example_args).compile()
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            rejected.append(f"{label(microbatch, remat)}: out of memory while compiling")
            continue
        memory = memory_analysis(executable)
        needed = compiled_step_bytes(memory)
        if capacity is None or needed is None or needed <= capacity:
            return SettledStep(microbatch, num_microbatches, step, memory, rejected, remat, auto, executable)
        rejected.append(f"{label(microbatch, remat)}: needs {needed:,} of {capacity:,} bytes")
    what = {("microbatch",): "device_train_microbatch_size: auto found no microbatch",
            ("remat",): "model.remat: auto found no remat policy"}.get(
        auto, "device_train_microbatch_size and model.remat: auto found no microbatch and remat policy")
    remedy = "" if "remat" in auto else ", set model.remat: full or auto"
    raise ConfigError(
        f"{what} whose train step fits the device ({'; '.join(rejected)}); shard the model over more "
        f"devices (parallelism.fsdp){remedy}, or use a smaller model"
    )


def auto_step(
    build_step: Callable[[int, str | None], Any],
    example_args: tuple,
    *,
    per_device_batch: int,
    microbatch: int | str | None,
    remat: str,
    seq_len: int,
    auto: tuple[str, ...],
    estimate: Callable[[int, str | None], float | None] | None = None,
) -> AutoMicrobatchStep:
    """Settle the ``auto`` settings ("microbatch", "remat") on the first of ``step_candidates``
    whose compiled step fits this device's capacity (the smallest of every process's), and print
    what was chosen. The step returned (its ``settled`` the candidate chosen) moves on to the next
    candidates should its first execution still run out of memory."""
    capacity = agreed_capacity(device_capacity()[0])
    candidates = step_candidates(per_device_batch, microbatch=microbatch, remat=remat, seq_len=seq_len)

    def settle(after: SettledStep | None = None) -> SettledStep | None:
        remaining = candidates
        if after is not None:
            remaining = candidates[candidates.index((after.microbatch, after.remat)) + 1:]
            if not remaining:
                return None
        return settle_step(build_step, example_args, remaining, per_device_batch=per_device_batch,
                           capacity=capacity, auto=auto, estimate=estimate)

    settled = settle()
    print(settled.describe(), flush=True)
    return AutoMicrobatchStep(settled, settle)


def _halvings(start: int, per_device_batch: int) -> list[int]:
    sizes = [start]
    while (smaller := smaller_microbatch(sizes[-1], per_device_batch)) is not None:
        sizes.append(smaller)
    return sizes


class AutoMicrobatchStep:
    """A train step that, until its first execution succeeds, retries the same batch with the
    next candidate (a smaller microbatch, or more recompute) when the device runs out of memory;
    afterwards it is the settled step itself.

    ``resettle(failed)`` settles on the candidates after ``failed`` (None when none is left).
    Called like the jitted step: ``step(state, batch)`` or ``step(state, batch, control)``.
    """

    def __init__(self, settled: SettledStep, resettle: Callable[[SettledStep], SettledStep | None], *,
                 report: Callable[[str], None] = print):
        self.settled = settled
        self._resettle = resettle
        self._report = report
        self._verified = False

    @property
    def microbatch(self) -> int:
        return self.settled.microbatch

    def __call__(self, state: Any, batch: Any, *rest: Any) -> Any:
        if self._verified:
            return self.settled.step(state, batch, *rest)
        while True:
            try:
                result = jax.block_until_ready(self.settled.step(state, batch, *rest))
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                donated = any(getattr(leaf, "is_deleted", lambda: False)() for leaf in jax.tree.leaves(state))
                # With several processes, one that retried alone would run a different program from
                # the others (which wait in the failed step's collectives): every process must
                # start again with a setting that fits.
                several = jax.process_count() > 1
                following = None if donated or several else self._resettle(self.settled)
                if following is None:
                    tried = f"microbatch {self.settled.microbatch}" + (
                        f", remat {self.settled.remat}" if self.settled.remat else "")
                    why = f"process {jax.process_index()} of {jax.process_count()}" if several else "could not be retried"
                    raise ConfigError(
                        f"auto: the first train step ran out of memory with {tried} ({why}); "
                        f"set device_train_microbatch_size to a smaller value (e.g. "
                        f"{smaller_microbatch(self.settled.microbatch, self.settled.microbatch) or 1}) or model.remat: full"
                    ) from err
                self.settled = following
                self._report(self.settled.describe() + " after the first step ran out of memory")
                continue
            self._verified = True
            return result

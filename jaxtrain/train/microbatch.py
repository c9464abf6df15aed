"""``device_train_microbatch_size: auto``: the largest microbatch whose train step fits the device.

Like Composer's automatic microbatching: start with the whole per-device batch as one
microbatch; when the compiled step needs more memory than the device has, or compiling or the
first execution runs out of memory, halve the microbatch (twice the microbatches), rebuild the
step and try again. Accumulation over microbatches gives the same update as one pass, so the
choice changes memory and speed, never the result.

The device's capacity is ``device.memory_stats()['bytes_limit']`` where JAX reports it (GPU,
TPU). The environment variable ``JAXTRAIN_DEVICE_MEMORY_BYTES`` overrides it, for a device
that reports nothing (CPU) or to keep head-room on one that does.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax

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


def is_out_of_memory(err: BaseException) -> bool:
    """True for XLA's out-of-memory errors (raised at compile or at run time)."""
    runtime_errors = (getattr(jax.errors, "JaxRuntimeError", RuntimeError), MemoryError)
    return isinstance(err, runtime_errors) and any(marker in str(err) for marker in _OUT_OF_MEMORY_MARKERS)


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


@dataclasses.dataclass
class SettledStep:
    """The microbatch chosen for the train step, the step compiled for it, and why larger ones failed."""

    microbatch: int
    num_microbatches: int
    step: Any  # the jitted train step
    memory: Any  # its compiled.memory_analysis(), or None
    rejected: list[str]

    def describe(self) -> str:
        why = f" ({'; '.join(self.rejected)})" if self.rejected else ""
        return f"device_train_microbatch_size auto: settled on {self.microbatch}{why}"


def settle_microbatch(
    build_step: Callable[[int], Any],
    example_args: tuple,
    *,
    per_device_batch: int,
    capacity: int | None,
    start: int | None = None,
) -> SettledStep:
    """Compile ``build_step(num_microbatches)`` ahead of time for ``example_args`` (arrays or
    ``jax.ShapeDtypeStruct``s), halving the microbatch from ``start`` (default the whole
    per-device batch) while the compiled step exceeds ``capacity`` bytes or compiling runs out of
    memory. With no capacity known, the first step that compiles is taken."""
    microbatch: int | None = per_device_batch if start is None else start
    rejected: list[str] = []
    while microbatch is not None:
        num_microbatches = per_device_batch // microbatch
        step = build_step(num_microbatches)
        try:
            memory = memory_analysis(step.lower(*example_args).compile())
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            rejected.append(f"{microbatch}: out of memory while compiling")
        else:
            needed = compiled_step_bytes(memory)
            if capacity is None or needed is None or needed <= capacity:
                return SettledStep(microbatch, num_microbatches, step, memory, rejected)
            rejected.append(f"{microbatch}: needs {needed:,} of {capacity:,} bytes")
        microbatch = smaller_microbatch(microbatch, per_device_batch)
    raise ConfigError(
        "device_train_microbatch_size: auto found no microbatch whose train step fits the device "
        f"({'; '.join(rejected)}); shard the model over more devices (parallelism.fsdp), "
        "set model.remat: full, or use a smaller model"
    )


class AutoMicrobatchStep:
    """A train step that, until its first execution succeeds, retries the same batch with half
    the microbatch when the device runs out of memory; afterwards it is the settled step itself.

    Called like the jitted step: ``step(state, batch)`` or ``step(state, batch, control)``.
    """

    def __init__(self, settled: SettledStep, resettle: Callable[[int], SettledStep], *,
                 per_device_batch: int, report: Callable[[str], None] = print):
        self.settled = settled
        self._resettle = resettle
        self._per_device_batch = per_device_batch
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
                smaller = smaller_microbatch(self.settled.microbatch, self._per_device_batch)
                if smaller is None or any(
                    getattr(leaf, "is_deleted", lambda: False)() for leaf in jax.tree.leaves(state)
                ):
                    raise ConfigError(
                        f"device_train_microbatch_size: auto: the first step ran out of memory with microbatch "
                        f"{self.settled.microbatch} and could not be retried; set device_train_microbatch_size "
                        f"to a smaller value (e.g. {smaller or 1})"
                    ) from err
                self.settled = self._resettle(smaller)
                self._report(self.settled.describe() + " after the first step ran out of memory")
                continue
            self._verified = True
            return result

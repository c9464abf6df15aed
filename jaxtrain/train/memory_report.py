"""Device memory at the start of a run: what the state measures, what the step compiles to, what fits.

Parameters and optimizer state are measured from the sharded arrays (the bytes of the shards
on this process's first device); activations are the planner's estimate for the chosen
microbatch (``jaxtrain.plan.memory``); the compiled step's figures are XLA's own memory
analysis; the capacity is what the device reports (or ``JAXTRAIN_DEVICE_MEMORY_BYTES``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxtrain.layers.attention import fused_attention_kind
from jaxtrain.parallel.layout import describe_shardings
from jaxtrain.plan.memory import estimate_memory
from jaxtrain.train.microbatch import compiled_step_bytes, device_capacity
from jaxtrain.train.step import COMPUTE_DTYPES


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes per device at start-up; None where a figure is not available."""

    params_bytes: int
    optimizer_bytes: int  # with the moving average of the weights (algorithms.ema), if kept
    microbatch: int
    remat: str
    activations_bytes: float | None  # estimate for one microbatch
    step_bytes: int | None  # XLA's peak for the compiled train step
    step_temp_bytes: int | None
    capacity_bytes: int | None
    capacity_source: str
    averaged: bool = False  # optimizer_bytes holds the moving average of the weights too


def device_bytes(tree: Any, device: Any = None) -> int:
    """Bytes of ``tree``'s arrays held on ``device`` (default this process's first device)."""
    device = jax.local_devices()[0] if device is None else device
    total = 0
    for leaf in jax.tree.leaves(tree):
        shards = getattr(leaf, "addressable_shards", None)
        if shards is None:
            continue
        total += sum(shard.data.nbytes for shard in shards if shard.device == device)
    return total


def memory_report(parts: Any) -> MemoryReport:
    """The start-up memory figures of a built run (``jaxtrain.train.setup.RunParts``)."""
    cfg = parts.cfg
    mesh_shape = dict(parts.mesh.shape)
    try:
        estimate = estimate_memory(
            cfg.model,
            global_batch=cfg.global_train_batch_size,
            microbatch=parts.device_train_microbatch,
            seq_len=cfg.max_seq_len,
            precision=cfg.precision,
            mesh_shape=mesh_shape,
            remat=parts.remat,
            optimizer=cfg.optimizer.name,
            n_params=parts.num_params,
            fused_attention=fused_attention_kind(cfg.model, COMPUTE_DTYPES[cfg.precision]),
            ema=parts.state.ema is not None,
        )
        activations = estimate.activations_bytes
    except ValueError:  # a setting the planner does not model
        activations = None
    memory = parts.train_step_memory
    capacity, source = device_capacity()
    return MemoryReport(
        params_bytes=device_bytes(parts.state.params),
        optimizer_bytes=device_bytes(parts.state.opt_state) + device_bytes(parts.state.ema),
        microbatch=parts.device_train_microbatch,
        remat=parts.remat,
        activations_bytes=activations,
        step_bytes=compiled_step_bytes(memory),
        step_temp_bytes=None if memory is None else int(memory.temp_size_in_bytes),
        capacity_bytes=capacity,
        capacity_source=source,
        averaged=parts.state.ema is not None,
    )


def format_bytes(count: float | None) -> str:
    if count is None:
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{int(count)} B"


def format_memory_report(report: MemoryReport) -> str:
    """A compact block of lines for the start-up output."""
    if report.step_bytes is None:
        compiled = "compiled train step: memory analysis not available"
    else:
        compiled = (f"compiled train step {format_bytes(report.step_bytes)} "
                    f"(temporaries {format_bytes(report.step_temp_bytes)})")
    if report.capacity_bytes is None:
        capacity = "device capacity not reported"
    else:
        capacity = f"device capacity {format_bytes(report.capacity_bytes)}"
        if report.capacity_source != "reported by the device":
            capacity += f" (from {report.capacity_source})"
        if report.step_bytes is not None:
            capacity += f", {100 * report.step_bytes / report.capacity_bytes:.0f}% used by the step"
    return "\n".join([
        f"memory per device: parameters {format_bytes(report.params_bytes)}, "
        f"optimizer state{' and moving average' if report.averaged else ''} "
        f"{format_bytes(report.optimizer_bytes)} (measured)",
        f"  activations ~{format_bytes(report.activations_bytes)} for microbatch {report.microbatch} "
        f"(estimate, remat {report.remat})",
        f"  {compiled}; {capacity}",
    ])


def start_report(parts: Any) -> str:
    """The memory block printed at start-up, and each parameter's sharding when ``log_shardings``."""
    text = format_memory_report(memory_report(parts))
    if parts.cfg.log_shardings:
        text += "\nshardings:\n" + describe_shardings(parts.state)
    return text

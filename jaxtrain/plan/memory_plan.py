"""``jaxtrain plan --memory``: one training step's memory per device for a model config, and,
when it does not fit, the mesh and the number of devices that would hold it."""

from __future__ import annotations

import math
from typing import Any

from jaxtrain.metrics.hardware import Hardware
from jaxtrain.plan.inputs import PlanError, parse_mesh
from jaxtrain.plan.memory import MemoryEstimate, estimate_memory, format_memory

# How far the search for a device count that fits goes (doubling from --devices).
MAX_DEVICES = 2**16


def plan_memory(path: str, args: Any, hardware: Hardware, devices: int) -> str:
    """The ``--memory`` answer for the config at ``path`` on ``devices`` of ``hardware``; ``args``
    holds the overrides (``mesh``, ``global_batch``, ``microbatch``, ``optimizer``, ``remat``, ``seq_len``)."""
    from jaxtrain.config import load_config

    cfg = load_config(path)
    if args.mesh:
        mesh = parse_mesh(args.mesh)
    else:
        par = cfg.parallelism
        fixed = max(par.fsdp, 1) * max(par.tensor, 1) * (par.data if par.data > 0 else 1)
        mesh = {"data": par.data if par.data > 0 else max(devices // fixed, 1),
                "fsdp": par.fsdp if par.fsdp > 0 else devices, "tensor": par.tensor}
    if math.prod(mesh.values()) != devices:
        raise PlanError(f"mesh {mesh} has {math.prod(mesh.values())} devices, not --devices {devices}")
    global_batch = args.global_batch or cfg.global_train_batch_size
    per_device = global_batch // max(mesh.get("data", 1) * mesh.get("fsdp", 1), 1)
    microbatch = args.microbatch or (cfg.device_train_microbatch_size
                                     if isinstance(cfg.device_train_microbatch_size, int) else per_device)
    optimizer = args.optimizer or ("lion" if "lion" in cfg.optimizer.name else "adam")
    remat = args.remat or cfg.model.remat
    common = dict(global_batch=global_batch, seq_len=args.seq_len or cfg.max_seq_len, precision=cfg.precision,
                  optimizer=optimizer, hardware=hardware, ema=cfg.algorithms.ema is not None)

    def estimate_for(mesh_shape: dict, micro: int) -> MemoryEstimate:
        # remat auto: the least recompute that fits, as the trainer settles it (there by XLA's figures)
        for policy in ("none", "dots_saveable", "full") if remat == "auto" else (remat,):
            estimate = estimate_memory(cfg.model, microbatch=micro, mesh_shape=mesh_shape, remat=policy, **common)
            if estimate.fits:
                break
        return estimate

    estimate = estimate_for(mesh, min(microbatch, per_device))
    shown = f"auto -> {estimate.remat}" if remat == "auto" else remat
    lines = [
        f"jaxtrain plan --memory: {path} on {devices} x {hardware.name}, mesh {mesh}, global batch {global_batch}, "
        f"seq {common['seq_len']}, {common['precision']}, remat={shown}, {optimizer}",
        format_memory(estimate),
    ]
    if estimate.fits:
        return "\n".join(lines)
    tensor = mesh.get("tensor", 1)
    if mesh.get("fsdp", 1) < devices:
        sharded = {"data": 1, "fsdp": devices // tensor, "tensor": tensor}
        alt = estimate_for(sharded, min(microbatch, global_batch // sharded["fsdp"]))
        lines += [f"with the state fully sharded (mesh {sharded}):", format_memory(alt)]
        if alt.fits:
            return "\n".join(lines)
    lines.append(_devices_that_fit(estimate_for, devices, tensor, global_batch, hardware))
    return "\n".join(lines)


def _devices_that_fit(estimate_for, devices: int, tensor: int, global_batch: int, hardware: Hardware) -> str:
    """The fewest devices (``devices`` doubled) over which the fully sharded state fits at
    microbatch 1, or why no number of them does at this global batch."""
    count = devices * 2
    while count <= MAX_DEVICES:
        fsdp = count // tensor
        if global_batch % fsdp:  # each device needs whole sequences
            break
        estimate = estimate_for({"data": 1, "fsdp": fsdp, "tensor": tensor}, 1)
        if estimate.fits:
            return (f"fits on {count} x {hardware.name}: mesh {{'data': 1, 'fsdp': {fsdp}, 'tensor': {tensor}}}, "
                    f"microbatch 1, remat={estimate.remat}, {estimate.total_bytes / 2**30:.2f} GiB per device "
                    f"(pass --devices {count} to see the breakdown)")
        count *= 2
    largest = count // 2
    return (f"does not fit on up to {largest} x {hardware.name} at global batch {global_batch} (each device needs "
            f"at least one sequence): shorten the sequence, raise --global-batch, add tensor parallelism "
            f"(--mesh), or use a device with more memory")

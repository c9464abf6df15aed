"""Compile jaxtrain's train step for an NVIDIA H200 (or a TPU) on a machine without one, and
estimate from the optimized HLO where the step's time would go.

    python bench/gpu_aot.py --config configs/mpt/1b.yaml --batch 8 --set model.remat=none
    python bench/gpu_aot.py --config configs/mpt/1b.yaml --batch 8 --set model.remat=none --set model.scan_unroll=1
    python bench/gpu_aot.py --config configs/mpt/7b.yaml --batch 4 --devices 8 --set parallelism.fsdp=8
    python bench/gpu_aot.py --config configs/mpt/1b.yaml --batch 8 --set model.remat=none --set precision=amp_fp8

It needs JAX's CUDA plugin, which jaxtrain does not depend on: use a side environment (about 6 GB,
from the package index; no GPU, driver or network needed when it runs), with the jax version of
jaxtrain's own environment:

    PYENV_VERSION=3.12.1 python3.12 -m venv /tmp/gpu-aot-venv
    /tmp/gpu-aot-venv/bin/pip install "jax[cuda12]==$(.venv/bin/python -c 'import jax; print(jax.__version__)')" -e .
    /tmp/gpu-aot-venv/bin/python bench/gpu_aot.py --config configs/mpt/1b.yaml --batch 8

The step is traced for the GPU (``compiling_for("gpu")``: cuDNN attention, no CPU kernels) and
compiled by XLA for a one-device H200 topology from abstract shapes. Without a device XLA cannot
autotune, so GEMM tilings differ from a real run's. For each kernel of the compiled program the
script counts HBM bytes (operands read and results written, slices of stacked layer arrays
counted at their slice size) and matmul FLOPs, and takes ``max(bytes / bandwidth, flops / peak)``
as its time: a roofline bound, not a measurement. What it measures exactly is compile time,
XLA's memory figures, and the bytes and kernels the program moves, which changes to the model can
be compared by. ``bench/gpu_check.sh`` measures on a device. With ``precision=amp_fp8`` it also
counts the cuBLASLt fp8 GEMM calls, and times them at twice the bf16 peak; products with float32
operands (TF32 at XLA's default precision) are timed at half of it.

``--target tpu-v4|tpu-v5e|tpu-v5p|tpu-v6e`` compiles for that TPU chip instead (traced for the TPU:
the Pallas flash attention), with libtpu from ``pip install "jax[tpu]==<the same version>" -e .``
in a side environment (about 300 MB; no TPU needed). It prints compile time, XLA's memory figures
against the chip's HBM and the number of Pallas kernel calls; the kernel census reads GPU programs
only. A program that does not fit fails to compile with XLA's own out-of-memory message.

    /tmp/tpu-aot-venv/bin/python bench/gpu_aot.py --target tpu-v5p --config configs/mpt/1b.yaml --batch 1 --seq 32768 --set model.remat=full
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import re
import sys
import time

# H200 SXM: 132 SMs at 1.98 GHz, 141 GB HBM3e at 4.8 TB/s, 50 MB L2, compute capability 9.0.
H200_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150323855360 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H200"
"""
H200_COMPUTE_CAPABILITY = (9, 0)
H200_PEAK_FLOPS = 989e12  # dense bf16
H200_BANDWIDTH = 4.8e12
H200_NVLINK_BUS_BANDWIDTH = 370e9  # what NCCL's ring collectives reach per GPU over NVLink 4 / NVSwitch

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s+(?:ROOT )?%(\S+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_COLLECTIVES = {"all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute"}
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
         "after-all", "opt-barrier", "partition-id", "replica-id", "iota"}  # fmt: skip


def _dims(text: str) -> list[tuple[str, list[int]]]:
    return [(dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims in _ARRAY.findall(text)]


def array_bytes(type_text: str) -> int:
    """Bytes of every array in an HLO type (a tuple counts all its members)."""
    total = 0
    for dtype, dims in _dims(type_text):
        n = 1
        for d in dims:
            n *= d
        total += n * _BYTES[dtype]
    return total


def parse_computations(hlo_text: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """``{computation: [(name, type, opcode, rest of line), ...]}`` from optimized HLO text."""
    comps: dict[str, list] = {}
    current = None
    for line in hlo_text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            m = re.match(r"^(?:ENTRY )?%(\S+) ", line)
            current = m.group(1) if m else None
            if current:
                comps[current] = []
            continue
        m = _INSTR.match(line)
        if m and current:
            comps[current].append(m.groups())
    return comps


def _operands(rest: str) -> list[str]:
    depth, end = 1, 0
    for end, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            break
    return re.findall(r"%([\w.\-]+)", rest[:end])


def _param_reads(body: list[tuple[str, str, str, str]]) -> dict[int, int | None]:
    """For a fused computation: parameter index -> bytes read when only slices of it, or the
    elements a gather picks, are used (None: read whole); -1 -> bytes of buffers updated in place
    by a dynamic-update-slice, which count in the result type but are not written whole; -2 ->
    the bytes those updates write."""
    params = {name: int(re.search(r"parameter\((\d+)", f"{op}({rest}").group(1))
              for name, _, op, rest in body if op == "parameter"}  # fmt: skip
    types = {name: typ for name, typ, _, _ in body}
    users: dict[str, list[tuple[str, str, str, int]]] = collections.defaultdict(list)
    for name, typ, op, rest in body:
        for position, operand in enumerate(_operands(rest)):
            users[operand].append((name, typ, op, position))

    def picked_by(name: str) -> list[tuple[str, str, int]]:  # its uses, looking through bitcasts
        found = []
        for user, typ, op, position in users.get(name, []):
            found += picked_by(user) if op in ("bitcast", "reshape") else [(typ, op, position)]
        return found

    reads: dict[int, int | None] = {}
    for pname, index in params.items():
        picks, uses = picked_by(pname), users.get(pname, [])
        if picks and all(op in ("slice", "dynamic-slice", "gather") and position == 0 for _, op, position in picks):
            reads[index] = sum(array_bytes(typ) for typ, _, _ in picks)
        elif uses and all(op == "dynamic-update-slice" and position == 0 for _, _, op, position in uses):
            reads[index] = 0  # the buffer updated in place is not read
        else:
            reads[index] = None
    reads[-1] = reads[-2] = 0
    for _, typ, op, rest in body:
        if op == "dynamic-update-slice" and _operands(rest)[0] in params:
            reads[-1] += array_bytes(typ)
            reads[-2] += array_bytes(types.get(_operands(rest)[1], ""))
    return reads


def _dot_flops(instrs: list[tuple[str, str, str, str]], types: dict[str, str]) -> float:
    """2·M·N·K of every ``dot`` among ``instrs`` (operand types looked up in ``types``)."""
    flops = 0.0
    for _, typ, op, rest in instrs:
        if op != "dot":
            continue
        out = _dims(typ)[0][1]
        lhs_dims = _dims(types.get(_operands(rest)[0], ""))
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        k = 1
        if lhs_dims and contracting:
            for c in contracting.group(1).split(","):
                if c:
                    k *= lhs_dims[0][1][int(c)]
        n = 1
        for d in out:
            n *= d
        flops += 2.0 * n * k
    return flops


_ROUNDING_ALGORITHM = re.compile(r"algorithm=dot_(bf16_bf16|f16_f16)_f32\b")  # half-precision operands


def _tensor_core_rate(instrs, types, gemms) -> float:
    """A kernel's matmul rate against the bf16 peak, from its operands' element type: fp8 runs
    at twice it on Hopper, and float32 operands (XLA's default precision on GPUs, TF32) at half,
    unless the product's algorithm rounds them to half precision (``dot_bf16_bf16_f32``)."""
    lhs_types = [lhs_type for _, lhs_type, _ in gemms]
    lhs_types += [types.get(_operands(rest)[0], "") if not _ROUNDING_ALGORITHM.search(rest) else "bf16"
                  for _, _, op, rest in instrs if op == "dot"]  # fmt: skip
    if any(t.startswith("f8") for t in lhs_types):
        return 2.0
    if any(t.startswith("f32") for t in lhs_types):
        return 0.5
    return 1.0


def _gemm_call_flops(rest: str, lhs_type: str, out_type: str) -> float:
    """A cuBLAS GEMM custom call's ``2·M·N·K`` (batch included) from its first result and the
    contracting dimensions in its backend config; 0 when they cannot be read."""
    contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', rest)
    lhs, out = _dims(lhs_type), _dims(out_type)
    if not (contracting and lhs and out):
        return 0.0
    k = math.prod(lhs[0][1][int(d)] for d in re.findall(r"\d+", contracting.group(1)))
    return 2.0 * math.prod(out[0][1]) * k


def _attention_flops(rest: str, query_type: str) -> float:
    """A cuDNN flash-attention call's matmul FLOPs: ``4·b·h·q·k·d`` forward (half under a causal
    mask), 2.5 times that backward (the two products recomputed and three gradients)."""
    scores = re.search(r'"intermediate_tensor_shape":\s*\{"element_type":\s*"\w+",\s*"dimensions":\s*\[([^\]]*)\]', rest)
    query = _dims(query_type)
    if not scores or not query:
        return 0.0
    n = 1
    for d in re.findall(r"\d+", scores.group(1)):
        n *= int(d)
    flops = 4.0 * n * query[0][1][-1]
    if '"mask_type": "CAUSAL"' in rest or '"mask_type":"CAUSAL"' in rest:
        flops /= 2
    return flops * (2.5 if "Backward" in rest else 1.0)


def _kind(name: str, op: str, rest: str, body: list[tuple[str, str, str, str]], flops: float) -> str:
    if "__cudnn$fmha" in rest:
        return "attention (cuDNN)"
    if flops or "__cublas" in rest:
        return "matmul"
    if op in ("copy", "copy-start", "transpose"):
        return "copy/transpose"
    if op.replace("-start", "") in _COLLECTIVES:
        return "collective"
    if op not in ("fusion", "fusion-start"):
        return op
    if "triton_softmax" in name:
        return "row-normalize (triton)"
    root_op = body[-1][2] if body else ""
    if root_op in ("dynamic-update-slice", "dynamic-slice"):
        return "layer stack slice/update"
    fusion_kind = re.search(r"kind=(\w+)", rest)
    if fusion_kind and fusion_kind.group(1) == "kCustom":
        return "triton fusion" if "__triton" in rest else "custom fusion"
    return {"kLoop": "elementwise", "kInput": "reduction"}.get(fusion_kind.group(1) if fusion_kind else "", "fusion")


def _condition_bound(condition: list[tuple[str, str, str, str]]):
    """The constant N of a loop condition that is one ``compare(counter, N), direction=LT``, as a
    match object (group 1), or None."""
    constants = {name: re.match(r"(\d+)\)", rest) for name, _, op, rest in condition if op == "constant"}
    compares = [rest for _, _, op, rest in condition if op == "compare" and "direction=LT" in rest]
    if len(compares) != 1:
        return None
    operands = _operands(compares[0])
    return constants.get(operands[1]) if len(operands) == 2 else None


def kernel_census(hlo_text: str, *, peak_flops: float, bandwidth: float) -> list[dict]:
    """One row per kernel of an optimized HLO module, loop bodies weighted by their known trip
    count: kind, launches, HBM bytes, matmul FLOPs and roofline seconds."""
    comps = parse_computations(hlo_text)
    entry = re.search(r"^ENTRY %(\S+)", hlo_text, re.M).group(1)
    weights = {entry: 1}
    pending = [entry]
    while pending:
        caller = pending.pop()
        for _, _, op, rest in comps.get(caller, []):
            if op == "while":
                body = re.search(r"body=%([\w.\-]+)", rest).group(1)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                if trips is None:  # TPU programs: the bound in the condition ``i < N``
                    condition = re.search(r"condition=%([\w.\-]+)", rest).group(1)
                    trips = _condition_bound(comps.get(condition, []))
                weights[body] = weights[caller] * (int(trips.group(1)) if trips else 1)
                pending.append(body)
    rows = []
    for comp, weight in weights.items():
        types = {name: typ for name, typ, _, _ in comps[comp]}
        for name, typ, op, rest in comps[comp]:
            if op in _FREE or op.endswith("-done"):
                continue
            operands = _operands(rest)
            called = re.search(r"calls=%([\w.\-]+)", rest)
            body = comps.get(called.group(1), []) if called else []
            reads = _param_reads(body) if body else {}
            read = 0
            for position, operand in enumerate(operands):
                sliced = reads.get(position)
                read += array_bytes(types.get(operand, "")) if sliced is None else sliced
            out_type = typ
            if op.endswith("-start"):  # async: (operands, results, context); count the results
                out_type = typ.rsplit("),", 1)[-1]
            # GEMMs XLA hands to cuBLAS (Triton GEMMs off, fp8, or inside a dynamic-slice
            # fusion) carry no dot: their FLOPs come from the call's shapes
            scope, scope_types = (body, {n: t for n, t, _, _ in body}) if body else ([(name, typ, op, rest)], types)
            gemms = [(call_rest, scope_types.get((_operands(call_rest) or [""])[0], ""), call_type)
                     for _, call_type, call_op, call_rest in scope
                     if call_op == "custom-call" and "__cublas" in call_rest]  # fmt: skip
            if gemms:  # (result, workspace): the workspace is scratch, not traffic
                out_type = out_type.split(", s8[")[0]
            written = max(0, array_bytes(out_type) - reads.get(-1, 0)) + reads.get(-2, 0)
            if "__cudnn$fmha" in rest:
                flops = _attention_flops(rest, types.get(operands[0], "") if operands else "")
            else:
                flops = _dot_flops(scope, scope_types) + sum(_gemm_call_flops(*gemm) for gemm in gemms)
            meta = re.search(r'op_name="([^"]*)"', rest)
            moved = read + written
            rate = _tensor_core_rate(scope, scope_types, gemms)
            seconds = max(moved / bandwidth, flops / (peak_flops * rate))
            kind = _kind(name, op, rest, body, flops)
            if kind == "matmul" and rate < 1:  # listed apart: a bf16 step should have none
                kind = "matmul (float32, TF32)"
            if kind == "collective":  # over NVLink, overlapped with compute: counted, not timed
                seconds = 0.0
            rows.append({"name": name, "kind": kind, "count": weight, "comp": comp,
                         "bytes": moved * weight, "flops": flops * weight, "seconds": seconds * weight,
                         "op": meta.group(1) if meta else ""})  # fmt: skip
    return rows


def _group_size(rest: str) -> int:
    """Devices in each replica group of a collective (1 when the groups cannot be read)."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:\s*\{([^}]*)\})?", rest)
    if mesh:  # mesh['a'=2,'b'=4] {'b'}: the groups span the axes in braces (all of them without)
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
        axes = re.findall(r"'(\w+)'", mesh.group(2)) if mesh.group(2) else list(sizes)
        return math.prod(int(sizes[a]) for a in axes if a in sizes) or 1
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", rest)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
    return len(listed.group(1).split(",")) if listed else 1


def collective_exposure(hlo_text: str, rows: list[dict], *, link_bandwidth: float) -> dict:
    """How much collective time the schedule leaves exposed: each collective's link time (ring
    algorithms: all-gather and reduce-scatter move ``(n-1)/n`` of the full array per device,
    all-reduce twice that) against the roofline time of the kernels scheduled between its start
    and done; a synchronous collective hides behind nothing. Per step, loop bodies weighted."""
    comps = parse_computations(hlo_text)
    seconds = {(r["comp"], r["name"]): r["seconds"] / r["count"] for r in rows if r["kind"] != "collective"}
    weights = {r["comp"]: r["count"] for r in rows}
    link = exposed = 0.0
    count = 0
    for comp, weight in weights.items():
        types = {name: typ for name, typ, _, _ in comps[comp]}
        busy, started = 0.0, {}
        for name, typ, op, rest in comps[comp]:
            busy += seconds.get((comp, name), 0.0)
            base = op.removesuffix("-start").removesuffix("-done")
            if base not in _COLLECTIVES:
                continue
            if op.endswith("-done"):
                begun, needed = started.pop(_operands(rest)[0], (busy, 0.0))
                exposed += max(0.0, needed - (busy - begun)) * weight
                continue
            result = typ.rsplit("),", 1)[-1] if op.endswith("-start") else typ
            full = max(array_bytes(result), sum(array_bytes(types.get(o, "")) for o in _operands(rest)))
            n = _group_size(rest)
            needed = full * (n - 1) / n * (2 if base == "all-reduce" else 1) / link_bandwidth
            link += needed * weight
            count += weight
            if op.endswith("-start"):
                started[name] = (busy, needed)
            else:
                exposed += needed * weight
    return {"collectives": count, "link_ms": link * 1e3, "exposed_ms": exposed * 1e3}


def summarize(rows: list[dict], top: int) -> dict:
    kinds: dict[str, dict] = {}
    for row in rows:
        k = kinds.setdefault(row["kind"], {"kernels": 0, "bytes": 0, "flops": 0.0, "seconds": 0.0})
        k["kernels"] += row["count"]
        k["bytes"] += row["bytes"]
        k["flops"] += row["flops"]
        k["seconds"] += row["seconds"]
    total = sum(k["seconds"] for k in kinds.values())
    print(f"roofline bound {total * 1e3:.1f} ms, {sum(k['bytes'] for k in kinds.values()) / 1e9:.1f} GB moved, "
          f"{sum(k['flops'] for k in kinds.values()) / 1e12:.1f} matmul TFLOP, "
          f"{sum(k['kernels'] for k in kinds.values())} kernels")  # fmt: skip
    print(f"{'kind':24s} {'kernels':>8s} {'GB':>9s} {'TFLOP':>8s} {'ms':>8s}")
    for kind, k in sorted(kinds.items(), key=lambda kv: -kv[1]["seconds"]):
        print(f"{kind:24s} {k['kernels']:8d} {k['bytes'] / 1e9:9.2f} {k['flops'] / 1e12:8.2f} {k['seconds'] * 1e3:8.2f}")
    if top:
        print(f"\ncostliest {top} kernels (ms in all, launches, kind, GB, name, op):")
        for row in sorted(rows, key=lambda r: -r["seconds"])[:top]:
            print(f"  {row['seconds'] * 1e3:7.2f} x{row['count']:<3d} {row['kind']:22s} {row['bytes'] / 1e9:7.2f} "
                  f"{row['name'][:34]:34s} {row['op'][-90:]}")  # fmt: skip
    return {"roofline_ms": total * 1e3, "kinds": {k: {**v, "seconds": v["seconds"]} for k, v in kinds.items()}}


def _answer_compute_capability_for_the_target(cudnn_module) -> None:
    """JAX's cuDNN attention asks the process's own GPU for its compute capability (for head sizes
    over 128, in-kernel score modification, packed layouts); this process has none, so answer for
    the H200 being compiled for."""
    if cudnn_module is None:
        return
    version = lambda text: tuple(int(x) for x in text.split("."))  # noqa: E731
    cudnn_module.check_compute_capability = lambda capability: H200_COMPUTE_CAPABILITY >= version(capability)
    cudnn_module.is_cuda_compute_capability_equal = lambda capability: H200_COMPUTE_CAPABILITY == version(capability)


TPU_TOPOLOGIES = {"tpu-v4": "v4:2x2x1", "tpu-v5e": "v5e:2x2", "tpu-v5p": "v5p:2x2x1", "tpu-v6e": "v6e:2x2"}


def _topology(target: str, devices: int):
    from jax.experimental import topologies

    if target == "h200":
        return topologies.get_topology_desc(platform="cuda", target_config=H200_TARGET, topology=f"1x1x{devices}")
    name = TPU_TOPOLOGIES[target]
    if devices > 4:  # a larger slice of the same generation: chips along the last axis
        dims = name.split(":")[1].split("x")
        dims[-1] = str(int(dims[-1]) * -(-devices // 4))
        name = name.split(":")[0] + ":" + "x".join(dims)
    return topologies.get_topology_desc(platform="tpu", topology_name=name)


def _tpu_cost_estimate(compiled, hlo: str, cfg, batch: int, hardware) -> dict:
    """The TPU compiler's own cost model of the step (``optimal_seconds``: its estimate of the
    time, FLOPs and bytes accessed), and the MFU that time would give. XLA counts a loop body
    once, so the figures cover the whole step only when no loop is left
    (``--set model.scan_unroll=<n_layers>``)."""
    from jaxtrain.metrics.flops import mpt_active_params, mpt_flops_per_batch

    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    seconds = float(cost.get("optimal_seconds", 0.0))
    loops = len(re.findall(r"\swhile\(", hlo))
    model_flops = mpt_flops_per_batch(mpt_active_params(cfg.model), cfg.model.n_layers, cfg.model.d_model,
                                      cfg.max_seq_len, batch)  # fmt: skip
    estimate = {"xla_tflop": float(cost.get("flops", 0.0)) / 1e12, "xla_gb_accessed": float(cost.get("bytes accessed", 0.0)) / 1e9,
                "xla_estimate_ms": seconds * 1e3, "loops_counted_once": loops}  # fmt: skip
    line = (f"TPU cost model: {estimate['xla_estimate_ms']:.1f} ms, {estimate['xla_tflop']:.1f} TFLOP, "
            f"{estimate['xla_gb_accessed']:.0f} GB accessed")
    if seconds and not loops:
        estimate["estimate_mfu"] = model_flops / seconds / hardware.peak_bf16_flops
        line += f"; model FLOPs {model_flops / 1e12:.1f} T, MFU at that time {estimate['estimate_mfu']:.0%}"
    elif loops:
        line += f" ({loops} loops counted once: unroll the layers for whole-step figures)"
    print(line)
    return estimate


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/mpt/1b.yaml")
    parser.add_argument("--target", choices=("h200", *TPU_TOPOLOGIES), default="h200",
                        help="the accelerator to compile for (TPUs need jax[tpu] instead of the CUDA plugin; "
                             "they get compile time and memory, the kernel census reads GPU programs only)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=8, help="sequences per device per step (one microbatch)")
    parser.add_argument("--devices", type=int, default=1, help="devices on one host (shard with --set parallelism.*)")
    parser.add_argument("--seq", type=int, help="sequence length (default: the config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--top", type=int, default=25, help="list the N costliest kernels")
    parser.add_argument("--hlo", help="also write the optimized HLO text here")
    parser.add_argument("--alibi", choices=("bias", "score_mod", "key_dims"), default="bias",
                        help="how ALiBi reaches cuDNN: a constant bias tensor (what auto picks while the bias "
                             "is at most 1 GiB), computed in the kernel (cuDNN 9.13+) or carried in extra "
                             "query and key dimensions")  # fmt: skip
    args = parser.parse_args(argv)
    os.environ["JAXTRAIN_CUDNN_ALIBI"] = args.alibi
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the process itself runs nothing on the accelerator
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver to check
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU to share: skip libtpu's one-process lock
    platform = "gpu" if args.target == "h200" else "tpu"

    import jax
    import jax.numpy as jnp

    from jaxtrain.config import load_config
    from jaxtrain.layers import fp8, gpu_kernels
    from jaxtrain.metrics.hardware import get_hardware
    from jaxtrain.parallel.mesh import axis_rules, batch_sharding, build_mesh
    from jaxtrain.parallel.platform import compiling_for
    from jaxtrain.train.optim import build_optimizer
    from jaxtrain.train.state import abstract_train_state
    from jaxtrain.train.step import (COMPUTE_DTYPES, FP8_PRECISIONS, compile_train_step, compiler_options,
                                     make_train_step)

    try:
        topology = _topology(args.target, args.devices)
    except Exception as err:  # noqa: BLE001 (any failure here means the plugin is missing or too old)
        sys.exit(f"gpu_aot: cannot describe a {args.target} without JAX's {'CUDA plugin' if platform == 'gpu' else 'libtpu'} "
                 f"({type(err).__name__}: {str(err)[:200]}); install it in a side environment as this script's "
                 "docstring says")  # fmt: skip
    if platform == "gpu":
        _answer_compute_capability_for_the_target(gpu_kernels._cudnn_fused)
    overrides = [f"global_train_batch_size={args.batch * args.devices}", f"device_train_microbatch_size={args.batch}"]
    if args.seq:
        overrides += [f"max_seq_len={args.seq}", f"model.max_seq_len={args.seq}"]
    cfg = load_config(args.config, overrides + args.set, notices=[])
    mesh = build_mesh(cfg.parallelism, topology.devices[: args.devices])
    rules = axis_rules(cfg.parallelism)
    started = time.perf_counter()
    with compiling_for(platform):
        tx = build_optimizer(cfg.optimizer, lambda _: cfg.optimizer.lr, clipping=cfg.algorithms.gradient_clipping)
        state, model_def, shardings = abstract_train_state(cfg.model, tx, mesh=mesh, rules=rules,
                                                           spike_window=cfg.health.spike_window)  # fmt: skip
        step = make_train_step(model_def, tx, lambda _: cfg.optimizer.lr,
                               compute_dtype=COMPUTE_DTYPES[cfg.precision], num_microbatches=1,
                               fp8_products=cfg.precision in FP8_PRECISIONS)  # fmt: skip
        batch = {"input_ids": jax.ShapeDtypeStruct((args.batch * args.devices, cfg.max_seq_len), jnp.int32,
                                                    sharding=batch_sharding(mesh))}  # fmt: skip
        jitted = compile_train_step(step, shardings, batch_sharding(mesh),
                                    options=compiler_options(cfg.precision, platform))
        # Pallas' TPU compiler asks the current mesh which chip it compiles for (this process has none)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if platform == "tpu" else contextlib.nullcontext():
            lowered = jitted.lower(state, batch)
    lowered_at = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:  # the TPU compiler refuses a program over the chip's HBM
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        print(f"{args.config} {' '.join(args.set)}: does not fit one {args.target}: {str(err).splitlines()[0][:300]}")
        result = {"config": args.config, "target": args.target, "overrides": args.set, "batch": args.batch,
                  "devices": args.devices, "seq": cfg.max_seq_len, "fits": False}  # fmt: skip
        print("RESULT " + json.dumps(result), flush=True)
        return result
    compiled_at = time.perf_counter()
    hlo = compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo)
    memory = compiled.memory_analysis()
    fused = hlo.count("__cudnn$fmha") if platform == "gpu" else hlo.count('custom_call_target="tpu_custom_call"')
    fp8_gemms = fp8.gemm_calls(hlo)
    used = memory.argument_size_in_bytes + memory.temp_size_in_bytes
    hbm = get_hardware("h200" if platform == "gpu" else args.target).memory_bytes
    print(f"{args.config} {' '.join(args.set)}: batch {args.batch} x {cfg.max_seq_len} per device, {cfg.precision}, "
          f"for {args.devices} x {topology.devices[0].device_kind}, mesh {dict(mesh.shape)}: lower {lowered_at - started:.1f} s, "
          f"compile {compiled_at - lowered_at:.1f} s; arguments {memory.argument_size_in_bytes / 2**30:.1f} GiB, "
          f"temporaries {memory.temp_size_in_bytes / 2**30:.1f} GiB ({used / hbm:.0%} of {hbm / 2**30:.0f} GiB); "
          f"{'cuDNN attention' if platform == 'gpu' else 'Pallas (Mosaic) kernel'} calls {fused}"
          + (f", fp8 GEMM calls {fp8_gemms}" if cfg.precision in FP8_PRECISIONS else ""))  # fmt: skip
    result = {"config": args.config, "target": args.target, "overrides": args.set, "batch": args.batch,
              "devices": args.devices, "alibi": args.alibi, "seq": cfg.max_seq_len,
              "compile_s": compiled_at - lowered_at, "temp_gib": memory.temp_size_in_bytes / 2**30,
              "fits": used <= hbm, "fused_attention_calls": fused, "fp8_gemm_calls": fp8_gemms}  # fmt: skip
    if platform == "gpu":
        rows = kernel_census(hlo, peak_flops=H200_PEAK_FLOPS, bandwidth=H200_BANDWIDTH)
        summary = summarize(rows, args.top)
        result.update(gb_moved=sum(r["bytes"] for r in rows) / 1e9, roofline_ms=summary["roofline_ms"])
        if args.devices > 1:
            exposure = collective_exposure(hlo, rows, link_bandwidth=H200_NVLINK_BUS_BANDWIDTH)
            print(f"collectives: {exposure['collectives']} a step, {exposure['link_ms']:.1f} ms on the links at "
                  f"{H200_NVLINK_BUS_BANDWIDTH / 1e9:.0f} GB/s, {exposure['exposed_ms']:.1f} ms of it not covered by the "
                  f"kernels scheduled alongside")  # fmt: skip
            result.update(exposure)
    else:
        result.update(_tpu_cost_estimate(compiled, hlo, cfg, args.batch, get_hardware(args.target)))
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)

"""Where one transformer layer's time goes: each piece of an MPT block timed forward + backward.

    python bench/layer_profile.py --shape s --precision bf16 --rounds 5

Every piece is jitted on its own at the exact shapes of the ``--shape`` model (the block's real
modules and parameters, float32 residual stream, the compute dtype of ``--precision``) and
differentiated with a fixed cotangent, so its time covers forward and backward. Rounds alternate
over the pieces so machine load affects them alike; the table prints medians, each piece's share
of the pieces' sum, and the whole block against that sum (the difference is what XLA fuses across
piece boundaries, or loses at them). ``--plain`` times the plain XLA formulation instead of the
CPU kernels. ``--ops N`` also traces one piece (``--piece``, default the whole block) with
``jax.profiler`` and prints its N costliest HLO ops per call, with their shapes and the JAX
operation they come from, plus the time by op kind (dots against the rest).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import PRECISIONS, SHAPES, build_config  # noqa: E402

from jaxtrain.layers import attention, cpu_kernels  # noqa: E402
from jaxtrain.models.mpt import MPTBlock  # noqa: E402
from jaxtrain.train.step import COMPUTE_DTYPES  # noqa: E402


def fwd_bwd(fn):
    """jit of ``(args, cotangent) -> (output, gradients)``: forward and backward of ``fn``."""

    def run(cotangent, *args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cotangent.astype(out.dtype))

    return jax.jit(run)


def pieces(cfg, dtype):
    """{name: (jitted fwd+bwd, args)} for the pieces of one block and the whole block."""
    model = cfg.model
    block = MPTBlock(model, rngs=nnx.Rngs(0))
    batch, length, d_model = cfg.global_train_batch_size, cfg.max_seq_len, model.d_model
    heads = model.n_heads
    head_dim = d_model // heads
    hidden = block.ffn.up_proj.kernel.shape[1]
    slopes = jnp.asarray(attention.alibi_slopes(heads, model.attn_config.alibi_bias_max))
    key = iter(jax.random.split(jax.random.key(1), 16))

    def normal(shape, dtype=jnp.float32):
        return jax.random.normal(next(key), shape, jnp.float32).astype(dtype)

    x = normal((batch, length, d_model))
    x_c = x.astype(dtype)
    kv_heads = block.attn.kv_n_heads
    qkv_heads = [normal((batch, length, n, head_dim), dtype) for n in (heads, kv_heads, kv_heads)]
    qkv_width = block.attn.Wqkv.kernel.shape[1]
    up_out = normal((batch, length, hidden), dtype)
    scale = block.attn.softmax_scale

    def with_module(module, call):
        graph, state = nnx.split(module)
        return lambda state, *a: call(nnx.merge(graph, state), *a), state

    norm_1, norm_1_state = with_module(block.norm_1, lambda m, x: m(x, compute_dtype=dtype))
    norm_2, norm_2_state = with_module(block.norm_2, lambda m, x: m(x, compute_dtype=dtype))
    wqkv, wqkv_state = with_module(block.attn.Wqkv, lambda m, h: m(h, compute_dtype=dtype))
    out_proj, out_state = with_module(block.attn.out_proj, lambda m, h: m(h, compute_dtype=dtype))
    up, up_state = with_module(block.ffn.up_proj, lambda m, h: m(h, compute_dtype=dtype))
    down, down_state = with_module(block.ffn.down_proj, lambda m, h: m(h, compute_dtype=dtype))
    whole, whole_state = with_module(block, lambda m, x: m(x, slopes=slopes, compute_dtype=dtype))

    def attn_core(q, k, v):
        return attention.dot_product_attention(q, k, v, scale=scale, slopes=slopes, compute_dtype=dtype)

    def residual_add(x, h):
        return x + h.astype(jnp.float32)

    table = {
        "norm_1 (LayerNorm)": (norm_1, (norm_1_state, x), (batch, length, d_model)),
        "Wqkv dense": (wqkv, (wqkv_state, x_c), (batch, length, qkv_width)),
        "attention core": (attn_core, tuple(qkv_heads), (batch, length, heads, head_dim)),
        "out_proj dense": (out_proj, (out_state, x_c), (batch, length, d_model)),
        "residual add": (residual_add, (x, x_c), (batch, length, d_model)),
        "norm_2 (LayerNorm)": (norm_2, (norm_2_state, x), (batch, length, d_model)),
        "up_proj dense": (up, (up_state, x_c), (batch, length, hidden)),
        "GELU": (block.ffn.activation, (up_out,), (batch, length, hidden)),
        "down_proj dense": (down, (down_state, up_out), (batch, length, d_model)),
        "whole block": (whole, (whole_state, x), (batch, length, d_model)),
    }
    out = {}
    for name, (fn, args, out_shape) in table.items():
        out[name] = (fwd_bwd(fn), (normal(out_shape), *args))
    return out


def op_events(planes, hlo_names) -> list[tuple[str, int, int]]:
    """(HLO op, start ns, duration ns) of every op execution in a trace's planes.

    On a GPU or TPU the device planes hold them: an ``XLA Ops`` line where the trace has one,
    else the kernels on the stream lines, each named by its ``hlo_op`` statistic (a kernel
    without one keeps its own name). On a CPU, XLA's worker threads (and the calling thread
    under synchronous dispatch) carry events named after the HLO ops; host lines are never
    counted when a device plane exists, so no op is counted twice.
    """
    planes = list(planes)  # ProfileData hands out an iterator
    device = [plane for plane in planes if plane.name.startswith("/device:")]
    events = []
    if device:
        for plane in device:
            lines = ([line for line in plane.lines if line.name == "XLA Ops"]
                     or [line for line in plane.lines if line.name.startswith("Stream")])  # fmt: skip
            for line in lines:
                for event in line.events:
                    name = dict(event.stats).get("hlo_op", event.name)
                    events.append((str(name), int(event.start_ns), int(event.duration_ns)))
        return events
    for plane in planes:
        for line in plane.lines:
            events += [(e.name, int(e.start_ns), int(e.duration_ns)) for e in line.events if e.name in hlo_names]
    return events


def busy_ns(events: list[tuple[str, int, int]]) -> int:
    """Time during which at least one of ``events`` runs (the union of their intervals)."""
    total, end = 0, None
    for _, start, duration in sorted(events, key=lambda event: event[1]):
        stop = start + duration
        if end is None or start >= end:
            total, end = total + duration, stop
        elif stop > end:
            total, end = total + stop - end, stop
    return total


def wall_shares_ns(events: list[tuple[str, int, int]]) -> collections.Counter:
    """Each op's share of the wall time: every instant is split evenly among the ops running then.

    Ops that overlap (XLA:CPU runs independent ops on several threads) each last the whole
    overlap, so their durations add up to more than the time they took; the shares add up to
    ``busy_ns(events)``."""
    points = sorted({t for _, start, duration in events for t in (start, start + duration)})
    starts = collections.defaultdict(list)
    for index, (_, start, duration) in enumerate(events):
        if duration > 0:
            starts[start].append(index)
    shares: collections.Counter = collections.Counter()
    active: set[int] = set()
    for left, right in zip(points, points[1:]):
        active = {i for i in active if events[i][1] + events[i][2] > left} | set(starts.get(left, ()))
        for i in active:
            shares[events[i][0]] += (right - left) / len(active)
    return shares


def hlo_op_table(fn, args, top: int, calls: int = 3, hlo_text: str | None = None) -> None:
    """Trace ``calls`` runs of the jitted ``fn`` and print its costliest HLO ops per call, and
    for how much of each call's wall time any op ran (device busy time off the CPU: a large gap
    means the host or launches, not the kernels, set the pace). ``hlo_text``: the optimized HLO
    of what ``fn`` runs, when ``fn`` is not a jitted function to lower (e.g. a closure that calls
    an already compiled step), which also spares compiling it again."""
    from jax.profiler import ProfileData

    info = {}
    hlo_text = fn.lower(*args).compile().as_text() if hlo_text is None else hlo_text
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if match:
            op_name = re.search(r'op_name="([^"]+)"', line)
            info[match.group(1)] = (match.group(2), op_name.group(1) if op_name else "")
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
            wall_ms = (time.perf_counter() - start) / calls * 1e3
        profile = ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    events = op_events(profile.planes, info)
    times: collections.Counter = collections.Counter()
    for name, _, duration in events:
        times[name] += duration / calls / 1e6
    walls = collections.Counter({name: ns / calls / 1e6 for name, ns in wall_shares_ns(events).items()})
    total = sum(times.values())
    busy_ms = busy_ns(events) / calls / 1e6
    print(f"HLO ops per call: some op running {busy_ms:.1f} ms of the {wall_ms:.1f} ms each call took "
          f"({busy_ms / wall_ms:.0%}). Columns: wall ms (each instant split among the ops running then; "
          f"they add up to the {busy_ms:.1f} ms), its share, then ms summed over threads (total {total:.1f}; "
          f"an op overlapping others lasts the whole overlap):")
    for name, ms in walls.most_common(top):
        shape, op_name = info.get(name, ("?", ""))
        print(f"  {ms:8.2f}  {ms / busy_ms:6.1%}  {times[name]:8.2f}  {name[:30]:30s} {shape[:36]:36s} {op_name[-60:]}")
    kinds: collections.Counter = collections.Counter()
    for name, ms in walls.items():
        kinds["dot" if "dot_general" in info.get(name, ("", ""))[1] else re.sub(r"\.\d+$", "", name)] += ms
    print("by kind, of the wall time: " + ", ".join(f"{kind} {ms / busy_ms:.0%}" for kind, ms in kinds.most_common(8)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="s")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--plain", action="store_true", help="the plain XLA formulation, not the CPU kernels")
    parser.add_argument("--ops", type=int, default=0, help="also print the N costliest HLO ops of --piece")
    parser.add_argument("--piece", default="whole block", help="the piece --ops traces")
    args = parser.parse_args(argv)
    cfg = build_config(argparse.Namespace(config=None, shape=args.shape, precision=args.precision, seq=None,
                                          batch=None, micro=None, remat=None))
    dtype = COMPUTE_DTYPES[cfg.precision]
    if args.plain:
        cpu_kernels.use_cpu_kernels = lambda compute_dtype: False
    calls = pieces(cfg, dtype)
    for fn, fn_args in calls.values():
        jax.block_until_ready(fn(*fn_args))
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, (fn, fn_args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    whole = medians.pop("whole block")
    total = sum(medians.values())
    mode = "plain XLA" if args.plain else ("CPU kernels" if cpu_kernels.use_cpu_kernels(dtype) else "default")
    print(f"one layer fwd+bwd, shape {args.shape} {args.precision} ({mode}), load {os.getloadavg()[0]:.1f}")
    print(f"  {'piece':22s} {'ms':>8s}  share")
    for name, median in medians.items():
        print(f"  {name:22s} {median * 1e3:8.1f}  {median / total:6.1%}")
    print(f"  {'sum of pieces':22s} {total * 1e3:8.1f}")
    print(f"  {'whole block':22s} {whole * 1e3:8.1f}  ({whole / total:.2f}x the sum)")
    if args.ops:
        hlo_op_table(*calls[args.piece], top=args.ops)


if __name__ == "__main__":
    main()

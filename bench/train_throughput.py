"""Training throughput of jaxtrain's MPT: tokens/s, model GFLOP/s and MFU against a matmul peak
measured in the same process.

    python bench/train_throughput.py --shape xs --precision bf16 --steps 12
    python bench/train_throughput.py --config configs/mpt/125m.yaml --seq 2048 --batch 16 --precision bf16

The model, optimizer (decoupled AdamW with clipping) and train step come from jaxtrain's own API;
tokens are synthetic. Prints one ``RESULT {json}`` line last, for drivers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

T_PROCESS = time.perf_counter()

from jaxtrain.train.host_allocator import retain_freed_memory  # noqa: E402

retain_freed_memory()  # as the jaxtrain entry points do, before JAX starts its threads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxtrain.config import load_config  # noqa: E402
from jaxtrain.layers import fp8  # noqa: E402
from jaxtrain.metrics.flops import mpt_active_params, mpt_flops_per_batch  # noqa: E402
from jaxtrain.models.mpt_config import mpt_param_count  # noqa: E402
from jaxtrain.parallel.mesh import axis_rules, batch_sharding, build_mesh  # noqa: E402
from jaxtrain.train.optim import build_optimizer  # noqa: E402
from jaxtrain.train.state import create_train_state  # noqa: E402
from jaxtrain.train.step import (  # noqa: E402
    COMPUTE_DTYPES, FP8_PRECISIONS, compile_train_step, compiler_options, make_train_step)

# the shapes the PyTorch reference is measured at (bench/torch_mpt_throughput.py has the same table)
SHAPES = {
    "xs": dict(d_model=256, n_heads=4, n_layers=4, seq=256, vocab=8192, batch=8),
    "s": dict(d_model=512, n_heads=8, n_layers=8, seq=512, vocab=50432, batch=8),
}
PRECISIONS = {"bf16": "amp_bf16", "fp8": "amp_fp8", "fp32": "fp32"}


def matmul_peak(dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a square ``size`` matmul in ``dtype`` (float32 accumulation)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((size, size)), dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def build_config(args):
    overrides = [f"precision={PRECISIONS[args.precision]}"]
    if getattr(args, "scan_layers", None) is not None:
        overrides.append(f"model.scan_layers={args.scan_layers}")
    if args.config is None:
        shape = SHAPES[args.shape]
        overrides += [
            f"model.d_model={shape['d_model']}", f"model.n_heads={shape['n_heads']}",
            f"model.n_layers={shape['n_layers']}", f"model.vocab_size={shape['vocab']}",
            "model.no_bias=true", "model.attn_config.alibi=true", "model.remat=none",
        ]  # fmt: skip
        if getattr(args, "scan_layers", None) is None:
            overrides.append("model.scan_layers=true")
        seq, batch = shape["seq"], shape["batch"]
    else:
        seq, batch = None, None
    seq = args.seq or seq
    batch = args.batch or batch
    if seq:
        overrides += [f"max_seq_len={seq}", f"model.max_seq_len={seq}"]
    if batch:
        overrides += [f"global_train_batch_size={batch}", f"device_train_microbatch_size={args.micro or batch}"]
    if args.remat:
        overrides.append(f"model.remat={args.remat}")
    return load_config(args.config, overrides + list(getattr(args, "set", None) or []), notices=[])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="xs")
    parser.add_argument("--config", help="a preset YAML instead of --shape (e.g. configs/mpt/125m.yaml)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the first")
    parser.add_argument("--seq", type=int)
    parser.add_argument("--batch", type=int, help="global batch")
    parser.add_argument("--micro", type=int, help="microbatch (default: the whole batch)")
    parser.add_argument("--remat", choices=("none", "full", "dots_saveable"))
    parser.add_argument("--scan-layers", choices=("true", "false"),
                        help="stack and scan the layers (the shapes' default: true) or unroll them")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other config override (e.g. model.scan_unroll=1), applied last")
    parser.add_argument("--peak", type=float, help="peak FLOP/s for MFU instead of the measured one")
    parser.add_argument("--no-microbench", action="store_true", help="skip the matmul peak measurement")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, trace the train step and print its N costliest HLO ops (any backend)")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)

    cfg = build_config(args)
    model = cfg.model
    t_start = time.perf_counter()
    mesh = build_mesh(cfg.parallelism, jax.devices())
    rules = axis_rules(cfg.parallelism)
    tx = build_optimizer(cfg.optimizer, lambda step: cfg.optimizer.lr, clipping=cfg.algorithms.gradient_clipping)
    state, model_def, shardings = create_train_state(model, tx, seed=0, mesh=mesh, rules=rules)
    micro = int(cfg.device_train_microbatch_size or cfg.global_train_batch_size)
    step_fn = make_train_step(
        model_def, tx, lambda step: cfg.optimizer.lr, compute_dtype=COMPUTE_DTYPES[cfg.precision],
        num_microbatches=max(1, cfg.global_train_batch_size // micro), fp8_products=cfg.precision in FP8_PRECISIONS,
    )  # fmt: skip
    train_step = compile_train_step(step_fn, shardings, batch_sharding(mesh),
                                    options=compiler_options(cfg.precision, jax.default_backend()))
    t_init = time.perf_counter()

    batch, seq = cfg.global_train_batch_size, cfg.max_seq_len
    rng = np.random.default_rng(0)
    batches = [
        jax.device_put({"input_ids": rng.integers(0, model.vocab_size, (batch, seq), dtype=np.int32)}, batch_sharding(mesh))
        for _ in range(2)
    ]
    compiled = train_step.lower(state, batches[0]).compile()
    t_compiled = time.perf_counter()
    hlo = compiled.as_text()
    train_step = compiled
    state, metrics = train_step(state, batches[0])
    jax.block_until_ready(metrics)
    t_first = time.perf_counter()

    step_times = []
    for i in range(args.steps):
        start = time.perf_counter()
        state, metrics = train_step(state, batches[i % 2])
        jax.block_until_ready(metrics)
        step_times.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    if args.profile:
        from layer_profile import hlo_op_table  # noqa: PLC0415 (bench helper; imports this module)

        # the step just timed, state threaded through the calls (it donates its input state): no
        # second compile, which for a large unrolled model on a GPU takes as long as the timing
        carried = [state]

        def next_step():
            carried[0], step_metrics = train_step(carried[0], batches[0])
            return step_metrics

        hlo_op_table(next_step, (), top=args.profile, hlo_text=hlo)
        state = carried[0]

    n_params = mpt_param_count(model)
    flops = mpt_flops_per_batch(mpt_active_params(model), model.n_layers, model.d_model, seq, batch)
    median = statistics.median(step_times)
    tokens_per_s = batch * seq / median
    result = {
        "framework": "jaxtrain",
        "shape": args.config or args.shape,
        "precision": args.precision,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "params": n_params,
        "batch": batch,
        "seq": seq,
        "tokens_per_s": tokens_per_s,
        "model_gflops": flops / median / 1e9,
        "step_s_median": median,
        "step_s_min": min(step_times),
        "step_s_max": max(step_times),
        "init_s": t_init - t_start,
        "compile_s": t_compiled - t_init,
        "first_step_s": t_first - t_init,
        "cudnn_attention_calls": hlo.count("__cudnn$fmha"),
        "fp8_gemm_calls": fp8.gemm_calls(hlo),
        "time_to_first_step_s": t_first - T_PROCESS,
        "loss": loss,
    }
    if args.peak:
        result["peak_gflops"] = args.peak / 1e9
    elif not args.no_microbench:
        result["peak_fp32_gflops"] = matmul_peak(jnp.float32) / 1e9
        result["peak_bf16_gflops"] = matmul_peak(jnp.bfloat16) / 1e9
        # an fp8 run measured against the bf16 matmul peak: what its fp8 layer products add over bf16
        result["peak_gflops"] = result["peak_fp32_gflops" if args.precision == "fp32" else "peak_bf16_gflops"]
    if "peak_gflops" in result:
        result["mfu"] = result["model_gflops"] / result["peak_gflops"]
    print(
        f"jaxtrain {result['shape']} {args.precision} on {result['backend']} ({result['device']}): "
        f"{tokens_per_s:,.0f} tok/s, {result['model_gflops']:,.1f} model GFLOP/s"
        + (f", MFU {result['mfu']:.1%} of {result['peak_gflops']:,.0f} GFLOP/s" if "mfu" in result else "")
    )
    print(
        f"  step median {median * 1e3:.1f} ms (min {min(step_times) * 1e3:.1f}, max {max(step_times) * 1e3:.1f}, "
        f"{len(step_times)} steps); init {result['init_s']:.1f} s, compile {result['compile_s']:.1f} s, first step "
        f"incl. compile {result['first_step_s']:.1f} s, cuDNN attention calls {result['cudnn_attention_calls']}"
        + (f", fp8 GEMM calls {result['fp8_gemm_calls']}" if args.precision == "fp8" else "") + "; "
        f"process start to first step {result['time_to_first_step_s']:.1f} s; loss {loss:.3f}"
    )
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)

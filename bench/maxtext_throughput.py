"""MaxText's training throughput at the shapes of ``bench/train_throughput.py``: MaxText's own
train entry point (``maxtext.trainers.pre_train.train`` with its ``base.yml`` and command-line
overrides) on synthetic tokens, AdamW, no checkpointing, eval or profiler.

    /work/maxtext-venv/bin/python bench/maxtext_throughput.py --shape xs --precision bf16 --steps 6
    /work/maxtext-venv/bin/python bench/maxtext_throughput.py --shape s --precision bf16 --steps 6
    /work/maxtext-venv/bin/python bench/maxtext_throughput.py --shape xs --decoder gpt3   # MPT-like block

MaxText lives in its own environment, outside the repository (CPU JAX only: no torch, no CUDA).
Its wheel lists every dependency under hardware extras (``tpu``, ``cuda12``: libtpu, CUDA,
transformer-engine, ...), so it is installed without them and the train path's imports are
added by hand (jax pinned to the version in jaxtrain's ``.venv``, so both run the same XLA):

    PYENV_VERSION=3.12.1 python3.12 -m venv /work/maxtext-venv
    /work/maxtext-venv/bin/pip install --upgrade pip
    /work/maxtext-venv/bin/pip install jax==0.12.0.1 jaxlib==0.12.0.1 "flax>=0.12.9" "optax>=0.2.8" \\
        "orbax-checkpoint>=0.12.4" pathwaysutils omegaconf jinja2 aqtp qwix tokamax huggingface_hub \\
        transformers grain drjax pillow tiktoken sentencepiece sympy ml-collections
    /work/maxtext-venv/bin/pip install --no-deps maxtext==0.2.5

The script runs MaxText in a subprocess and reads its ``completed step: N, seconds: X, ...``
lines; ``seconds`` is the wall time between two dispatches of the train step. Under XLA:CPU's
default asynchronous dispatch MaxText reads step N's metrics only after dispatching step N+1, so
its figures run two steps behind the device: the first two are dispatch time only and the third
covers the first step's execution. Those three are dropped (the first step is dropped by
``bench/train_throughput.py`` too), so MaxText runs ``--steps`` + 3 steps; with
``--retained-malloc`` (synchronous dispatch) each figure is its own step's and only the first is
dropped. Prints one ``RESULT {json}`` line last, for drivers.

Settings other than MaxText's defaults: ``hardware=cpu`` with ``skip_jax_distributed_system``
(MaxText's CPU mode otherwise expects a multi-process launcher's environment variables),
``packing=false`` (one sequence per row, as jaxtrain's synthetic batches), dropout off, no
persistent compilation cache, and ``XLA_FLAGS`` set for the subprocess when empty (MaxText
otherwise sets it to dump every train-step HLO to ``/tmp/xla_dump``). Remat: with scanned layers
MaxText always wraps the layer in ``jax.checkpoint``, where ``remat_policy=none`` means "save
nothing" (full remat); the default here is ``minimal_with_context`` (MaxText's least-remat
policy: projections, MLP and attention outputs saved), and ``--remat none`` unrolls the layers
(``scan_layers=false``), the only way to run MaxText without rematerialisation.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

T_PROCESS = time.perf_counter()

# the shapes of bench/train_throughput.py (MLP 4x d_model, head_dim 64)
SHAPES = {
    "xs": dict(d_model=256, n_heads=4, n_layers=4, seq=256, vocab=8192, batch=8),
    "s": dict(d_model=512, n_heads=8, n_layers=8, seq=512, vocab=50432, batch=8),
}
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
REMAT = ("minimal_with_context", "minimal", "full", "none")
RETAINED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
TRAIN_MODULE = "maxtext.trainers.pre_train.train"
# --retained-malloc: MaxText's entry point after switching XLA:CPU to synchronous dispatch (a JAX
# flag that no environment variable sets)
SYNC_DISPATCH_BOOTSTRAP = (
    "import runpy, jax; jax.config.update('jax_cpu_enable_async_dispatch', False); "
    f"runpy.run_module('{TRAIN_MODULE}', run_name='__main__', alter_sys=True)"
)
BUILD_HINT = (
    "build its environment as the docstring of bench/maxtext_throughput.py says "
    "(PYENV_VERSION=3.12.1 python3.12 -m venv /work/maxtext-venv; pip install ...; "
    "pip install --no-deps maxtext==0.2.5) and run the script with /work/maxtext-venv/bin/python"
)
STEP_LINE = re.compile(r"completed step: (\d+), seconds: ([0-9.]+)")
LOSS = re.compile(r"[ ,]loss: ([-+0-9.eE]+|nan|inf)")


def find_maxtext() -> tuple[str, str] | None:
    """(version, path of base.yml) of the installed MaxText, found without importing it."""
    spec = importlib.util.find_spec("maxtext")
    if spec is None or not spec.submodule_search_locations:
        return None
    base = os.path.join(list(spec.submodule_search_locations)[0], "configs", "base.yml")
    if importlib.util.find_spec(TRAIN_MODULE) is None or not os.path.exists(base):
        return None
    return importlib.metadata.version("maxtext"), base


def overrides(args, total_steps: int, output_dir: str) -> list[str]:
    shape = SHAPES[args.shape]
    items = {
        "run_name": f"bench_{args.shape}_{args.precision}",
        "base_output_directory": output_dir,
        "hardware": "cpu",
        "skip_jax_distributed_system": "true",
        "jax_cache_dir": "",  # no persistent compilation cache: every run compiles, as jaxtrain's does
        "dataset_type": "synthetic",
        "packing": "false",
        "steps": str(total_steps),
        "per_device_batch_size": str(shape["batch"]),  # one CPU device
        "max_target_length": str(shape["seq"]),
        "vocab_size": str(shape["vocab"]),
        "base_emb_dim": str(shape["d_model"]),
        "base_num_query_heads": str(shape["n_heads"]),
        "base_num_kv_heads": str(shape["n_heads"]),
        "head_dim": str(shape["d_model"] // shape["n_heads"]),
        "base_mlp_dim": str(4 * shape["d_model"]),
        "base_num_decoder_layers": str(shape["n_layers"]),
        "decoder_block": args.decoder,
        "dtype": DTYPES[args.precision],
        "weight_dtype": "float32",
        "attention": "dot_product",
        "opt_type": "adamw",
        "enable_dropout": "false",
        "remat_policy": args.remat,
        "scan_layers": "false" if args.remat == "none" else "true",
        "enable_checkpointing": "false",
        "eval_interval": "-1",  # the profiler is off by default
        "enable_tensorboard": "false",
        "enable_goodput_recording": "false",
        "monitor_goodput": "false",
        "log_config": "false",
    }
    if args.decoder == "gpt3":
        # MaxText's GPT-3 block as the nearest to MPT: LayerNorm, GELU MLP, fused QKV, tied output
        # head; learned positions instead of MPT's ALiBi (which MaxText does not have)
        items.update({
            "mlp_activations": "[gelu]", "fused_qkv": "true", "logits_via_embedding": "true",
            "trainable_position_size": str(shape["seq"]),
        })  # fmt: skip
    return [f"{key}={value}" for key, value in items.items()] + list(args.override)


def run_maxtext(command: list[str], env: dict, cwd: str, log_path: str | None):
    """Runs MaxText quietly; returns (exit code, [(arrival time, seconds, loss)] per step line, all lines)."""
    steps, lines = [], []
    log = open(log_path, "w") if log_path else None
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    try:
        for line in proc.stdout:
            arrived = time.perf_counter()
            lines.append(line)
            if log:
                log.write(line)
            match = STEP_LINE.search(line)
            if match:
                loss = LOSS.search(line)
                steps.append((arrived, float(match[2]), float(loss[1]) if loss else float("nan")))
        return proc.wait(), steps, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if log:
            log.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="xs")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the first")
    parser.add_argument("--decoder", default="llama2",
                        help="MaxText decoder_block (default llama2, MaxText's default; gpt3 is the nearest to MPT)")
    parser.add_argument("--remat", choices=REMAT, default="minimal_with_context",
                        help="MaxText remat_policy; 'none' also unrolls the layers (scan_layers=false)")
    parser.add_argument("--retained-malloc", action="store_true",
                        help="glibc keeps freed memory and XLA:CPU dispatches synchronously, as jaxtrain sets on CPU")
    parser.add_argument("--log", help="write MaxText's whole output to this file")
    parser.add_argument("override", nargs="*", help="further MaxText config overrides, key=value")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    found = find_maxtext()
    if found is None:
        print(f"error: MaxText is not importable from {sys.executable}; {BUILD_HINT}", file=sys.stderr)
        return 2
    version, base_config = found

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not env.get("XLA_FLAGS", "").strip():
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"  # a no-op that keeps MaxText's HLO dump off
    env.setdefault("JAX_PLATFORMS", "cpu")
    if args.retained_malloc:
        env.update(RETAINED_MALLOC)
        entry, dropped = ["-c", SYNC_DISPATCH_BOOTSTRAP], 1
    else:
        entry, dropped = ["-m", TRAIN_MODULE], 3
    total_steps = args.steps + dropped

    with tempfile.TemporaryDirectory(prefix="maxtext_bench_") as workdir:
        command = [sys.executable, *entry, base_config, *overrides(args, total_steps, os.path.join(workdir, "out"))]
        code, steps, lines = run_maxtext(command, env, workdir, args.log)
    if code != 0 or len(steps) < total_steps:
        sys.stderr.write("".join(lines[-60:]))
        print(f"error: MaxText exited with {code} after {len(steps)} of {total_steps} steps", file=sys.stderr)
        if any(line.startswith("ModuleNotFoundError") for line in lines[-60:]):
            print(f"error: a module MaxText imports is missing; {BUILD_HINT}", file=sys.stderr)
        return 1

    shape = SHAPES[args.shape]
    batch, seq = shape["batch"], shape["seq"]
    step_times = [seconds for _, seconds, _ in steps[dropped:]]
    median = statistics.median(step_times)
    # step 0's line is written once step 0's loss is on the host: right after step 0 under async
    # dispatch, after step 1 (whose time is steps[1]'s figure) under synchronous dispatch
    first_step_end = steps[0][0] - (steps[1][1] if args.retained_malloc else 0.0)
    result = {
        "framework": "maxtext",
        "shape": args.shape,
        "precision": args.precision,
        "version": version,
        "jax": importlib.metadata.version("jax"),
        "decoder": args.decoder,
        "remat": args.remat,
        "retained_malloc": args.retained_malloc,
        "batch": batch,
        "seq": seq,
        "tokens_per_s": batch * seq / median,
        "step_s_median": median,
        "step_s_min": min(step_times),
        "step_s_max": max(step_times),
        "time_to_first_step_s": first_step_end - T_PROCESS,
        "loss": steps[-1][2],
    }
    print(
        f"MaxText {version} (jax {result['jax']}) {args.shape} {args.precision}, decoder {args.decoder}, "
        f"remat {args.remat}{', retained malloc' if args.retained_malloc else ''}: {result['tokens_per_s']:,.0f} tok/s"
    )
    print(
        f"  step median {median:.3f} s (min {result['step_s_min']:.3f}, max {result['step_s_max']:.3f}, "
        f"{len(step_times)} steps); process start to end of first step {result['time_to_first_step_s']:.1f} s; "
        f"loss {result['loss']:.3f}"
    )
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

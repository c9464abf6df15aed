"""What quantized frozen weights (``model.quantize_frozen: int8 | nf4``) save and cost in a LoRA run.

    python bench/quantized_lora.py                    # the quickstart widened to about 110M parameters
    python bench/quantized_lora.py --set model.n_layers=4

For the quickstart model (with the --set overrides), rank-8 adapters on every linear layer,
amp_bf16, batch 4 x 128, with the frozen weights in bf16, int8 and nf4: the bytes of the
parameters on the device, XLA's compiled memory for the train step (arguments and temporaries),
and the median step time over alternating rounds. Then ``jaxtrain plan``'s parameter bytes for
the 7b and 70b presets with the same adapters, both ways.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

WIDE = ["model.d_model=1024", "model.n_heads=16", "model.n_layers=8"]
LORA = ["model.peft_config={r: 8, lora_alpha: 16, target_modules: all-linear}", "precision=amp_bf16",
        "max_seq_len=128", "global_train_batch_size=4", "device_train_microbatch_size=4"]


def build(cfg):
    import jax
    import jax.numpy as jnp

    from jaxtrain.parallel.mesh import axis_rules, batch_sharding, build_mesh
    from jaxtrain.train.optim import build_optimizer
    from jaxtrain.train.state import create_train_state
    from jaxtrain.train.step import COMPUTE_DTYPES, compile_train_step, make_train_step

    mesh = build_mesh(cfg.parallelism)
    tx = build_optimizer(cfg.optimizer, lambda step: cfg.optimizer.lr, clipping=cfg.algorithms.gradient_clipping)
    dtype = COMPUTE_DTYPES[cfg.precision]
    state, model_def, shardings = create_train_state(cfg.model, tx, seed=0, mesh=mesh,
                                                     rules=axis_rules(cfg.parallelism), frozen_dtype=dtype)
    step = make_train_step(model_def, tx, lambda step: cfg.optimizer.lr, compute_dtype=dtype)
    tokens = jax.random.randint(jax.random.key(1), (cfg.global_train_batch_size, cfg.max_seq_len), 0,
                                cfg.model.vocab_size)
    batch = {"input_ids": jax.device_put(tokens.astype(jnp.int32), batch_sharding(mesh))}
    compiled = compile_train_step(step, shardings, batch_sharding(mesh)).lower(state, batch).compile()
    return state, batch, compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=None, help="config override")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    import jax

    from jaxtrain.config import load_config
    from jaxtrain.plan.memory import estimate_memory

    sets = LORA + (WIDE if args.set is None else args.set)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    built, times = {}, {"bf16": [], "int8": [], "nf4": []}
    for name, quantize in (("bf16", "null"), ("int8", "int8"), ("nf4", "nf4")):
        cfg = load_config(os.path.join(root, "configs/quickstart.yaml"), sets + [f"model.quantize_frozen={quantize}"])
        state, batch, compiled = build(cfg)
        memory = compiled.memory_analysis()
        params = sum(x.nbytes for x in jax.tree.leaves(state.params))
        print(f"{name} frozen weights: parameters {params / 1e6:.1f} MB; compiled step arguments "
              f"{memory.argument_size_in_bytes / 1e6:.1f} MB, temporaries {memory.temp_size_in_bytes / 1e6:.1f} MB",
              flush=True)
        built[name] = [state, batch, compiled]
    for _ in range(args.rounds):  # alternating, so that both see the same machine
        for name, entry in built.items():
            state, batch, compiled = entry
            state, metrics = compiled(state, batch)  # warm-up
            jax.block_until_ready(metrics)
            started = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times[name].append((time.perf_counter() - started) / args.steps)
            entry[0] = state
    tokens = cfg.global_train_batch_size * cfg.max_seq_len
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name}: median step {median * 1e3:.0f} ms ({tokens / median:,.0f} tokens/s) over {args.rounds} rounds")
    for preset in ("7b", "70b"):
        for quantize in ("null", "int8", "nf4"):
            cfg = load_config(os.path.join(root, f"configs/mpt/{preset}.yaml"),
                              [LORA[0], f"model.quantize_frozen={quantize}"])
            estimate = estimate_memory(cfg.model, global_batch=1, microbatch=1, seq_len=2048,
                                       mesh_shape={"data": 1}, precision="amp_bf16")
            print(f"{preset} with rank-8 adapters, frozen weights {'bf16' if quantize == 'null' else quantize}: "
                  f"parameters {estimate.params_bytes / 2**30:.1f} GiB", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""Ahead-of-time compile of a preset's train step on a simulated multi-device CPU mesh, from
abstract shapes only (no parameter is allocated), and print how long it takes.

    python bench/compile_preset.py --config configs/mpt/7b.yaml --devices 8 --fsdp 8
    python bench/compile_preset.py --set model.peft_config.r=16 --set model.peft_config.target_modules=all-linear
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mpt/7b.yaml")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--fsdp", type=int, default=8)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp

    from jaxtrain.config import load_config
    from jaxtrain.parallel.mesh import axis_rules, batch_sharding, build_mesh
    from jaxtrain.train.optim import build_optimizer
    from jaxtrain.train.schedules import build_schedule
    from jaxtrain.train.state import abstract_train_state
    from jaxtrain.train.step import COMPUTE_DTYPES, compile_train_step, make_train_step

    cfg = load_config(args.config, ["parallelism.data=-1", f"parallelism.fsdp={args.fsdp}",
                                    f"parallelism.tensor={args.tensor}", *args.set])
    mesh = build_mesh(cfg.parallelism)
    rules = axis_rules(cfg.parallelism)
    started = time.perf_counter()
    schedule = build_schedule(cfg.scheduler, base_lr=cfg.optimizer.lr, total_batches=1000,
                              to_batches=lambda value: 1000 if value.endswith("dur") else 100)
    tx = build_optimizer(cfg.optimizer, schedule, clipping=cfg.algorithms.gradient_clipping)
    state, model_def, shardings = abstract_train_state(cfg.model, tx, mesh=mesh, rules=rules,
                                                       spike_window=cfg.health.spike_window,
                                                       frozen_dtype=COMPUTE_DTYPES[cfg.precision])
    per_device = cfg.global_train_batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
    micro = cfg.device_train_microbatch_size if isinstance(cfg.device_train_microbatch_size, int) else per_device
    step = make_train_step(model_def, tx, schedule, compute_dtype=COMPUTE_DTYPES[cfg.precision],
                           num_microbatches=max(1, per_device // micro))
    batch = {"input_ids": jax.ShapeDtypeStruct((cfg.global_train_batch_size, cfg.max_seq_len), jnp.int32,
                                                sharding=batch_sharding(mesh))}
    traced = time.perf_counter()
    lowered = compile_train_step(step, shardings, batch_sharding(mesh)).lower(state, batch)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"{args.config}: {params / 1e9:.2f}B parameters, mesh {dict(mesh.shape)}, batch "
          f"{cfg.global_train_batch_size} x {cfg.max_seq_len}, {cfg.model.n_layers} layers "
          f"(scan_layers={cfg.model.scan_layers}): abstract state {traced - started:.1f} s, lower "
          f"{lowered_at - traced:.1f} s, compile {done - lowered_at:.1f} s, total {done - started:.1f} s")


if __name__ == "__main__":
    sys.exit(main())

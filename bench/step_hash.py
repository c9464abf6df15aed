"""Hash the StableHLO of the quickstart model's train step, to show that a change leaves the
default step's program as it was (or not): float32 and bf16, traced for this machine and for a
GPU (without one, cuDNN's attention is said to be unavailable and XLA's is traced). Run it
before and after a change and compare.

    python bench/step_hash.py [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import hashlib
import sys


def step_text(cfg, precision: str, platform: str | None) -> str:
    import contextlib

    import jax
    import jax.numpy as jnp

    from jaxtrain.parallel.mesh import axis_rules, batch_sharding, build_mesh
    from jaxtrain.parallel.platform import compiling_for
    from jaxtrain.train.optim import build_optimizer
    from jaxtrain.train.state import abstract_train_state
    from jaxtrain.train.step import COMPUTE_DTYPES, compile_train_step, make_train_step

    mesh = build_mesh(cfg.parallelism)
    tx = build_optimizer(cfg.optimizer, lambda step: cfg.optimizer.lr, clipping=cfg.algorithms.gradient_clipping)
    dtype = COMPUTE_DTYPES[precision]
    with compiling_for(platform) if platform else contextlib.nullcontext():
        state, model_def, shardings = abstract_train_state(cfg.model, tx, mesh=mesh, rules=axis_rules(cfg.parallelism),
                                                           frozen_dtype=dtype)
        step = make_train_step(model_def, tx, lambda step: cfg.optimizer.lr, compute_dtype=dtype, num_microbatches=2)
        batch = {"input_ids": jax.ShapeDtypeStruct((16, 256), jnp.int32, sharding=batch_sharding(mesh))}
        return compile_train_step(step, shardings, batch_sharding(mesh)).lower(state, batch).as_text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()
    from jaxtrain.config import load_config

    cfg = load_config(args.config, ["max_seq_len=256", *args.set])
    for name, precision, platform in (("cpu fp32", "fp32", None), ("cpu amp_bf16", "amp_bf16", None),
                                      ("gpu fp32", "fp32", "gpu"), ("gpu amp_bf16", "amp_bf16", "gpu")):
        digest = hashlib.sha256(step_text(cfg, precision, platform).encode()).hexdigest()[:16]
        print(f"{name}: {digest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

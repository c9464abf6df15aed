"""A/B of the output head + loss: fused sequence chunks against full float32 logits.

    python bench/fused_loss_ab.py --shape s --rounds 6
    python bench/fused_loss_ab.py --shape s --rounds 6 --eval

Builds the same model and optimizer as ``train_throughput.py`` twice, once with the fused
``lm_loss`` path and once with full logits, and alternates their train steps in one process so
machine load affects both alike. Prints each path's median step time, tokens/s and the ratio.
``--eval`` times the held-out evaluation's step instead (the loss alone, no backward pass; on
the CPU evaluations take the fused path).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import PRECISIONS, SHAPES, build_config  # noqa: E402

from jaxtrain.models.mpt import MPTForCausalLM  # noqa: E402
from jaxtrain.parallel.mesh import axis_rules, batch_sharding, build_mesh  # noqa: E402
from jaxtrain.train.optim import build_optimizer  # noqa: E402
from jaxtrain.train.state import create_train_state  # noqa: E402
from jaxtrain.train.step import COMPUTE_DTYPES, compile_train_step, make_eval_step, make_train_step  # noqa: E402


def compiled_step(cfg, fused: bool, batch, evaluate: bool = False):
    """(state, compiled step) with the head forced fused or not while tracing; with ``evaluate``,
    the eval step, called as ``step(state, batch) -> (state, metrics)`` like a train step."""
    original = MPTForCausalLM.lm_loss

    def lm_loss(self, *args, **kwargs):
        return original(self, *args, **{**kwargs, "fused": fused})

    mesh = build_mesh(cfg.parallelism, jax.devices())
    tx = build_optimizer(cfg.optimizer, lambda step: cfg.optimizer.lr, clipping=cfg.algorithms.gradient_clipping)
    state, model_def, shardings = create_train_state(cfg.model, tx, seed=0, mesh=mesh, rules=axis_rules(cfg.parallelism))
    step_fn = make_train_step(model_def, tx, lambda step: cfg.optimizer.lr, compute_dtype=COMPUTE_DTYPES[cfg.precision])
    MPTForCausalLM.lm_loss = lm_loss
    try:
        if evaluate:
            eval_fn = jax.jit(make_eval_step(model_def, compute_dtype=COMPUTE_DTYPES[cfg.precision]))
            compiled = eval_fn.lower(state.params, batch).compile()
            return state, lambda state, batch: (state, compiled(state.params, batch))
        step = compile_train_step(step_fn, shardings, batch_sharding(mesh)).lower(state, batch).compile()
    finally:
        MPTForCausalLM.lm_loss = original
    return state, step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="s")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    parser.add_argument("--rounds", type=int, default=6, help="alternating steps per path after warm-up")
    parser.add_argument("--eval", action="store_true", help="time the evaluation step (loss only) instead")
    args = parser.parse_args(argv)
    cfg = build_config(argparse.Namespace(config=None, shape=args.shape, precision=args.precision, seq=None,
                                          batch=None, micro=None, remat=None))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (cfg.global_train_batch_size, cfg.max_seq_len), dtype=np.int32)
    batch = {"input_ids": jax.numpy.asarray(tokens)}
    paths = {name: list(compiled_step(cfg, fused, batch, evaluate=args.eval))
             for name, fused in (("fused", True), ("full", False))}
    times: dict[str, list[float]] = {name: [] for name in paths}
    losses = {}
    for round_index in range(args.rounds + 1):
        for name, (state, step) in paths.items():
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            if round_index:
                times[name].append(time.perf_counter() - start)
            paths[name][0] = state
            losses[name] = float(metrics["loss_sum"] / metrics["tokens"] if args.eval else metrics["loss"])
    tokens_per_step = cfg.global_train_batch_size * cfg.max_seq_len
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:5s} head: {'eval' if args.eval else 'train'} step median {median * 1e3:8.1f} ms (min {min(values) * 1e3:.1f}, max "
              f"{max(values) * 1e3:.1f}), {tokens_per_step / median:,.0f} tok/s, last loss {losses[name]:.4f}")
    ratio = statistics.median(times["full"]) / statistics.median(times["fused"])
    print(f"fused / full speed: {ratio:.2f}x  (shape {args.shape}, {args.precision}{', eval' if args.eval else ''}, "
          f"load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()

"""Where a train step's time goes: the whole step against its parts, timed in one process.

    python bench/step_breakdown.py --shape s --precision bf16

Parts, each jitted on its own at the same shapes: the forward pass (loss only), forward +
backward (gradients), the output head + loss alone (forward + backward from the final hidden
state), the attention of one layer, and the optimizer update. Rounds alternate over the parts
so machine load affects them alike; medians are printed with the share of the whole step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import PRECISIONS, SHAPES, build_config  # noqa: E402

from jaxtrain.layers import cpu_kernels, lm_loss  # noqa: E402
from jaxtrain.parallel.mesh import axis_rules, batch_sharding, build_mesh  # noqa: E402
from jaxtrain.train.loss import shift_labels  # noqa: E402
from jaxtrain.train.optim import build_optimizer  # noqa: E402
from jaxtrain.train.state import create_train_state  # noqa: E402
from jaxtrain.train.step import COMPUTE_DTYPES, compile_train_step, make_train_step  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="s")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    cfg = build_config(argparse.Namespace(config=None, shape=args.shape, precision=args.precision, seq=None,
                                          batch=None, micro=None, remat=None))
    dtype = COMPUTE_DTYPES[cfg.precision]
    mesh = build_mesh(cfg.parallelism, jax.devices())
    lr = lambda step: cfg.optimizer.lr  # noqa: E731
    tx = build_optimizer(cfg.optimizer, lr, clipping=cfg.algorithms.gradient_clipping)
    state, model_def, shardings = create_train_state(cfg.model, tx, seed=0, mesh=mesh, rules=axis_rules(cfg.parallelism))
    batch_size, seq, d_model = cfg.global_train_batch_size, cfg.max_seq_len, cfg.model.d_model
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (batch_size, seq), dtype=np.int32)
    batch = {"input_ids": jnp.asarray(tokens)}
    targets = shift_labels(batch["input_ids"])
    params = state.params

    def loss(params):
        loss_sum, _, count = model_def.apply(params, batch["input_ids"], targets, method="lm_loss", compute_dtype=dtype)
        return loss_sum / count

    model = model_def.merge(params)
    hidden = jax.random.normal(jax.random.key(1), (batch_size, seq, d_model), jnp.float32)
    table = model.wte.embedding[...]

    def head_loss(hidden, table):  # as the model's lm_loss picks it (tied head)
        if cpu_kernels.use_cpu_kernels(dtype):
            return lm_loss.head_cross_entropy(hidden, table, targets, tied=True, compute_dtype=dtype)[0]
        logits = jnp.einsum("bld,vd->blv", hidden.astype(dtype), table.astype(dtype), preferred_element_type=jnp.float32)
        return lm_loss.cross_entropy_sum(logits, targets)[0]

    blocks_graph, blocks_state = nnx.split(model.blocks)
    one_block_state = jax.tree.map(lambda leaf: leaf[0], blocks_state) if cfg.model.scan_layers else blocks_state
    slopes = None if model.slopes is None else jnp.asarray(model.slopes, jnp.float32)

    def one_layer(layer_state, hidden):
        block = nnx.merge(blocks_graph, layer_state) if not cfg.model.scan_layers else None
        if block is None:
            stacked = nnx.merge(blocks_graph, jax.tree.map(lambda leaf: leaf[None], layer_state))
            graph, single = nnx.split(stacked)
            block_fn = lambda x: jax.lax.scan(  # noqa: E731
                lambda h, s: (nnx.merge(graph, s)(h, slopes=slopes, compute_dtype=dtype), None), x, single)[0]
            return block_fn(hidden).sum()
        return block(hidden, slopes=slopes, compute_dtype=dtype).sum()

    grads = jax.grad(loss)(params)

    def optimizer_update(grads, opt_state, params):  # as the train step applies it (an applied step)
        updates, opt_state = tx.update(grads, opt_state, params, apply=jnp.bool_(True))
        return optax.apply_updates(params, updates), opt_state

    train_step = compile_train_step(make_train_step(model_def, tx, lr, compute_dtype=dtype), shardings,
                                    batch_sharding(mesh), donate=False)
    parts = {
        "train step": lambda: train_step(state, batch),
        "forward (loss)": jax.jit(loss).__call__,
        "forward + backward": jax.jit(jax.grad(loss)).__call__,
        "head + loss fwd+bwd": lambda f=jax.jit(jax.grad(head_loss, argnums=(0, 1))): f(hidden, table),
        "one layer fwd+bwd": lambda f=jax.jit(jax.grad(one_layer, argnums=(0, 1))): f(one_block_state, hidden),
        "optimizer update": lambda f=jax.jit(optimizer_update): f(grads, state.opt_state, params),
    }
    args_for = {"forward (loss)": (params,), "forward + backward": (params,)}
    calls = {name: (lambda fn=fn, a=args_for.get(name, ()): fn(*a)) for name, fn in parts.items()}
    for call in calls.values():
        jax.block_until_ready(call())
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    whole = statistics.median(times["train step"])
    print(f"shape {args.shape} {args.precision}, {cfg.model.n_layers} layers, load {os.getloadavg()[0]:.1f}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:22s} {median * 1e3:9.1f} ms  {median / whole:6.1%} of the step")
    layers = statistics.median(times["one layer fwd+bwd"]) * cfg.model.n_layers
    print(f"  {'all layers (x n)':22s} {layers * 1e3:9.1f} ms  {layers / whole:6.1%} of the step")


if __name__ == "__main__":
    main()

"""The train and eval steps: pure functions of (state, batch), compiled once with explicit shardings."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxtrain.train.loss import IGNORE_INDEX, batch_targets, cross_entropy_sum
from jaxtrain.train.state import ModelDef, TrainState

COMPUTE_DTYPES = {"fp32": jnp.float32, "amp_bf16": jnp.bfloat16}


def _split_microbatches(x: jax.Array, num_microbatches: int) -> jax.Array:
    """[batch, ...] -> [microbatches, batch // microbatches, ...].

    Microbatch i takes rows i, i+m, i+2m, ...: with the batch split over devices in contiguous
    blocks, every microbatch keeps the same per-device split, so accumulation moves no data.
    """
    batch = x.shape[0]
    x = x.reshape(batch // num_microbatches, num_microbatches, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)


def make_train_step(
    model_def: ModelDef,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    *,
    compute_dtype: Any = jnp.float32,
    num_microbatches: int = 1,
    z_loss: float = 0.0,
    use_dropout: bool = False,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Build ``train_step(state, batch) -> (state, metrics)``.

    The loss is the token-mean cross-entropy over the whole global batch: each microbatch's
    summed loss is divided by the batch's total target count, so accumulating over microbatches
    gives the same gradient as one pass over the full batch.
    """

    def microbatch_loss(params, inputs, targets, sequence_id, dropout_rng, total_tokens):
        logits = model_def.apply(
            params,
            inputs,
            compute_dtype=compute_dtype,
            sequence_id=sequence_id,
            dropout_rng=dropout_rng if use_dropout else None,
        )
        loss_sum, z_sum, _ = cross_entropy_sum(logits, targets, z_loss)
        return (loss_sum + z_sum) / total_tokens, loss_sum

    grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        inputs = batch["input_ids"]
        targets = batch_targets(batch)
        sequence_id = batch.get("sequence_id")
        total_tokens = jnp.maximum((targets != IGNORE_INDEX).sum().astype(jnp.float32), 1.0)
        step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        if num_microbatches == 1:
            (_, loss_sum), grads = grad_fn(state.params, inputs, targets, sequence_id, step_rng, total_tokens)
        else:
            micro = {
                "inputs": _split_microbatches(inputs, num_microbatches),
                "targets": _split_microbatches(targets, num_microbatches),
                "index": jnp.arange(num_microbatches),
            }
            if sequence_id is not None:
                micro["sequence_id"] = _split_microbatches(sequence_id, num_microbatches)

            def accumulate(carry, mb):
                grads_acc, loss_acc = carry
                rng = jax.random.fold_in(step_rng, mb["index"])
                (_, loss_sum), grads = grad_fn(
                    state.params, mb["inputs"], mb["targets"], mb.get("sequence_id"), rng, total_tokens
                )
                grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
                return (grads_acc, loss_acc + loss_sum), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss_sum), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), micro)

        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss = loss_sum / total_tokens
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "tokens": total_tokens,
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model_def: ModelDef, *, compute_dtype: Any = jnp.float32):
    """Build ``eval_step(params, batch) -> {loss_sum, tokens}`` (sums, so batches can be added)."""

    def eval_step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = model_def.apply(
            params, batch["input_ids"], compute_dtype=compute_dtype, sequence_id=batch.get("sequence_id"))
        loss_sum, _, count = cross_entropy_sum(logits, batch_targets(batch))
        return {"loss_sum": loss_sum, "tokens": count}

    return eval_step


def compile_train_step(train_step, state_shardings, batch_sharding, *, donate: bool = True):
    """jit with explicit shardings; the state is donated so its buffers are reused in place."""
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,) if donate else (),
    )

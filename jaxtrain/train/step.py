"""The train and eval steps: pure functions of (state, batch), compiled once with explicit shardings."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxtrain.algorithms.ema import EMAPlan, update_ema
from jaxtrain.layers import fp8, lm_loss, lora
from jaxtrain.parallel.platform import llvm_options
from jaxtrain.train.loss import IGNORE_INDEX, batch_targets
from jaxtrain.train.optim import gates_skipped_steps, select_tree
from jaxtrain.train.state import ModelDef, TrainState

# the dtype activations and products run in; amp_fp8 is amp_bf16 with the layer products in fp8
COMPUTE_DTYPES = {"fp32": jnp.float32, "amp_bf16": jnp.bfloat16, "amp_fp8": jnp.bfloat16}
FP8_PRECISIONS = ("amp_fp8",)


def compiler_options(precision: str, platform: str) -> dict | None:
    """XLA options the train and eval steps are compiled with for ``precision`` on ``platform``."""
    options = llvm_options(platform)
    if precision in FP8_PRECISIONS and platform in ("gpu", "cuda"):
        options.update(fp8.GPU_COMPILER_OPTIONS)
    return options or None


def _split_microbatches(x: jax.Array, num_microbatches: int) -> jax.Array:
    """[batch, ...] -> [microbatches, batch // microbatches, ...].

    Microbatch i takes rows i, i+m, i+2m, ...: with the batch split over devices in contiguous
    blocks, every microbatch keeps the same per-device split, so accumulation moves no data.
    """
    batch = x.shape[0]
    x = x.reshape(batch // num_microbatches, num_microbatches, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)


@dataclasses.dataclass(frozen=True)
class HealthRules:
    """In-step health checks. A step whose loss or gradient norm is not finite never updates the
    state; a loss spike (loss >= ratio x the mean of the recent-loss window) skips its update
    when ``skip_spikes``."""

    detect_spikes: bool = True
    skip_spikes: bool = True
    spike_ratio: float = 2.0
    spike_min_steps: int = 20


def make_train_step(
    model_def: ModelDef,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    *,
    compute_dtype: Any = jnp.float32,
    num_microbatches: int = 1,
    z_loss: float = 0.0,
    use_dropout: bool = False,
    health: HealthRules = HealthRules(),
    fp8_products: bool = False,
    ema: EMAPlan | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Build ``train_step(state, batch) -> (state, metrics)``.

    The loss is the token-mean cross-entropy over the whole global batch: each microbatch's
    summed loss is divided by the batch's total target count, so accumulating over microbatches
    gives the same gradient as one pass over the full batch.

    With ``fp8_products`` the transformer blocks' linear layers take their products in fp8
    (``jaxtrain.layers.fp8``); everything else runs in ``compute_dtype``.

    With ``ema`` (``algorithms.ema``'s schedule), the state's moving average of the parameters
    is updated after each applied step (``jaxtrain.algorithms.ema``).

    A model with LoRA adapters (``jaxtrain.layers.lora``) trains them alone: the gradient, the
    optimizer and the average cover the adapters, and the frozen weights pass through unchanged.

    An optional ``control`` float32[2] = [loss multiplier, force skip] lets the host rehearse
    failures (a NaN or spike multiplier) and reproduce another run's skipped steps.
    """

    def microbatch_loss(trained, frozen, inputs, targets, sequence_id, dropout_rng, total_tokens, multiplier):
        params = trained if frozen is None else lora.merge_trainable(trained, frozen)
        with fp8.products(fp8_products):
            loss_sum, z_sum, _ = model_def.apply(
                params,
                inputs,
                targets,
                method="lm_loss",
                compute_dtype=compute_dtype,
                sequence_id=sequence_id,
                dropout_rng=dropout_rng if use_dropout else None,
                z_loss=z_loss,
            )
        loss_sum = loss_sum * multiplier
        return (loss_sum + z_sum) / total_tokens, loss_sum

    grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array], control: jax.Array | None = None):
        inputs = batch["input_ids"]
        targets = batch_targets(batch)
        sequence_id = batch.get("sequence_id")
        total_tokens = jnp.maximum((targets != IGNORE_INDEX).sum().astype(jnp.float32), 1.0)
        step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        multiplier = control[0] if control is not None else jnp.float32(1.0)
        # With LoRA adapters only they train: no gradient of a frozen weight is computed.
        trained, frozen = (lora.split_trainable(state.params) if lora.has_adapters(state.params)
                           else (state.params, None))

        if num_microbatches == 1:
            (_, loss_sum), grads = grad_fn(
                trained, frozen, inputs, targets, sequence_id, step_rng, total_tokens, multiplier
            )
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
                    trained, frozen, mb["inputs"], mb["targets"], mb.get("sequence_id"), rng, total_tokens, multiplier
                )
                grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
                return (grads_acc, loss_acc + loss_sum), None

            zeros = jax.tree.map(jnp.zeros_like, trained)
            (grads, loss_sum), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), micro)

        grad_norm = optax.tree.norm(grads)
        loss = loss_sum / total_tokens
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        recorded = jnp.minimum(state.window_count, state.loss_window.shape[0])
        window_mean = state.loss_window.sum() / jnp.maximum(recorded, 1)
        spike = (
            jnp.bool_(health.detect_spikes)
            & finite
            & (recorded >= health.spike_min_steps)
            & (loss >= health.spike_ratio * window_mean)
        )
        apply = finite & ~(spike & health.skip_spikes)
        if control is not None:
            apply = apply & (control[1] == 0)

        keep_if_skipped = functools.partial(select_tree, apply)
        if gates_skipped_steps(tx, state.opt_state):
            # the optimizer keeps its own state on a skipped step: its parameter update can then
            # read the moments it wrote, not recompute them from overwritten ones
            updates, opt_state = tx.update(grads, state.opt_state, trained, apply=apply)
        else:
            updates, opt_state = tx.update(grads, state.opt_state, trained)
            opt_state = keep_if_skipped(opt_state, state.opt_state)
        updates = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), updates)
        trained = keep_if_skipped(optax.apply_updates(trained, updates), trained)
        params = trained if frozen is None else lora.merge_trainable(trained, frozen)
        window_index = state.window_count % state.loss_window.shape[0]
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            ema=state.ema if ema is None else update_ema(ema, state.ema, trained, state.step + 1, apply),
            opt_state=opt_state,
            loss_window=jnp.where(apply, state.loss_window.at[window_index].set(loss), state.loss_window),
            window_count=state.window_count + apply.astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state.step) * state.lr_scale,
            "tokens": total_tokens,
            "finite": finite,
            "spike": spike,
            "applied": apply,
        }
        return new_state, metrics

    return train_step


def make_eval_step(model_def: ModelDef, *, compute_dtype: Any = jnp.float32, fp8_products: bool = False):
    """Build ``eval_step(params, batch) -> {loss_sum, tokens}`` (sums, so batches can be added).

    ``fp8_products`` as in ``make_train_step``, so that held-out and training losses compare. On
    the CPU the loss is taken in sequence chunks (``lm_loss.fused_for_evaluation``)."""

    def eval_step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        with fp8.products(fp8_products):
            loss_sum, _, count = model_def.apply(
                params, batch["input_ids"], batch_targets(batch), method="lm_loss", compute_dtype=compute_dtype,
                sequence_id=batch.get("sequence_id"), fused=lm_loss.fused_for_evaluation(compute_dtype))
        return {"loss_sum": loss_sum, "tokens": count}

    return eval_step


def compile_train_step(train_step, state_shardings, batch_sharding, *, donate: bool = True, control_sharding=None,
                       options: dict | None = None):
    """jit with explicit shardings; the state is donated so its buffers are reused in place.

    With ``control_sharding`` (replicated), the step takes a third ``control`` argument;
    ``options`` are XLA compiler options (``compiler_options``)."""
    if control_sharding is None:
        step, in_shardings = (lambda state, batch: train_step(state, batch)), (state_shardings, batch_sharding)
    else:
        step, in_shardings = train_step, (state_shardings, batch_sharding, control_sharding)
    return jax.jit(
        step,
        in_shardings=in_shardings,
        out_shardings=(state_shardings, None),
        donate_argnums=(0,) if donate else (),
        compiler_options=options,
    )

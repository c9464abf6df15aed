"""Causal language-modelling loss: cross-entropy on shifted labels with ignore index -100."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def shift_labels(labels: jax.Array) -> jax.Array:
    """int32[batch, length] -> int32[batch, length]: position t predicts token t+1; the last is ignored."""
    ignored = jnp.full_like(labels[:, :1], IGNORE_INDEX)
    return jnp.concatenate([labels[:, 1:], ignored], axis=1)


def cross_entropy_sum(
    logits: jax.Array, targets: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed token cross-entropy (+ optional z-loss) over non-ignored targets.

    logits: float32[batch, length, vocab]; targets: int32[batch, length] (already shifted).
    Returns (loss_sum, z_loss_sum, token_count), all float32 scalars.
    """
    logits = logits.astype(jnp.float32)
    valid = targets != IGNORE_INDEX
    safe_targets = jnp.where(valid, targets, 0)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
    token_loss = jnp.where(valid, log_z - target_logit, 0.0)
    z_term = jnp.where(valid, z_loss * jnp.square(log_z), 0.0) if z_loss else jnp.zeros_like(token_loss)
    return token_loss.sum(), z_term.sum(), valid.sum().astype(jnp.float32)


def batch_targets(batch: dict[str, jax.Array]) -> jax.Array:
    """The shifted targets of a batch: its ``labels`` if present (Foundry convention), else its inputs."""
    labels = batch.get("labels", batch["input_ids"])
    return shift_labels(labels)

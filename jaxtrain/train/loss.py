"""Causal language-modelling loss: cross-entropy on shifted labels with ignore index -100."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtrain.layers.lm_loss import IGNORE_INDEX, cross_entropy_sum

__all__ = ["IGNORE_INDEX", "batch_targets", "cross_entropy_sum", "shift_labels"]


def shift_labels(labels: jax.Array) -> jax.Array:
    """int32[batch, length] -> int32[batch, length]: position t predicts token t+1; the last is ignored."""
    ignored = jnp.full_like(labels[:, :1], IGNORE_INDEX)
    return jnp.concatenate([labels[:, 1:], ignored], axis=1)


def batch_targets(batch: dict[str, jax.Array]) -> jax.Array:
    """The shifted targets of a batch: its ``labels`` if present (Foundry convention), else its inputs."""
    labels = batch.get("labels", batch["input_ids"])
    return shift_labels(labels)

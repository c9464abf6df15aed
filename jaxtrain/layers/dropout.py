"""Functional dropout: applied only when a key is given, so train steps stay pure functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Zero each element with probability ``rate`` and rescale the rest by ``1/(1-rate)``."""
    if rng is None or rate == 0.0:
        return x
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))

"""Token and position embeddings; the token table doubles as the tied output head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.layers import lm_loss
from jaxtrain.layers.linear import annotated, normal_init, placeholder_dtype


class Embed(nnx.Module):
    """An embedding table ``[num_embeddings, features]`` (Hugging Face's ``weight``)."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        std: float,
        axes: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        placeholder = placeholder_dtype(param_dtype)  # loaded right after: zeros, not drawn
        init = annotated(normal_init(std) if placeholder is None else jax.nn.initializers.zeros, axes)
        self.embedding = nnx.Param(init(rngs.params(), (num_embeddings, features), param_dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        """``ids [...]`` -> ``[..., features]`` in float32 (the residual stream's dtype)."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(jnp.float32)

    def attend(self, x: jax.Array, *, compute_dtype=jnp.float32) -> jax.Array:
        """Tied output projection ``x @ embedding.T``: ``[..., features]`` -> float32 ``[..., num_embeddings]``."""
        return lm_loss.head_logits(x, self.embedding[...], tied=True, compute_dtype=compute_dtype)

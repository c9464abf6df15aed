"""Model registry: ``build_model(cfg, rngs=...)`` by ``cfg.name``."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from flax import nnx

from jaxtrain.config.schema import ModelConfig
from jaxtrain.models.mpt import MPTForCausalLM, mpt_param_count

MODEL_REGISTRY: dict[str, Callable[..., nnx.Module]] = {
    "mpt_causal_lm": MPTForCausalLM,
}


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32) -> nnx.Module:
    """Build the model family named by ``cfg.name`` (LLM Foundry's ``model.name``)."""
    try:
        model_cls = MODEL_REGISTRY[cfg.name]
    except KeyError:
        valid = sorted(MODEL_REGISTRY)
        raise ValueError(f"model.name={cfg.name!r} is not a known model; valid names: {valid}") from None
    return model_cls(cfg, rngs=rngs, param_dtype=param_dtype)


__all__ = ["MODEL_REGISTRY", "MPTForCausalLM", "build_model", "mpt_param_count"]

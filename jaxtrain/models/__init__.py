"""Model registry: ``build_model(cfg, rngs=...)`` by ``cfg.name``."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from flax import nnx

from jaxtrain.config.schema import ConfigError, ModelConfig
from jaxtrain.layers.linear import weight_std
from jaxtrain.models.mpt import MPTForCausalLM, mpt_param_count
from jaxtrain.models.mpt_config import validate_mpt_config

MODEL_REGISTRY: dict[str, Callable[..., nnx.Module]] = {
    "mpt_causal_lm": MPTForCausalLM,
}


def check_model_config(cfg: ModelConfig) -> None:
    """Raise ``ConfigError`` naming the key for a model config that cannot be built (its name,
    options, activation or initialisation), before anything is built or compiled."""
    if cfg.name not in MODEL_REGISTRY:
        raise ConfigError(f"model.name={cfg.name!r} is not a known model; valid names: {sorted(MODEL_REGISTRY)}")
    validate_mpt_config(cfg)
    weight_std(cfg.init_config, fan_in=cfg.d_model, fan_out=cfg.d_model)


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32) -> nnx.Module:
    """Build the model family named by ``cfg.name`` (LLM Foundry's ``model.name``)."""
    check_model_config(cfg)
    return MODEL_REGISTRY[cfg.name](cfg, rngs=rngs, param_dtype=param_dtype)


__all__ = ["MODEL_REGISTRY", "MPTForCausalLM", "build_model", "check_model_config", "mpt_param_count"]

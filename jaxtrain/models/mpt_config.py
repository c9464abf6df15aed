"""MPT's config-level facts: what a ``ModelConfig`` may ask for, key/value heads, parameter count.

Nothing here builds a module: the planner, the converters and the run's set-up read these
without the model's code.
"""

from __future__ import annotations

import math

from jaxtrain.config.schema import ConfigError, ModelConfig
from jaxtrain.config.validate import REMAT_CHOICES
from jaxtrain.layers.attention import ATTN_TYPES
from jaxtrain.layers.mlp import FFN_TYPES, ffn_hidden_size, resolve_activation
from jaxtrain.layers.norms import NORM_TYPES

_ATTN_IMPLS = ("xla", "torch", "flash", "triton")  # Foundry's kernels all map to the XLA op


def kv_heads(cfg: ModelConfig) -> int:
    """Key/value heads implied by ``attn_type`` (Foundry ignores kv_n_heads for the other types)."""
    attn = cfg.attn_config
    if attn.attn_type == "multihead_attention":
        return cfg.n_heads
    if attn.attn_type == "multiquery_attention":
        return 1
    return attn.kv_n_heads


def validate_mpt_config(cfg: ModelConfig) -> None:
    """Raise ``ConfigError`` (a ``ValueError``) naming the key for options this MPT does not support."""
    attn = cfg.attn_config
    if attn.prefix_lm:
        raise ConfigError("model.attn_config.prefix_lm: true is not supported (MPT here is causal only)")
    if attn.rope:
        raise ConfigError("model.attn_config.rope: true is not supported; MPT uses ALiBi (attn_config.alibi)")
    if attn.sliding_window_size != -1:
        raise ConfigError("model.attn_config.sliding_window_size must be -1 (sliding windows are not supported)")
    if attn.attn_type not in ATTN_TYPES:
        raise ConfigError(f"model.attn_config.attn_type={attn.attn_type!r}; use one of {ATTN_TYPES}")
    if attn.attn_impl not in _ATTN_IMPLS:
        raise ConfigError(f"model.attn_config.attn_impl={attn.attn_impl!r}; use one of {_ATTN_IMPLS}")
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(f"model.d_model={cfg.d_model} must be divisible by model.n_heads={cfg.n_heads}")
    if attn.attn_type == "grouped_query_attention":
        kv = attn.kv_n_heads
        if kv is None or kv < 1 or kv > cfg.n_heads or cfg.n_heads % kv:
            raise ConfigError(
                f"model.attn_config.kv_n_heads={kv} must divide model.n_heads={cfg.n_heads} "
                "for grouped_query_attention"
            )
    if cfg.ffn_config.ffn_type not in FFN_TYPES:
        raise ConfigError(f"model.ffn_config.ffn_type={cfg.ffn_config.ffn_type!r}; use one of {FFN_TYPES}")
    resolve_activation(cfg.ffn_config.ffn_act_fn)
    ffn_hidden_size(cfg.d_model, cfg.expansion_ratio)
    if cfg.norm_type not in NORM_TYPES:
        raise ConfigError(f"model.norm_type={cfg.norm_type!r}; use one of {NORM_TYPES}")
    if isinstance(cfg.logit_scale, str) and cfg.logit_scale != "inv_sqrt_d_model":
        raise ConfigError(f"model.logit_scale={cfg.logit_scale!r}; use a number or 'inv_sqrt_d_model'")
    if cfg.remat not in REMAT_CHOICES:
        raise ConfigError(f"model.remat={cfg.remat!r}; use one of {REMAT_CHOICES}")


def logit_scale(cfg: ModelConfig) -> float | None:
    """The factor the LM head's logits are multiplied by (``model.logit_scale``), or None."""
    if cfg.logit_scale == "inv_sqrt_d_model":
        return 1.0 / math.sqrt(cfg.d_model)
    return None if cfg.logit_scale is None else float(cfg.logit_scale)


def mpt_param_count(cfg: ModelConfig) -> int:
    """Closed-form parameter count of ``MPTForCausalLM(cfg)``."""
    validate_mpt_config(cfg)
    d_model, bias = cfg.d_model, 0 if cfg.no_bias else 1
    kv_width = kv_heads(cfg) * (d_model // cfg.n_heads)
    hidden = ffn_hidden_size(d_model, cfg.expansion_ratio)
    norm = d_model * (1 + bias)

    qkv_out = d_model + 2 * kv_width
    attn = d_model * qkv_out + bias * qkv_out + d_model * d_model + bias * d_model
    if cfg.attn_config.qk_ln:
        attn += (d_model + kv_width) * (1 + bias)
    n_in_proj = 2 if cfg.ffn_config.ffn_type == "mptglu" else 1
    ffn = n_in_proj * (d_model * hidden + bias * hidden) + hidden * d_model + bias * d_model
    block = 2 * norm + attn + ffn

    total = cfg.vocab_size * d_model + cfg.n_layers * block + norm
    if not cfg.attn_config.alibi and cfg.learned_pos_emb:
        total += cfg.max_seq_len * d_model
    if not cfg.tie_word_embeddings:
        total += d_model * cfg.vocab_size  # Foundry's lm_head has no bias
    return total

"""LoRA settings (``model.peft_config``, Hugging Face PEFT's ``LoraConfig``): which layers take
adapters, their scale, and the checks a config gets. Plain Python, so reading a config needs no
JAX; the adapters themselves are in ``jaxtrain.layers.lora``.

Modules are named as in Hugging Face's MPT (``transformer.blocks.{i}.attn.Wqkv``,
``...attn.out_proj``, ``...ffn.up_proj``, ``...ffn.gate_proj``, ``...ffn.down_proj``), and
``target_modules`` selects among them as PEFT does: a list of names, each matching a module
whose name is it or ends in ``.`` and it; a string, a regular expression that must match the
whole module name; or ``all-linear`` (every linear layer but the output head).
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Callable

ATTENTION_MODULES = ("Wqkv", "out_proj")
FFN_MODULES = ("up_proj", "gate_proj", "down_proj")
INITS = (True, "gaussian")
_SEPARATE_QKV = ("q_proj", "k_proj", "v_proj", "query", "key", "value", "qkv_proj", "query_key_value", "c_attn")
# PEFT LoraConfig settings jaxtrain's LoRA does not implement, and the values meaning "off"
PEFT_OFF_VALUES = {"modules_to_save": (None, []), "layers_to_transform": (None, []),
                   "lora_bias": (False, None),
                   "target_parameters": (None, []), "trainable_token_indices": (None, []),
                   "layer_replication": (None, []), "use_qalora": (False, None), "exclude_modules": (None, []),
                   "layers_pattern": (None, []), "loftq_config": (None, {}), "eva_config": (None, {}),
                   "corda_config": (None, {}), "megatron_config": (None, {})}
# PEFT LoraConfig settings that change nothing jaxtrain computes
PEFT_NO_EFFECT = ("inference_mode", "revision", "base_model_name_or_path", "peft_version", "auto_mapping",
                  "megatron_core", "qalora_group_size", "ensure_weight_tying")


def module_names(model_cfg: Any) -> list[str]:
    """The linear layers of one block that can take adapters, by their Hugging Face names."""
    glu = model_cfg.ffn_config.ffn_type == "mptglu"
    return [*ATTENTION_MODULES, *(name for name in FFN_MODULES if glu or name != "gate_proj")]


def full_name(block: int, module: str) -> str:
    """A module's full Hugging Face name (``transformer.blocks.0.attn.Wqkv``)."""
    part = "attn" if module in ATTENTION_MODULES else "ffn"
    return f"transformer.blocks.{block}.{part}.{module}"


def _matches(target: list | str, name: str) -> bool:
    if isinstance(target, str):
        if target == "all-linear":
            return True
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _pattern_key(patterns: dict, name: str) -> Any:
    """The first key of ``patterns`` matching the module ``name`` as PEFT matches them (the
    whole key a regular expression for the end of the name, after a dot), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _per_layer(model_cfg: Any, module: str, patterns: dict, default: Any) -> Any:
    """``patterns``' value for ``module`` (else ``default``), the same in every block (``ValueError`` if not)."""
    chosen = _pattern_key(patterns, full_name(0, module))
    for block in range(1, model_cfg.n_layers):
        here = _pattern_key(patterns, full_name(block, module))
        if here != chosen:
            if here is None or chosen is None:
                key, of, not_of = (chosen, 0, block) if here is None else (here, block, 0)
                what = f"'{key}' selects {module} in block {of} but not in block {not_of}"
            else:
                what = f"'{chosen}' selects {module} in block 0 and '{here}' in block {block}"
            raise ValueError(f"{what}; jaxtrain gives every block the same adapters: name the layer instead")
    return default if chosen is None else patterns[chosen]


def module_rank(model_cfg: Any, module: str) -> int:
    """The rank of ``module``'s adapters: ``rank_pattern``'s, else ``r``."""
    peft = model_cfg.peft_config
    return int(_per_layer(model_cfg, module, peft.rank_pattern or {}, peft.r))


def module_scaling(model_cfg: Any, module: str) -> float:
    """``module``'s adapter scale, from its rank and ``alpha_pattern``'s alpha (else ``lora_alpha``)."""
    peft = model_cfg.peft_config
    alpha = float(_per_layer(model_cfg, module, peft.alpha_pattern or {}, peft.lora_alpha))
    r = module_rank(model_cfg, module)
    return alpha / (math.sqrt(r) if peft.use_rslora else r)


def targeted_modules(model_cfg: Any) -> tuple[str, ...]:
    """The names (among ``module_names``) of the layers ``model.peft_config`` gives adapters.

    Raises ``ValueError`` naming the problem: a listed name matching no layer, a pattern matching
    none, or one matching a layer in some blocks only (the blocks share one structure)."""
    peft = model_cfg.peft_config
    names = module_names(model_cfg)
    target = peft.target_modules
    if isinstance(target, str):
        if target != "all-linear":
            try:
                re.compile(target)
            except re.error as err:
                raise ValueError(f"{target!r} is not a regular expression ({err})") from None
    else:
        if not target or not all(isinstance(t, str) for t in target):
            raise ValueError(f"expected a non-empty list of module names, got {target!r}")
        for t in target:
            if not any(_matches([t], full_name(0, name)) for name in names):
                close = difflib.get_close_matches(t.rsplit(".", 1)[-1], names, n=1, cutoff=0.8)
                layers = ", ".join(names)
                hint = f"did you mean '{close[0]}'?" if close else f"MPT's linear layers are {layers}"
                if t.rsplit(".", 1)[-1] in _SEPARATE_QKV:
                    hint = f"MPT projects queries, keys and values in one layer, Wqkv; its linear layers are {layers}"
                elif t == "gate_proj":
                    hint = f"gate_proj exists with model.ffn_config.ffn_type: mptglu; the model's linear layers are {layers}"
                raise ValueError(f"{t!r} names no layer of the model; {hint}")
    chosen = tuple(name for name in names if _matches(target, full_name(0, name)))
    for block in range(1, model_cfg.n_layers):
        here = tuple(name for name in names if _matches(target, full_name(block, name)))
        if here != chosen:
            raise ValueError(f"{target!r} selects other layers in block {block} than in block 0 ({list(here)} vs "
                             f"{list(chosen)}); jaxtrain gives every block the same adapters: name the layers instead")
    if not chosen:
        raise ValueError(f"{target!r} matches no layer; MPT's linear layers are {', '.join(names)} "
                         f"(e.g. transformer.blocks.0.attn.Wqkv)")
    return chosen


def check_peft_config(model_cfg: Any, fail: Callable[[str, str], None]) -> None:
    """Refuse (through ``fail(key, problem)``) a ``model.peft_config`` jaxtrain cannot run as PEFT would."""
    peft = model_cfg.peft_config
    if peft is None:
        return
    key = "model.peft_config"
    if str(peft.peft_type).upper() != "LORA":
        fail(f"{key}.peft_type", f"{peft.peft_type!r} is not supported; jaxtrain trains LORA adapters")
    if str(peft.task_type).upper() != "CAUSAL_LM":
        fail(f"{key}.task_type", f"{peft.task_type!r} is not supported; use CAUSAL_LM")
    if isinstance(peft.r, bool) or not isinstance(peft.r, int) or peft.r < 1:
        fail(f"{key}.r", f"expected a whole number >= 1, got {peft.r!r}")
    if isinstance(peft.lora_alpha, bool) or not isinstance(peft.lora_alpha, (int, float)) or peft.lora_alpha <= 0:
        fail(f"{key}.lora_alpha", f"expected a positive number, got {peft.lora_alpha!r}")
    if not 0 <= peft.lora_dropout < 1:
        fail(f"{key}.lora_dropout", f"must be in [0, 1), got {peft.lora_dropout}")
    if peft.bias != "none":
        fail(f"{key}.bias", f"{peft.bias!r} is not supported; only none (biases stay frozen)")
    if peft.fan_in_fan_out:
        fail(f"{key}.fan_in_fan_out", "only false is supported (MPT's layers are Linear)")
    if peft.init_lora_weights not in INITS:
        fail(f"{key}.init_lora_weights", f"{peft.init_lora_weights!r} is not supported; use true or gaussian")
    try:
        chosen = targeted_modules(model_cfg)
    except ValueError as err:
        fail(f"{key}.target_modules", str(err))
    for name, pattern in (("rank_pattern", peft.rank_pattern), ("alpha_pattern", peft.alpha_pattern)):
        if not isinstance(pattern, dict):
            fail(f"{key}.{name}", f"expected a mapping of module name patterns to values, got {pattern!r}")
        for pattern_key, value in pattern.items():
            try:
                re.compile(str(pattern_key))
            except re.error as err:
                fail(f"{key}.{name}", f"{pattern_key!r} is not a regular expression ({err})")
            whole = name == "rank_pattern"
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or value <= 0:
                fail(f"{key}.{name}", f"{pattern_key!r}: expected a {'whole number >= 1' if whole else 'positive number'}"
                                      f", got {value!r}")
        try:
            for module in chosen:
                (module_rank if name == "rank_pattern" else module_scaling)(model_cfg, module)
        except ValueError as err:
            fail(f"{key}.{name}", str(err))


def scaling(peft: Any) -> float:
    """What the adapter's product is multiplied by: ``lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``)."""
    return float(peft.lora_alpha) / (math.sqrt(peft.r) if peft.use_rslora else peft.r)

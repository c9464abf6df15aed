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
PEFT_OFF_VALUES = {"use_dora": (False, None), "modules_to_save": (None, []), "layers_to_transform": (None, []),
                   "rank_pattern": (None, {}), "alpha_pattern": (None, {}), "lora_bias": (False, None),
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
        targeted_modules(model_cfg)
    except ValueError as err:
        fail(f"{key}.target_modules", str(err))


def scaling(peft: Any) -> float:
    """What the adapter's product is multiplied by: ``lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``)."""
    return float(peft.lora_alpha) / (math.sqrt(peft.r) if peft.use_rslora else peft.r)

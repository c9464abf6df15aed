"""LoRA adapters <-> Hugging Face PEFT adapter folders.

A PEFT adapter folder holds ``adapter_config.json`` (a ``LoraConfig``) and
``adapter_model.safetensors``, whose tensors are named after the module they adapt::

    base_model.model.transformer.blocks.{i}.attn.Wqkv.lora_A.weight   [r, in]   blocks/attn/Wqkv/lora_a [in, r]
    base_model.model.transformer.blocks.{i}.attn.Wqkv.lora_B.weight   [out, r]  blocks/attn/Wqkv/lora_b [r, out]

(and so on for ``out_proj``, ``ffn.up_proj``, ``ffn.gate_proj``, ``ffn.down_proj``). Such a folder
applies to the Hugging Face MPT model it was trained on (``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np

from jaxtrain.config import ConfigError
from jaxtrain.config.peft import PEFT_OFF_VALUES
from jaxtrain.config.schema import PeftConfig
from jaxtrain.layers import lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# adapter_config.json settings jaxtrain's LoRA does not implement, and the values meaning "off"
_UNSUPPORTED = {**PEFT_OFF_VALUES, "bias": ("none", None), "fan_in_fan_out": (False, None)}


def tensor_name(block: int, module: str, which: str) -> str:
    """The PEFT name of block ``block``'s ``module`` adapter tensor ``which``: ``A`` or ``B``, or
    ``magnitude`` (DoRA's, a vector)."""
    if which == "magnitude":
        return f"{PEFT_PREFIX}{lora.full_name(block, module)}.lora_magnitude_vector"
    return f"{PEFT_PREFIX}{lora.full_name(block, module)}.lora_{which}.weight"


def _tensors_of(model_cfg: Any) -> list[tuple[str, str]]:
    """``(which, parameter name)`` of each adapter tensor of a layer."""
    dora = bool(model_cfg.peft_config.use_dora)
    return [("A", "lora_a"), ("B", "lora_b")] + ([("magnitude", "lora_magnitude")] if dora else [])


def peft_config_from_adapter(folder: str) -> PeftConfig:
    """The ``model.peft_config`` of the PEFT adapter folder ``folder``; ``ConfigError`` naming the
    file and setting when it is not a LoRA adapter jaxtrain can load."""
    from jaxtrain.convert.folders import read_json_object

    path = os.path.join(folder, ADAPTER_CONFIG)
    config = read_json_object(folder, ADAPTER_CONFIG, expected="a PEFT adapter folder", what="adapter settings")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ConfigError(f"{path}: peft_type {config.get('peft_type')!r}; jaxtrain loads LORA adapters only")
    for key, off in _UNSUPPORTED.items():
        if key in config and config[key] not in off:
            raise ConfigError(f"{path}: {key}={json.dumps(config[key])} is not supported by jaxtrain's LoRA "
                              f"(it supports {json.dumps(off[0])} only)")
    init = config.get("init_lora_weights", True)
    target = config.get("target_modules") or ["Wqkv"]
    return PeftConfig(
        r=int(config.get("r", 8)), lora_alpha=config.get("lora_alpha", 8),
        lora_dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=sorted(target) if isinstance(target, list) else target,
        use_rslora=bool(config.get("use_rslora", False)), init_lora_weights="gaussian" if init == "gaussian" else True,
        rank_pattern=dict(config.get("rank_pattern") or {}), alpha_pattern=dict(config.get("alpha_pattern") or {}),
        use_dora=bool(config.get("use_dora") or False),
    )


def adapter_config(model_cfg: Any, *, base_model: str | None = None) -> dict:
    """``adapter_config.json`` for ``model_cfg``'s adapters, naming the adapted layers outright."""
    peft = model_cfg.peft_config
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(peft.r),
        "lora_alpha": int(peft.lora_alpha) if float(peft.lora_alpha).is_integer() else float(peft.lora_alpha),
        "lora_dropout": float(peft.lora_dropout), "target_modules": list(lora.targeted_modules(model_cfg)),
        "use_rslora": bool(peft.use_rslora), "init_lora_weights": peft.init_lora_weights, "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True,
        "rank_pattern": dict(peft.rank_pattern or {}), "alpha_pattern": dict(peft.alpha_pattern or {}),
        "use_dora": bool(peft.use_dora), "base_model_name_or_path": base_model,
    }


def _adapter_node(params: dict, model_cfg: Any, block: int, module: str) -> tuple[dict, int | None]:
    """(the pure-dict node of ``module``'s Dense in block ``block``, the row of its stacked leaves)."""
    part = "attn" if module in lora.ATTENTION_MODULES else "ffn"
    if model_cfg.scan_layers:
        return params["blocks"][part][module], block
    return params["blocks"][block][part][module], None


def adapter_entries(model_cfg: Any, params: dict, np_dtype: Any) -> list[tuple[str, tuple, Callable[[], np.ndarray]]]:
    """``SafetensorsWriter`` entries for the adapters in ``params`` (a pure dict)."""
    entries = []
    for block in range(model_cfg.n_layers):
        for module in lora.targeted_modules(model_cfg):
            node, row = _adapter_node(params, model_cfg, block, module)
            for which, key in _tensors_of(model_cfg):
                def tensor(node=node, key=key, row=row):
                    value = np.asarray(node[key] if row is None else node[key][row])
                    return np.ascontiguousarray(value.T.astype(np_dtype))  # a vector stays as it is

                ndim = 1 if key == "lora_magnitude" else 2
                shape = tuple(np.shape(node[key])[-ndim:][::-1])
                entries.append((tensor_name(block, module, which), shape, tensor))
    return entries


def import_adapter(folder: str, model_cfg: Any, params: dict) -> Any:
    """Add the PEFT adapter in ``folder`` to ``params`` (a pure dict of ``model_cfg``'s model,
    without adapters; changed in place) and return the model config with its ``peft_config``."""
    import dataclasses

    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from jaxtrain.config.peft import check_peft_config

    peft = peft_config_from_adapter(folder)
    adapted = dataclasses.replace(model_cfg, peft_config=peft)

    def fail(key: str, problem: str) -> None:
        raise ConfigError(f"{os.path.join(folder, ADAPTER_CONFIG)}: {key.rsplit('.', 1)[-1]}: {problem}")

    check_peft_config(adapted, fail)
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise ConfigError(f"{folder}: no {ADAPTER_WEIGHTS} (pickle adapters, adapter_model.bin, are refused)")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"{path}: not a readable safetensors file ({error}); download it again") from None
    wanted = set()
    for block in range(model_cfg.n_layers):
        for module in lora.targeted_modules(adapted):
            node, row = _adapter_node(params, model_cfg, block, module)
            in_features, out_features = np.shape(node["kernel"])[-2:]
            r = lora.module_rank(adapted, module)
            shapes = {"lora_a": (r, in_features), "lora_b": (out_features, r), "lora_magnitude": (out_features,)}
            for which, key in _tensors_of(adapted):
                shape = shapes[key]
                name = tensor_name(block, module, which)
                wanted.add(name)
                if name not in tensors:
                    raise ConfigError(f"{path}: missing tensor {name} (adapter_config.json targets {module})")
                value = np.asarray(tensors[name], np.float32)
                if value.shape != shape:
                    raise ConfigError(f"{path}: tensor {name} has shape {list(value.shape)}, the model implies "
                                      f"{list(shape)}")
                if row is None:
                    node[key] = value.T
                else:
                    if block == 0:
                        node[key] = np.empty((model_cfg.n_layers, *value.T.shape), np.float32)
                    node[key][row] = value.T
    unexpected = sorted(set(tensors) - wanted)
    if unexpected:
        raise ConfigError(f"{path}: tensor {unexpected[0]} adapts no layer adapter_config.json targets "
                          f"({len(unexpected)} unexpected)")
    return adapted

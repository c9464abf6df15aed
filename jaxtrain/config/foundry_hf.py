"""LLM Foundry's ``hf_causal_lm`` model section on a local Hugging Face MPT folder.

Foundry builds such a model with transformers from ``pretrained_model_name_or_path`` (its
``config.json``, changed by ``config_overrides``) and, with ``pretrained: true`` (the default),
starts from its weights. jaxtrain builds the same MPT from that ``config.json`` and starts from the
folder's weights through ``load_path`` (``jaxtrain.checkpoint.load.load_hf_weights``), so a
Foundry fine-tuning YAML, LoRA's ``peft_config`` included, runs with the model's name changed to
the folder it was downloaded to.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from jaxtrain.config.schema import ConfigError

Note = Callable[[str], None]
Where = Callable[[str], str]

# keys of Foundry's hf_causal_lm section that change nothing jaxtrain computes
NO_EFFECT = ("trust_remote_code", "use_auth_token", "use_flash_attention_2", "init_device", "use_train_metrics",
             "additional_train_metrics", "additional_eval_metrics", "attn_implementation", "allow_embedding_resizing")
# Composer checkpoints of a PEFT model hold the adapters alone unless this is false (Foundry's default
# true); jaxtrain's LoRA checkpoints leave the frozen weights out likewise (save_frozen_weights).
SAVE_PEFT_ONLY = "should_save_peft_only"
# jaxtrain's own model keys, kept as the section gives them
KEPT = ("peft_config", "quantize_frozen", "remat", "scan_layers", "scan_unroll", "fused_loss", "z_loss")
# transformers' bitsandbytes 8-bit frozen weights; jaxtrain's are int8 with a scale per column (quantize_frozen)
LOAD_IN_8BIT = "load_in_8bit"
REFUSED = {"pretrained_lora_id_or_path": "convert the model with its adapter (jaxtrain convert FOLDER DIR --adapter "
                                         "ADAPTER) and set load_path to DIR, with the adapter's peft_config"}


def local_folder(model: dict) -> str | None:
    """The local Hugging Face folder an ``hf_causal_lm`` section names, if it is one (else None)."""
    source = model.get("pretrained_model_name_or_path")
    if not isinstance(source, str):
        return None
    folder = os.path.expanduser(source)
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def map_hf_model(doc: dict, folder: str, note: Note, where: Where) -> None:
    """Replace ``doc["model"]`` (an ``hf_causal_lm`` section naming the local folder ``folder``) by the
    MPT its ``config.json`` describes, and start from its weights (``load_path``) when pretrained."""
    from jaxtrain.config.loader import config_to_dict
    from jaxtrain.convert.folders import CONFIG_FILE, read_json_object
    from jaxtrain.convert.hf_mpt import model_config_from_hf

    model = doc["model"]
    for key, why in REFUSED.items():
        if model.get(key):
            raise ConfigError(f"{where(f'model.{key}')}: model.{key}: {model[key]!r}: {why}")
    known = {"name", "pretrained_model_name_or_path", "pretrained", "config_overrides", SAVE_PEFT_ONLY, LOAD_IN_8BIT,
             *NO_EFFECT, *KEPT, *REFUSED}
    unknown = sorted(set(model) - known)
    if unknown:
        raise ConfigError(f"{where(f'model.{unknown[0]}')}: model.{unknown[0]}: not a key of Foundry's hf_causal_lm "
                          f"model (a model built from {folder}/{CONFIG_FILE}); remove it or set it under "
                          f"config_overrides")
    path = os.path.join(folder, CONFIG_FILE)
    hf = read_json_object(folder, CONFIG_FILE, expected="a Hugging Face MPT folder", what="model settings")
    overrides = model.get("config_overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where('model.config_overrides')}: model.config_overrides: expected a mapping of "
                          f"config.json keys, got {overrides!r}")
    for key, value in overrides.items():  # nested settings (attn_config, ...) are updated, as Foundry does
        hf[key] = {**hf[key], **value} if isinstance(value, dict) and isinstance(hf.get(key), dict) else value
    built = config_to_dict(model_config_from_hf(hf, source=path, scan_layers=model.get("scan_layers", True),
                                                validate=False))
    built.update({key: model[key] for key in KEPT if key in model})
    pretrained = model.get("pretrained", True)
    doc["model"] = built
    if model.get(SAVE_PEFT_ONLY, True) is False and model.get("peft_config") and "save_frozen_weights" not in doc:
        doc["save_frozen_weights"] = True
        note(f"model.{SAVE_PEFT_ONLY}: false: checkpoints hold the frozen weights too (save_frozen_weights: true)")
    if model.get(LOAD_IN_8BIT):
        if not model.get("peft_config"):
            raise ConfigError(f"{where(f'model.{LOAD_IN_8BIT}')}: model.{LOAD_IN_8BIT}: true: only a LoRA run "
                              f"(model.peft_config) keeps frozen weights in 8 bits; remove the key or add a peft_config")
        built["quantize_frozen"] = "int8"
        note(f"model.{LOAD_IN_8BIT}: true: the blocks' frozen weights are kept in int8 with a scale per column "
             f"(quantize_frozen: int8; bitsandbytes' LLM.int8() differs in the last digits)")
    weights = ""
    if pretrained and not doc.get("load_path"):
        doc["load_path"] = folder
        weights = " and starts from its weights (load_path)"
    elif pretrained:
        weights = f"; load_path {doc['load_path']} gives the weights"
    note(f"model.name: {model.get('name')!r}: jaxtrain builds the MPT that {path} describes{weights}")

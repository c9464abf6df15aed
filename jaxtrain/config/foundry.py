"""LLM Foundry compatibility: map a Foundry training YAML onto jaxtrain's schema.

A Foundry pretrain YAML loads with only its data paths changed. Every Foundry key jaxtrain has
no use for is either dropped with a one-line notice, or, when its value would change the
model's math in a way jaxtrain does not implement, rejected with a ConfigError. A key whose
value is the one that changes nothing (``fused_qkv: true``, ``qk_gn: false``, ...) is dropped
quietly, because nothing is lost. Nothing else is dropped.

Values keep Foundry's meaning: a bare integer duration counts epochs, as Composer reads it
(with a notice), and ``fsdp_config.activation_checkpointing: true`` is ``model.remat: full``.
What jaxtrain cannot build (Hugging Face models, mixture-of-experts layers, Hub or streaming
fine-tuning data, Foundry's eval.py configs) is refused in one line that says what to do.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from jaxtrain.config.foundry_data import first_loader, map_loader
from jaxtrain.config.foundry_hf import local_folder, map_hf_model
from jaxtrain.config.peft import PEFT_NO_EFFECT, PEFT_OFF_VALUES
from jaxtrain.config.schema import ConfigError, ModelConfig

Note = Callable[[str], None]
Where = Callable[[str], str]

# Top-level keys of Foundry's older YAMLs that are variables, not settings.
LEGACY_VARIABLES = ("data_local", "data_remote", "global_seed", "icl_max_seq_len")
# Composer's trainer reads a bare integer at these keys as a number of epochs.
EPOCH_INTEGER_KEYS = ("max_duration", "eval_interval", "save_interval", "console_log_interval")

CALLBACKS = ("speed_monitor", "lr_monitor", "memory_monitor", "runtime_estimator")
LOGGERS = ("tensorboard", "jsonl")
TELEMETRY_LOGGERS = ("wandb", "mlflow", "comet_ml", "neptune", "mosaicml")
FOUNDRY_ATTN_IMPLS = ("torch", "flash", "triton")

_NO_MEANING = {
    "fsdp_config": "sharding comes from 'parallelism'",
    "parallelism_config": "sharding comes from 'parallelism'",
    "tp_config": "sharding comes from 'parallelism'",
    "dist_timeout": "jax.distributed keeps its own timeouts",
    "code_paths": "jaxtrain imports no user code from the config",
    "max_split_size_mb": "a CUDA allocator setting",
    "expandable_segments": "a CUDA allocator setting",
    "cuda_load_lazy": "a CUDA setting",
    "compile_config": "every train step is compiled by XLA",
    "profiler": "use jax.profiler",
    "log_config": "the resolved config is always written to run_folder",
    "device_train_batch_size": "it is derived from global_train_batch_size",
    "device_eval_microbatch_size": "eval batches are not split",
    "n_gpus": "device count comes from JAX",
    "device_train_grad_accum": "it is derived from device_train_microbatch_size",
    "save_weights_only": "checkpoints always hold the full train state",
    "save_filename": "Orbax names checkpoint folders by step",
    "save_latest_filename": "Orbax names checkpoint folders by step",
    "save_ignore_keys": "checkpoints always hold the full train state",
    "load_strict_model_weights": "weights must always match the model",
    "load_ignore_keys": "weights must always match the model",
    "spin_dataloaders": "the loader resumes at its exact position",
    "train_subset_num_batches": "use max_duration",
    "flatten_metadata": "metadata is stored as given with the resolved config",
    "only_hf_checkpoint": "checkpoints are Orbax train states; `jaxtrain convert --to hf` exports one",
    "only_composer_checkpoint": "checkpoints are Orbax train states; `jaxtrain convert --to hf` exports one",
}

# Foundry model/attention/FFN keys jaxtrain does not model: (value that changes nothing, action
# for any other value: "notice" when the math is the same, "error" when it is not).
_MODEL_KEYS = {
    "fc_type": (None, "notice"),
    "verbose": (None, "notice"),
    "use_pad_tok_in_ffn": (True, "notice"),
    "embedding_fraction": (1.0, "error"),
    "final_logit_softcapping": (None, "error"),
    "block_overrides": (None, "error"),
    "use_train_metrics": (True, "notice"),
    "additional_train_metrics": (None, "notice"),
    "additional_eval_metrics": (None, "notice"),
}
_ATTN_KEYS = {
    "fused_qkv": (True, "notice"),
    "qk_gn": (False, "error"),
    "attn_logit_softcapping": (None, "error"),
    "kv_dim": (None, "error"),
    "flex_attn_mod_list": ([], "error"),
    "flex_attn_config": (None, "error"),
    "nope": (False, "error"),
    "rope_theta": ("*", "notice"),
    "rope_impl": ("*", "notice"),
    "rope_dail_config": ("*", "notice"),
    "rope_hf_config": ("*", "notice"),
}
_FFN_KEYS = {"fc_type": (None, "notice"), "ffn_hidden_size": (None, "error")}
_INIT_KEYS = {"emb_init_uniform_lim": (None, "error")}
_OPTIMIZER_KEYS = {"amsgrad": (False, "error")}
# Foundry's feed-forward types jaxtrain does not build (it builds mptmlp and mptglu).
_UNSUPPORTED_FFN_TYPES = {
    "mb_moe": "MegaBlocks mixture of experts",
    "mb_dmoe": "MegaBlocks dropless mixture of experts",
    "te_ln_mlp": "Transformer Engine's fused LayerNorm and MLP",
}
# Hugging Face's packaged dataset builders other than json: files jaxtrain cannot read as they are.
_NOTICES = {
    "fc_type": "jaxtrain's linear layers need no Transformer Engine: precision amp_fp8 takes their products in fp8",
}
# Older Foundry YAMLs put the init options on the model itself.
_MODEL_INIT_KEYS = {
    "param_init_fn": "name", "init_std": "init_std", "emb_init_std": "emb_init_std",
    "init_nonlinearity": "init_nonlinearity", "init_div_is_residual": "init_div_is_residual",
    "fan_mode": "fan_mode",
}


def hoist_legacy_variables(doc: dict, config_keys: set[str], references: set[str], overridden: set[str]) -> None:
    """Move Foundry's older top-level variables (``data_local: ...`` used as ``${data_local}``)
    under ``variables``, in place, and take ``seed`` from ``global_seed`` when it is not set.
    Runs before interpolation, on the document as YAML built it; a top-level key that is not a
    setting counts as a variable when the document references it by name, or when it only holds
    a YAML anchor that other sections use (``dataset: &hf_dataset {...}`` merged elsewhere with
    ``<<: *hf_dataset``). A ``--set`` of the top-level name wins over the ``variables`` entry;
    otherwise the ``variables`` entry wins."""
    referenced = {r.split(".")[0] for r in references}
    variables = doc.get("variables")
    if variables is None:
        variables = doc["variables"] = {}
    if not isinstance(variables, dict):
        return  # the typed build reports 'variables' as not a mapping
    for name in list(doc):
        if name in config_keys or not isinstance(name, str):
            continue
        if name in LEGACY_VARIABLES or name in referenced or _anchor_holder(doc, name):
            value = doc.pop(name)
            if name in overridden or name not in variables:
                variables[name] = value
    if "seed" not in doc and "global_seed" in variables:
        doc["seed"] = "${variables.global_seed}"


def _anchor_holder(doc: dict, name: str) -> bool:
    """Whether top-level ``doc[name]`` is a YAML anchor used elsewhere in ``doc``: the same
    object aliased (``*name``), or a mapping whose every value is the very object found under the
    same key of another mapping (a ``<<: *name`` merge). Only values YAML builds as objects of
    their own (mappings, lists, floats, strings longer than a character) tell a merge apart from
    two equal small integers."""
    held = doc[name]
    if not isinstance(held, (dict, list)) or not held:
        return False

    def distinct(value: Any) -> bool:
        return isinstance(value, (dict, list, float)) or (isinstance(value, str) and len(value) > 1)

    def found(node: Any) -> bool:
        if node is held:
            return True
        if isinstance(node, dict):
            if (isinstance(held, dict) and any(distinct(v) for v in held.values())
                    and all(key in node and node[key] is value for key, value in held.items())):
                return True
            return any(found(child) for child in node.values())
        if isinstance(node, list):
            return any(found(child) for child in node)
        return False

    return any(found(value) for key, value in doc.items() if key != name)


def map_foundry(doc: dict, note: Note, where: Where) -> dict:
    """Rewrite an interpolated document from Foundry's vocabulary to jaxtrain's, in place."""
    if isinstance(doc.get("models"), list):
        raise ConfigError(f"{where('models')}: models: this is a Foundry eval.py config (a list of models to "
                          f"evaluate), not a training config; evaluate a checkpoint with `jaxtrain eval --checkpoint "
                          f"DIR --tasks FILE`, FILE holding the icl_tasks list (and eval_gauntlet)")
    fsdp = doc.get("fsdp_config")
    for name, why in _NO_MEANING.items():
        if name in doc:
            doc.pop(name)
            note(f"{name}: no meaning in jaxtrain ({why}); ignored")
    if isinstance(fsdp, dict) and fsdp.get("activation_checkpointing") is True:
        model = doc.get("model")
        if model is None:
            model = doc["model"] = {}
        if isinstance(model, dict) and "remat" not in model:
            model["remat"] = "full"
            note("fsdp_config.activation_checkpointing: true recomputes each block in the backward pass: "
                 "model.remat: full")
    _map_trainer_keys(doc, note, where)
    for name in ("eval_loaders",):
        if name in doc:
            doc["eval_loader"] = doc.pop(name)
    if isinstance(doc.get("model"), dict):
        folder = local_folder(doc["model"]) if doc["model"].get("name", "mpt_causal_lm") != "mpt_causal_lm" else None
        if folder is not None:  # Foundry's hf_causal_lm on a local MPT folder
            map_hf_model(doc, folder, note, where)
        _map_model(doc["model"], note, where)
    for name in ("train_loader", "eval_loader"):
        if isinstance(doc.get(name), list):
            doc[name] = first_loader(doc[name], name, note)
        if isinstance(doc.get(name), dict):
            map_loader(doc[name], name, note, where)
    if isinstance(doc.get("optimizer"), dict):
        _drop_keys(doc["optimizer"], "optimizer", _OPTIMIZER_KEYS, note, where)
    if isinstance(doc.get("loggers"), dict):
        _map_loggers(doc["loggers"], note)
    if isinstance(doc.get("callbacks"), dict):
        _keep_known(doc["callbacks"], "callbacks", CALLBACKS, note)
    if isinstance(doc.get("algorithms"), dict):
        _keep_known(doc["algorithms"], "algorithms", ("gradient_clipping", "ema"), note, typo_is_error=True)
    return doc


def _map_trainer_keys(doc: dict, note: Note, where: Where) -> None:
    """Composer trainer settings whose Foundry meaning differs from a plain reading: durations
    given as bare integers (epochs), gradient accumulation, and what ``load_path`` restores."""
    for key in EPOCH_INTEGER_KEYS:
        value = doc.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            continue  # 0 disables an interval in any unit; anything else is checked when typed
        if key == "eval_interval" and not doc.get("eval_loader") and not doc.get("eval_loaders"):
            continue  # no held-out evaluation: the interval has no effect
        doc[key] = f"{value}ep"
        note(f"{key}: {value} is {value} epoch{'s' if value != 1 else ''}, as Composer reads a bare integer "
             f"(write {value}ba for batches)")
    if "accumulate_train_batch_on_tokens" in doc:
        if doc.pop("accumulate_train_batch_on_tokens") is False:
            raise ConfigError(f"{where('accumulate_train_batch_on_tokens')}: accumulate_train_batch_on_tokens: false "
                              f"(each microbatch's mean loss weighted alike) is not supported: jaxtrain weights every "
                              f"target token of the global batch alike (Foundry's default, true); remove the key")
    weights_only = doc.pop("load_weights_only", None)
    if doc.get("load_path") and weights_only is not True:
        note("load_path: loads the weights only (a fresh optimizer and schedule from step 0, as Foundry's "
             "load_weights_only: true); to continue a run, set save_folder and autoresume: true")


def _map_model(model: dict, note: Note, where: Where) -> None:
    name = model.get("name", "mpt_causal_lm")
    if name != "mpt_causal_lm" and (str(name).startswith("hf_") or "pretrained_model_name_or_path" in model):
        source = model.get("pretrained_model_name_or_path")
        lora = " (model.peft_config then trains LoRA adapters on them)" if "peft_config" in model else ""
        raise ConfigError(f"{where('model.name')}: model.name: {name!r}"
                          f"{f' ({source})' if source else ''} is a Hugging Face model, which jaxtrain does not build: "
                          f"it trains MPT (mpt_causal_lm); for MPT weights, set pretrained_model_name_or_path to a "
                          f"local folder holding its config.json and safetensors{lora}")
    if isinstance(model.get("peft_config"), dict):
        _map_peft(model["peft_config"], where)
    _drop_keys(model, "model", _MODEL_KEYS, note, where)
    d_model, n_heads = model.get("d_model", ModelConfig.d_model), model.get("n_heads", ModelConfig.n_heads)
    if "head_dim" in model:
        head_dim = model.pop("head_dim")
        if head_dim is not None and not (isinstance(n_heads, int) and n_heads and head_dim * n_heads == d_model):
            raise ConfigError(f"{where('model.head_dim')}: model.head_dim: {head_dim!r} is not d_model / n_heads "
                              f"({d_model} / {n_heads}), which jaxtrain's attention always uses; remove the key")
    if "attention_bias" in model:
        bias = model.pop("attention_bias")
        if bias is not None and bias != (not model.get("no_bias", ModelConfig.no_bias)):
            raise ConfigError(f"{where('model.attention_bias')}: model.attention_bias: {bias!r} differs from no_bias: "
                              f"{model.get('no_bias', ModelConfig.no_bias)!r}, and jaxtrain gives the attention's "
                              f"projections biases exactly when the other layers have them; remove the key")
    for old, new in _MODEL_INIT_KEYS.items():
        if old in model:
            init = model.setdefault("init_config", {}) or {}
            model["init_config"] = init
            init.setdefault(new, model.pop(old))
    init = model.get("init_config")
    if isinstance(init, dict):
        _drop_keys(init, "model.init_config", _INIT_KEYS, note, where)
        gain = init.pop("init_gain", None)
        # torch's kaiming_normal_ takes init_gain as leaky_relu's negative slope; other gains ignore it
        if gain and init.get("init_nonlinearity", "relu") == "leaky_relu":
            raise ConfigError(f"{where('model.init_config.init_gain')}: model.init_config.init_gain: {gain!r} "
                              f"(a leaky_relu slope) is not supported by jaxtrain; remove the key or set it to 0")
    if model.get("init_device") in ("meta", "mixed"):
        note(f"model.init_device: '{model['init_device']}' has no meaning in jaxtrain "
             "(parameters are created already sharded); accepted")
    attn = model.get("attn_config")
    if isinstance(attn, dict):
        _drop_keys(attn, "model.attn_config", _ATTN_KEYS, note, where)
        tuning = attn.pop("attn_temperature_tuning", None)
        if isinstance(tuning, dict) and tuning.get("attn_scale", 0.0):
            key = "model.attn_config.attn_temperature_tuning"
            raise ConfigError(f"{where(key)}: {key}.attn_scale: {tuning['attn_scale']!r} is not supported by "
                              f"jaxtrain; remove the key or set attn_scale to 0")
        impl = attn.get("attn_impl")
        if impl in FOUNDRY_ATTN_IMPLS:
            attn["attn_impl"] = "xla"
            note(f"model.attn_config.attn_impl: '{impl}' is a PyTorch kernel; using 'xla'")
    ffn = model.get("ffn_config")
    if isinstance(ffn, dict):
        ffn_type = ffn.get("ffn_type")
        if ffn_type in _UNSUPPORTED_FFN_TYPES:
            raise ConfigError(f"{where('model.ffn_config.ffn_type')}: model.ffn_config.ffn_type: {ffn_type!r} "
                              f"({_UNSUPPORTED_FFN_TYPES[ffn_type]}) is not supported by jaxtrain; "
                              f"use mptmlp or mptglu")
        hidden = ffn.get("ffn_hidden_size")
        ratio = model.get("expansion_ratio", ModelConfig.expansion_ratio)
        if hidden is not None and isinstance(d_model, int) and hidden == d_model * ratio:
            ffn.pop("ffn_hidden_size")
        _drop_keys(ffn, "model.ffn_config", _FFN_KEYS, note, where)


def _map_peft(peft: dict, where: Where) -> None:
    """PEFT ``LoraConfig`` keys beyond jaxtrain's schema: those without effect here are dropped, and
    those asking for what jaxtrain's LoRA does not implement are refused."""
    for key in [key for key in peft if key in PEFT_NO_EFFECT]:
        peft.pop(key)
    for key in [key for key in peft if key in PEFT_OFF_VALUES]:
        value = peft.pop(key)
        if value not in PEFT_OFF_VALUES[key]:
            raise ConfigError(f"{where(f'model.peft_config.{key}')}: model.peft_config.{key}: {value!r} is not "
                              f"supported by jaxtrain's LoRA; remove the key")


def _drop_keys(section: dict, prefix: str, table: dict, note: Note, where: Where) -> None:
    for name, (harmless, action) in table.items():
        if name not in section:
            continue
        value = section.pop(name)
        key = f"{prefix}.{name}"
        if harmless == "*" or value == harmless:
            continue
        if action == "error":
            raise ConfigError(
                f"{where(key)}: {key}: {value!r} is not supported by jaxtrain; remove the key "
                f"or set it to {harmless!r}"
            )
        why = _NOTICES.get(name, "Foundry option with no effect on jaxtrain's math")
        note(f"{key}: {why}; ignored")


def _map_loggers(loggers: dict, note: Note) -> None:
    for name in list(loggers):
        if name in TELEMETRY_LOGGERS:
            loggers.pop(name)
            note(f"loggers.{name}: jaxtrain sends no telemetry; dropped (tensorboard and jsonl log locally)")
        elif name == "console":
            loggers.pop(name)
            note("loggers.console: the console logger is always on; dropped")
    _keep_known(loggers, "loggers", LOGGERS, note)


def _keep_known(section: dict, prefix: str, known: tuple[str, ...], note: Note, typo_is_error: bool = False) -> None:
    for name in list(section):
        if name in known:
            continue
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.75)
        if close and typo_is_error:
            continue  # left in place: the typed build reports it as an unknown key with the suggestion
        section.pop(name)
        hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"
        note(f"{prefix}.{name}: not supported by jaxtrain; dropped{hint}")

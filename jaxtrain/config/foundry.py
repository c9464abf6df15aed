"""LLM Foundry compatibility: map a Foundry training YAML onto jaxtrain's schema.

A Foundry pretrain YAML loads with only its data paths changed. Every Foundry key jaxtrain has
no use for is either dropped with a one-line notice, or, when its value would change the
model's math in a way jaxtrain does not implement, rejected with a ConfigError. A key whose
value is the one that changes nothing (``fused_qkv: true``, ``qk_gn: false``, ...) is dropped
quietly, because nothing is lost. Nothing else is dropped.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from typing import Any

from jaxtrain.config.schema import ConfigError

Note = Callable[[str], None]
Where = Callable[[str], str]

# Top-level keys of Foundry's older YAMLs that are variables, not settings.
LEGACY_VARIABLES = ("data_local", "data_remote", "global_seed")

CALLBACKS = ("speed_monitor", "lr_monitor", "memory_monitor", "runtime_estimator")
LOGGERS = ("tensorboard", "jsonl")
TELEMETRY_LOGGERS = ("wandb", "mlflow", "comet_ml", "neptune", "mosaicml")
FOUNDRY_ATTN_IMPLS = ("torch", "flash", "triton")

# Streaming's StreamingDataset options (and Foundry's text-dataset extras): kept in dataset.extra.
STREAMING_OPTIONS = (
    "download_retry", "download_timeout", "validate_hash", "keep_zip", "epoch_size", "predownload",
    "cache_limit", "partition_algo", "num_canonical_nodes", "batch_size", "shuffle_algo",
    "shuffle_block_size", "sampling_method", "sampling_granularity", "batching_method",
    "allow_unsafe_types", "replication", "stream_name", "stream_config", "bos_token_id",
    "token_encoding_type",
)

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
    "load_weights_only": "load_path always loads weights only (use autoresume to continue a run)",
    "load_strict_model_weights": "weights must always match the model",
    "load_ignore_keys": "weights must always match the model",
    "spin_dataloaders": "the loader resumes at its exact position",
    "train_subset_num_batches": "use max_duration",
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
}
_ATTN_KEYS = {
    "fused_qkv": (True, "notice"),
    "qk_gn": (False, "error"),
    "attn_logit_softcapping": (None, "error"),
    "kv_dim": (None, "error"),
    "flex_attn_mod_list": ([], "error"),
    "flex_attn_config": (None, "error"),
    "rope_theta": ("*", "notice"),
    "rope_impl": ("*", "notice"),
    "rope_dail_config": ("*", "notice"),
    "rope_hf_config": ("*", "notice"),
}
_FFN_KEYS = {"fc_type": (None, "notice"), "ffn_hidden_size": (None, "error")}
# What a notice says about a key when the generic "no effect on the math" says too little.
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
    Runs before interpolation; a top-level key that is not a setting counts as a variable when
    the document references it by name. A ``--set`` of the top-level name wins over the
    ``variables`` entry; otherwise the ``variables`` entry wins."""
    referenced = {r.split(".")[0] for r in references}
    variables = doc.get("variables")
    if variables is None:
        variables = doc["variables"] = {}
    if not isinstance(variables, dict):
        return  # the typed build reports 'variables' as not a mapping
    for name in list(doc):
        if name in config_keys or not isinstance(name, str):
            continue
        if name in LEGACY_VARIABLES or name in referenced:
            value = doc.pop(name)
            if name in overridden or name not in variables:
                variables[name] = value
    if "seed" not in doc and "global_seed" in variables:
        doc["seed"] = "${variables.global_seed}"


def map_foundry(doc: dict, note: Note, where: Where) -> dict:
    """Rewrite an interpolated document from Foundry's vocabulary to jaxtrain's, in place."""
    for name, why in _NO_MEANING.items():
        if name in doc:
            doc.pop(name)
            note(f"{name}: no meaning in jaxtrain ({why}); ignored")
    for name in ("eval_loaders",):
        if name in doc:
            doc["eval_loader"] = doc.pop(name)
    if isinstance(doc.get("model"), dict):
        _map_model(doc["model"], note, where)
    for name in ("train_loader", "eval_loader"):
        if isinstance(doc.get(name), list):
            doc[name] = _first_loader(doc[name], name, note)
        if isinstance(doc.get(name), dict):
            _map_loader(doc[name], name, note, where)
    if isinstance(doc.get("loggers"), dict):
        _map_loggers(doc["loggers"], note)
    if isinstance(doc.get("callbacks"), dict):
        _keep_known(doc["callbacks"], "callbacks", CALLBACKS, note)
    if isinstance(doc.get("algorithms"), dict):
        _keep_known(doc["algorithms"], "algorithms", ("gradient_clipping",), note, typo_is_error=True)
    return doc




def _map_model(model: dict, note: Note, where: Where) -> None:
    _drop_keys(model, "model", _MODEL_KEYS, note, where)
    for old, new in _MODEL_INIT_KEYS.items():
        if old in model:
            init = model.setdefault("init_config", {}) or {}
            model["init_config"] = init
            init.setdefault(new, model.pop(old))
    if model.get("init_device") in ("meta", "mixed"):
        note(f"model.init_device: '{model['init_device']}' has no meaning in jaxtrain "
             "(parameters are created already sharded); accepted")
    attn = model.get("attn_config")
    if isinstance(attn, dict):
        _drop_keys(attn, "model.attn_config", _ATTN_KEYS, note, where)
        impl = attn.get("attn_impl")
        if impl in FOUNDRY_ATTN_IMPLS:
            attn["attn_impl"] = "xla"
            note(f"model.attn_config.attn_impl: '{impl}' is a PyTorch kernel; using 'xla'")
    ffn = model.get("ffn_config")
    if isinstance(ffn, dict):
        hidden = ffn.get("ffn_hidden_size")
        ratio = model.get("expansion_ratio", 4)
        if hidden is not None and isinstance(model.get("d_model"), int) and hidden == model["d_model"] * ratio:
            ffn.pop("ffn_hidden_size")
        _drop_keys(ffn, "model.ffn_config", _FFN_KEYS, note, where)


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


def _first_loader(loaders: list, name: str, note: Note) -> Any:
    if not loaders:
        return None
    if len(loaders) > 1:
        labels = ", ".join(str(loader.get("label", i)) for i, loader in enumerate(loaders) if isinstance(loader, dict))
        note(f"{name}: jaxtrain evaluates one loader; using the first of [{labels}]")
    return loaders[0]


def _map_loader(loader: dict, name: str, note: Note, where: Where) -> None:
    label = loader.pop("label", None)
    if label is not None and name == "train_loader":
        note(f"{name}.label: only eval loaders have labels; ignored")
    dataset = loader.get("dataset")
    if not isinstance(dataset, dict):
        return
    if loader.get("name") == "finetuning":
        _map_finetuning(dataset, f"{name}.dataset", note, where)
        return
    if "source" not in dataset and (dataset.get("local") or dataset.get("remote") or dataset.get("streams")):
        dataset["source"] = "mds"
    kept = [key for key in dataset if key in STREAMING_OPTIONS]
    if kept:
        extra = dataset.get("extra") or {}
        for key in kept:
            extra[key] = dataset.pop(key)
        dataset["extra"] = extra
        note(f"{name}.dataset: Streaming options {', '.join(kept)} kept in dataset.extra for the MDS reader")


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


def _map_finetuning(dataset: dict, prefix: str, note: Note, where: Where) -> None:
    """Foundry's ``finetuning`` loader: local JSONL/JSON files of prompt/response or chat examples."""
    dataset.setdefault("source", "finetune_jsonl")
    for key in ("pad_to_longest", "max_leftover_bins_to_keep"):
        if key in dataset:
            dataset.pop(key)
            note(f"{prefix}.{key}: rows always have max_seq_len tokens and no example is dropped; ignored")
    if dataset.get("preprocessing_fn"):
        raise ConfigError(f"{where(prefix + '.preprocessing_fn')}: {prefix}.preprocessing_fn: jaxtrain runs no "
                          f"Python preprocessing; write the examples as prompt/response or messages JSONL and set "
                          f"{prefix}.local")
    dataset.pop("preprocessing_fn", None)
    hf_name, hf_kwargs = dataset.pop("hf_name", None), dataset.pop("hf_kwargs", None) or {}
    if hf_name is None:
        return
    if "local" in dataset:
        raise ConfigError(f"{where(prefix + '.hf_name')}: {prefix}: give hf_name or local, not both")
    if hf_name == "json":
        files = hf_kwargs.get("data_files") if isinstance(hf_kwargs, dict) else None
        split = dataset.get("split", "train")
        if isinstance(files, dict):
            files = files.get(split)
        if isinstance(files, list) and len(files) == 1:
            files = files[0]
        if not isinstance(files, str):
            raise ConfigError(f"{where(prefix + '.hf_kwargs')}: {prefix}.hf_kwargs.data_files: give one file, "
                              f"folder or glob for split {split!r} (or set {prefix}.local instead)")
        dataset["local"] = files
    elif os.path.exists(os.path.expanduser(str(hf_name))):
        dataset["local"] = hf_name
    else:
        raise ConfigError(f"{where(prefix + '.hf_name')}: {prefix}.hf_name: {hf_name!r} is not a local path; "
                          f"jaxtrain downloads no datasets: save it as JSONL (prompt/response or messages) and set "
                          f"{prefix}.local")
    if hf_kwargs and hf_name != "json":
        note(f"{prefix}.hf_kwargs: read from the local files as they are; ignored")

"""LLM Foundry's data loader sections (``train_loader``, ``eval_loader``) mapped onto jaxtrain's:
Streaming's MDS options kept for the MDS reader, and the ``finetuning`` loader's local files."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from jaxtrain.config.schema import ConfigError

Note = Callable[[str], None]
Where = Callable[[str], str]

# Streaming's StreamingDataset options (and Foundry's text-dataset extras): kept in dataset.extra.
STREAMING_OPTIONS = (
    "download_retry", "download_timeout", "validate_hash", "keep_zip", "epoch_size", "predownload",
    "cache_limit", "partition_algo", "num_canonical_nodes", "batch_size", "shuffle_algo",
    "shuffle_block_size", "sampling_method", "sampling_granularity", "batching_method",
    "allow_unsafe_types", "replication", "stream_name", "stream_config",
    "token_encoding_type",
)

_HF_FILE_BUILDERS = ("csv", "parquet", "text", "arrow", "pandas")
# What a notice says about a key when the generic "no effect on the math" says too little.

def first_loader(loaders: list, name: str, note: Note) -> Any:
    if not loaders:
        return None
    if len(loaders) > 1:
        labels = ", ".join(str(loader.get("label", i)) for i, loader in enumerate(loaders) if isinstance(loader, dict))
        note(f"{name}: jaxtrain evaluates one loader; using the first of [{labels}]")
    return loaders[0]


def map_loader(loader: dict, name: str, note: Note, where: Where) -> None:
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
    for key in ("override_eos_token_id_mismatch_error", "override_bos_token_id_mismatch_error"):
        if key in dataset:  # Foundry's leave to differ from the tokenizer's id: jaxtrain takes the ids as given
            dataset.pop(key)
            note(f"{name}.dataset.{key}: jaxtrain uses eos_token_id / bos_token_id as given; ignored")
    kept = [key for key in dataset if key in STREAMING_OPTIONS]
    if kept:
        extra = dataset.get("extra") or {}
        for key in kept:
            extra[key] = dataset.pop(key)
        dataset["extra"] = extra
        note(f"{name}.dataset: Streaming options {', '.join(kept)} kept in dataset.extra for the MDS reader")


def _map_finetuning(dataset: dict, prefix: str, note: Note, where: Where) -> None:
    """Foundry's ``finetuning`` loader: local JSONL/JSON files of prompt/response or chat examples."""
    dataset.setdefault("source", "finetune_jsonl")
    streaming = [key for key in ("remote", "streams") if dataset.get(key)]
    if streaming:
        key = f"{prefix}.{streaming[0]}"
        raise ConfigError(f"{where(key)}: {key}: Foundry's streaming fine-tuning data (MDS shards) is not read by "
                          f"jaxtrain; save the examples as prompt/response or messages JSONL and set {prefix}.local")
    for key in ("pad_to_longest", "max_leftover_bins_to_keep"):
        if key in dataset:
            dataset.pop(key)
            note(f"{prefix}.{key}: rows always have max_seq_len tokens and no example is dropped; ignored")
    dataset.pop("safe_load", None)  # jaxtrain runs no code from a dataset, whatever its value
    if "auto_packing_replication" in dataset:
        dataset.pop("auto_packing_replication")
        note(f"{prefix}.auto_packing_replication: packing_ratio auto is profiled on all the examples; ignored")
    replication = dataset.pop("seq_parallel_replication", None)
    if replication not in (None, 1):
        key = f"{prefix}.seq_parallel_replication"
        raise ConfigError(f"{where(key)}: {key}: {replication!r} is not supported by jaxtrain (no sequence "
                          f"parallelism); remove the key or set it to 1")
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
    kwargs = hf_kwargs if isinstance(hf_kwargs, dict) else {}
    if hf_name == "json":
        # Hugging Face's json builder: data_files (per split, relative to data_dir) or a data_dir of split files
        files, folder = kwargs.get("data_files"), kwargs.get("data_dir")
        split = dataset.get("split", "train")
        if isinstance(files, dict):
            files = files.get(split)
        if isinstance(files, list) and len(files) == 1:
            files = files[0]
        if files is None and isinstance(folder, str):
            dataset["local"] = folder
        elif isinstance(files, str):
            dataset["local"] = os.path.join(folder, files) if isinstance(folder, str) else files
        else:
            raise ConfigError(f"{where(prefix + '.hf_kwargs')}: {prefix}.hf_kwargs.data_files: give one file, "
                              f"folder or glob for split {split!r}, or data_dir (or set {prefix}.local instead)")
        others = sorted(str(key) for key in kwargs if key not in ("data_files", "data_dir"))
        if others:
            note(f"{prefix}.hf_kwargs: {', '.join(others)}: the JSONL files are read as they are; ignored")
        return
    if hf_name in _HF_FILE_BUILDERS:
        raise ConfigError(f"{where(prefix + '.hf_name')}: {prefix}.hf_name: {hf_name!r} files are not read by "
                          f"jaxtrain, which reads JSONL: convert them to prompt/response or messages JSONL and set "
                          f"{prefix}.local")
    if os.path.exists(os.path.expanduser(str(hf_name))):
        dataset["local"] = hf_name
    else:
        raise ConfigError(f"{where(prefix + '.hf_name')}: {prefix}.hf_name: {hf_name!r} is not a local path; "
                          f"jaxtrain downloads no datasets: save it as JSONL (prompt/response or messages) and set "
                          f"{prefix}.local")
    if hf_kwargs:
        note(f"{prefix}.hf_kwargs: read from the local files as they are; ignored")

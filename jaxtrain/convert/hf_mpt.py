"""Hugging Face MPT folders <-> jaxtrain checkpoints, streamed tensor by tensor.

A Hugging Face MPT folder holds ``config.json`` in MosaicML's format and ``model.safetensors``
(or shards listed in ``model.safetensors.index.json``). Names and layouts::

    transformer.wte.weight                 [vocab, d_model]      wte/embedding (same layout)
    transformer.wpe.weight                 [max_seq_len, d]      wpe/embedding
    transformer.blocks.{i}.<module>.weight [out, in]             blocks/<module>/kernel [in, out]
    transformer.blocks.{i}.<norm>.weight   [d]                   blocks/<norm>/scale
    transformer.blocks.{i}.<module>.bias                         blocks/<module>/bias
    transformer.norm_f.{weight,bias}                             norm_f/{scale,bias}
    lm_head.weight                         [vocab, d_model]      lm_head/kernel [d_model, vocab]

LLM Foundry's training checkpoints prefix every name with ``model.``. Block leaves are stacked
with a leading ``[n_layers]`` axis when ``scan_layers`` is on; the checkpoint meta records which.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterator

import numpy as np

from jaxtrain.config import Config, ConfigError, config_to_dict
from jaxtrain.config.schema import ModelConfig
from jaxtrain.convert.hf_config import (  # noqa: F401 - transformers_mpt_gaps: part of this module's interface
    hf_config_from_model,
    model_config_from_hf,
    transformers_mpt_gaps,
)
from jaxtrain.convert.folders import CONFIG_FILE, check_new_folder, is_hf_folder, read_json_object
from jaxtrain.convert.safetensors_io import SafetensorsWriter, open_safetensors_folder, parse_size
from jaxtrain.data.tokenizer import TOKENIZER_FILE, TOKENIZER_FILES

FOUNDRY_PREFIX = "model."
# ----------------------------------------------------------------------------- names


def hf_name(path: tuple) -> tuple[str, bool]:
    """(Hugging Face name, whether the tensor is transposed) of one per-layer jaxtrain leaf path.

    ``path`` is the parameter path with an integer layer index after ``blocks``.
    """
    *modules, leaf = (str(part) for part in path)
    transpose = leaf == "kernel"
    suffix = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[leaf]
    if modules == ["lm_head"]:
        return "lm_head.weight", True
    return "transformer." + ".".join([*modules, suffix]), transpose


def tensor_plan(model_cfg: ModelConfig) -> list[tuple[tuple, int | None, str, bool, tuple[int, ...]]]:
    """Every parameter as ``(tree path, layer index or None, HF name, transposed, HF shape)``.

    The tree path is the leaf's path in the parameter state; with ``scan_layers`` the layer index
    selects a row of the stacked leaf.
    """
    from flax import nnx

    from jaxtrain.train.state import abstract_model

    _, abstract = abstract_model(model_cfg)
    plan = []
    for path, leaf in _leaves(nnx.to_pure_dict(abstract)):
        shape = tuple(leaf.shape)
        if path[0] == "blocks" and model_cfg.scan_layers:
            layers = [(i, (path[0], i, *path[1:])) for i in range(model_cfg.n_layers)]
            shape = shape[1:]
        else:
            layers = [(None, path)]
        for index, named_path in layers:
            name, transpose = hf_name(named_path)
            plan.append((path, index, name, transpose, shape[::-1] if transpose else shape))
    return plan


def _leaves(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _set(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


# ----------------------------------------------------------------------------- import


def hf_model_config(src: str, *, scan_layers: bool = True) -> ModelConfig:
    """The model config of the Hugging Face MPT folder ``src``, from its ``config.json`` alone."""
    hf = read_json_object(src, CONFIG_FILE, expected="a Hugging Face MPT folder", what="model settings")
    return model_config_from_hf(hf, source=os.path.join(src, CONFIG_FILE), scan_layers=scan_layers)


def _checked_plan(src: str, tensors, model_cfg: ModelConfig) -> tuple[str, list]:
    """(name prefix, ``tensor_plan``) of the open folder ``tensors`` after checking, from the files'
    headers alone, that it holds exactly the tensors ``model_cfg`` has, in their shapes."""
    prefix = FOUNDRY_PREFIX if tensors.names and all(n.startswith(FOUNDRY_PREFIX) for n in tensors.names) else ""
    plan = tensor_plan(model_cfg)
    wanted = {name for *_, name, _, _ in plan}
    present = {name[len(prefix):] for name in tensors.names}
    missing = sorted(wanted - present)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(f"{src}: missing tensors {', '.join(prefix + m for m in missing[:3])}{more} "
                          f"(config.json describes {model_cfg.n_layers} layers, no_bias={model_cfg.no_bias})")
    unexpected = sorted(present - wanted - ({"lm_head.weight"} if model_cfg.tie_word_embeddings else set()))
    if unexpected:
        raise ConfigError(f"{src}: tensor {prefix + unexpected[0]} is not part of the model config.json describes "
                          f"({len(unexpected)} unexpected); check no_bias, qk_ln, ffn_type and tie_word_embeddings")
    for *_, name, _, hf_shape in plan:
        shape = tensors.shape(prefix + name)
        if shape != hf_shape:
            raise ConfigError(f"{tensors.file_of(prefix + name)}: tensor {prefix + name} has shape "
                              f"{list(shape)}, config.json implies {list(hf_shape)}")
    return prefix, plan


def read_hf(src: str, *, scan_layers: bool = True) -> tuple[ModelConfig, dict, set[str]]:
    """(model config, pure dict of float32 parameter arrays, the tensors' dtypes) of the Hugging Face
    MPT folder ``src``; tensors are read one at a time into the parameter buffers."""
    model_cfg = hf_model_config(src, scan_layers=scan_layers)
    with open_safetensors_folder(src) as tensors:
        prefix, plan = _checked_plan(src, tensors, model_cfg)
        buffers: dict = {}
        dtypes = set()
        for path, index, name, transpose, _ in plan:
            tensor = tensors.get(prefix + name)
            dtypes.add(str(tensor.dtype))
            value = np.asarray(tensor.T if transpose else tensor, np.float32)
            if index is None:
                _set(buffers, path, value)
            else:
                if index == 0:
                    _set(buffers, path, np.empty((model_cfg.n_layers, *value.shape), np.float32))
                _get(buffers, path)[index] = value
            del tensor, value
    return model_cfg, buffers, dtypes


def import_hf(src: str, dst: str, *, scan_layers: bool = True, adapter: str | None = None) -> ModelConfig:
    """Convert the Hugging Face MPT folder ``src`` into a jaxtrain checkpoint folder ``dst`` (step 0),
    with the PEFT LoRA adapter in folder ``adapter`` when given (``jaxtrain.convert.peft_lora``)."""
    if not os.path.isfile(os.path.join(src, CONFIG_FILE)):
        if not os.path.exists(src):
            raise ConfigError(f"{src}: no such folder; give a Hugging Face MPT folder (config.json and safetensors)")
        checkpoint = os.path.isdir(src) and any(name.isdigit() or name in ("state", "meta") for name in os.listdir(src))
        hint = "; it holds a jaxtrain checkpoint: add --to hf to export it" if checkpoint else ""
        raise ConfigError(f"{src}: no {CONFIG_FILE}; expected a Hugging Face MPT folder{hint}")
    check_new_folder(dst)  # before the tensors are read
    model_cfg, buffers, dtypes = read_hf(src, scan_layers=scan_layers)
    tokenizer = os.path.join(src, TOKENIZER_FILE)
    source = {"format": "hf_mpt", "path": os.path.abspath(src), "dtype": "/".join(sorted(dtypes))}
    if adapter is not None:
        from jaxtrain.convert.peft_lora import import_adapter

        model_cfg = import_adapter(adapter, model_cfg, buffers)
        source["adapter"] = os.path.abspath(adapter)
    save_model(dst, model_cfg, buffers, source=source, tokenizer_path=tokenizer if os.path.isfile(tokenizer) else None)
    return model_cfg


def save_model(folder: str, model_cfg: ModelConfig, params: dict, *, source: dict | None = None,
               tokenizer_path: str | None = None, step: int = 0) -> None:
    """Write ``params`` (a pure dict of arrays shaped like the model's) as a weights-only jaxtrain
    checkpoint: the ``state`` item holds ``{step, params}`` and no optimizer state, which is what
    ``load_checkpoint`` (generation, export, ``load_path``) reads."""
    from flax import nnx

    from jaxtrain.checkpoint.manager import Checkpointer
    from jaxtrain.train.state import abstract_model

    check_new_folder(folder)
    _, state = abstract_model(model_cfg)
    nnx.replace_by_pure_dict(state, params)
    weights = {"step": np.asarray(step, np.int32), "params": state}
    config = config_to_dict(Config(model=model_cfg, max_seq_len=model_cfg.max_seq_len))
    meta = {"config": config, "layout": {"scan_layers": bool(model_cfg.scan_layers), "n_layers": model_cfg.n_layers},
            "weights_only": True}
    if source:
        meta["source"] = source
    checkpointer = Checkpointer(folder, async_save=False)
    checkpointer.save(step, weights, meta, force=True)
    checkpointer.close()
    if tokenizer_path:
        copy_tokenizer(os.path.dirname(os.path.abspath(tokenizer_path)), folder)


def copy_tokenizer(src: str, dst: str) -> None:
    """Copy the tokenizer files of folder ``src`` (``tokenizer.json`` and, where present, its
    ``tokenizer_config.json`` and ``chat_template.jinja``) into folder ``dst``."""
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


# ----------------------------------------------------------------------------- export


def export_hf(src: str, dst: str, *, step: int | None = None, dtype: str | None = None,
              max_shard_size: str | int = "5GB", adapter_only: bool = False) -> ModelConfig:
    """Write the jaxtrain checkpoint ``src`` as a Hugging Face MPT folder ``dst``; returns its model
    config (``transformers_mpt_gaps`` of it says what transformers' own MPT would not compute).
    LoRA adapters are merged into the weights; with ``adapter_only``, ``dst`` is a PEFT adapter
    folder holding them alone (``jaxtrain.convert.peft_lora``).

    ``dtype`` defaults to the dtype the weights were imported in (float32 for trained models).
    """
    import ml_dtypes

    from jaxtrain.checkpoint.load import load_checkpoint

    shard_bytes = parse_size(max_shard_size)  # a bad size is refused before anything is written
    check_new_folder(dst)  # before the checkpoint is read
    loaded = load_checkpoint(src, step, frozen_weights=not adapter_only)  # adapters: not the weights they adapt
    model_cfg = loaded.model_cfg
    layout = loaded.meta.get("layout", {})
    if layout and bool(layout.get("scan_layers")) != bool(model_cfg.scan_layers):
        raise ConfigError(f"{src}: meta layout scan_layers={layout.get('scan_layers')} disagrees with "
                          f"model.scan_layers={model_cfg.scan_layers}")
    source_dtype = loaded.meta.get("source", {}).get("dtype", "float32")
    dtype = dtype or (source_dtype if source_dtype in ("float32", "bfloat16", "float16") else "float32")
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}.get(dtype)
    if np_dtype is None:
        raise ConfigError(f"--dtype {dtype}: use float32, bfloat16 or float16")
    from flax import nnx

    from jaxtrain.layers import lora

    if adapter_only:
        from jaxtrain.convert.peft_lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, adapter_entries

        if model_cfg.peft_config is None:
            raise ConfigError(f"{src}: the checkpoint has no LoRA adapters (its model has no peft_config); "
                              "export it with --to hf")
        os.makedirs(dst, exist_ok=True)
        SafetensorsWriter(dst, np.dtype(np_dtype), 0).write_single(
            ADAPTER_WEIGHTS, adapter_entries(model_cfg, nnx.to_pure_dict(loaded.params), np_dtype))
        # the Hugging Face model the adapters apply to, where the checkpoint says: the folder a
        # converted checkpoint came from, or the run's load_path when that was such a folder
        base = loaded.meta.get("source", {}).get("path") if loaded.meta.get("weights_only") else None
        load_path = (loaded.meta.get("config") or {}).get("load_path")
        record = loaded.meta.get("frozen_weights") or {}
        if base is None and record.get("path") and record.get("step") is None:  # read back from that folder
            base = record["path"]
        if base is None and isinstance(load_path, str) and os.path.isdir(load_path) and is_hf_folder(load_path):
            base = os.path.abspath(load_path)
        with open(os.path.join(dst, ADAPTER_CONFIG), "w", encoding="utf-8") as handle:
            json.dump(adapter_config(model_cfg, base_model=base), handle, indent=2)
        if loaded.tokenizer_path:
            copy_tokenizer(os.path.dirname(loaded.tokenizer_path), dst)
        return model_cfg
    os.makedirs(dst, exist_ok=True)
    params = loaded.params
    if model_cfg.peft_config is not None:  # the adapters merged in, as PEFT's merge_and_unload does
        params, model_cfg = lora.merge_adapters(params, model_cfg), lora.without_adapters(model_cfg)
    params = nnx.to_pure_dict(params)
    entries = []
    for path, index, name, transpose, hf_shape in tensor_plan(model_cfg):

        def tensor(path=path, index=index, transpose=transpose):
            value = np.asarray(_get(params, path) if index is None else _get(params, path)[index])
            return np.ascontiguousarray((value.T if transpose else value).astype(np_dtype))

        entries.append((name, hf_shape, tensor))
    SafetensorsWriter(dst, np.dtype(np_dtype), shard_bytes).write(entries)
    with open(os.path.join(dst, CONFIG_FILE), "w", encoding="utf-8") as handle:
        json.dump(hf_config_from_model(model_cfg, torch_dtype=dtype), handle, indent=2)
    if loaded.tokenizer_path:
        copy_tokenizer(os.path.dirname(loaded.tokenizer_path), dst)
    return model_cfg

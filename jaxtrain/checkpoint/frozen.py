"""LoRA checkpoints without the frozen weights.

A LoRA run (``model.peft_config``) trains small adapters on weights that never change, read once
from ``load_path``. Saving those weights in every checkpoint costs their full size each time
(about 13 GB for MPT-7B in bf16, 140 GB for 70B) for nothing the run cannot read again where it
read them, so by default such a run's checkpoints hold the adapters, their optimizer state and
average and the data position, plus a record of where the frozen weights came from: the folder
(local or in a bucket), the step of a jaxtrain checkpoint, and a fingerprint of its files.
Whatever reads the checkpoint (autoresume, rollback, ``load_path`` of another run, ``generate``,
``eval``, ``convert``) reads the frozen weights back from that folder, after checking the
fingerprint: a folder whose files have changed since is refused in one line, as the adapters
were trained on other weights.

The fingerprint of each local weight file is its size and a SHA-256 over its first and last
64 KiB and 16 spaced 4 KiB blocks: a re-saved or retrained model differs in all of them, and
taking it costs milliseconds however large the model is. In a bucket it is each file's size and
the version the store keeps of it (S3's ETag), from one listing.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from jaxtrain.config import ConfigError

RECORD_KEY = "frozen_weights"
_EDGE = 64 * 1024
_BLOCK = 4096
_BLOCKS = 16


def _remote(path: str) -> bool:
    return "://" in str(path)


def can_record(path: str | None) -> bool:
    """Whether weights read from ``path`` can be read again from a record: a local folder or a URL."""
    return bool(path) and (_remote(path) or os.path.isdir(str(path)))


def _is_hf_weight_file(name: str) -> bool:
    """Whether ``name`` (relative to a Hugging Face folder) is one its weights are read from."""
    return "/" not in name and (name.endswith(".safetensors") or name in ("config.json", "model.safetensors.index.json"))


def _weight_files(folder: str, step: int | None) -> list[str]:
    """The files the weights are read from, relative to ``folder``: a Hugging Face folder's
    ``config.json`` and safetensors files, or every file of a jaxtrain checkpoint's ``step``."""
    if step is None:
        return sorted(name for name in os.listdir(folder) if _is_hf_weight_file(name))
    root = os.path.join(folder, str(step))
    files = []
    for where, _, names in os.walk(root):
        files += [os.path.relpath(os.path.join(where, name), folder) for name in names]
    return sorted(files)


def _file_digest(path: str) -> str:
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if size <= 2 * _EDGE + _BLOCKS * _BLOCK:
            digest.update(handle.read())
        else:
            offsets = [0, size - _EDGE] + [_EDGE + i * (size - 2 * _EDGE - _BLOCK) // (_BLOCKS - 1) for i in range(_BLOCKS)]
            for offset in offsets:
                handle.seek(offset)
                digest.update(handle.read(_EDGE if offset in (0, size - _EDGE) else _BLOCK))
    return f"{size}:{digest.hexdigest()[:32]}"


def fingerprint(folder: str, step: int | None) -> dict[str, str]:
    """``{file: "size:digest"}`` for the weight files of ``folder`` (``step``: a jaxtrain checkpoint's)."""
    if _remote(folder):
        from jaxtrain.data.remote import ObjectStore

        described = ObjectStore(folder).describe("" if step is None else str(step))
        if step is None:
            described = {name: version for name, version in described.items() if _is_hf_weight_file(name)}
        return described
    return {name: _file_digest(os.path.join(folder, name)) for name in _weight_files(folder, step)}


def frozen_record(path: str, step: int | None) -> dict[str, Any]:
    """What a checkpoint without the frozen weights records of where they are: ``path`` (a Hugging
    Face folder when ``step`` is None, else a jaxtrain checkpoint folder and its step)."""
    folder = str(path).rstrip("/") if _remote(path) else os.path.abspath(path)
    return {"path": folder, "step": step, "fingerprint": fingerprint(folder, step)}


def check_record(record: dict[str, Any], where: str) -> None:
    """Refuse (``ConfigError``) when the frozen weights ``record`` names, for the checkpoint at
    ``where``, are gone or their files differ from when it was saved."""
    folder, step = record["path"], record.get("step")
    place = folder if step is None else f"{folder} (step {step})"
    todo = ("restore them there, or, if they moved, link or copy them back to that path; a checkpoint of "
            "this run saved with save_frozen_weights: true holds them itself")
    now = fingerprint(folder, step) if _remote(folder) or os.path.isdir(
        folder if step is None else os.path.join(folder, str(step))) else {}
    if not now:
        raise ConfigError(f"{where}: holds LoRA adapters only; the frozen weights they adapt, {place}, are not "
                          f"there; {todo}")
    saved = record.get("fingerprint", {})
    changed = sorted(name for name in set(now) | set(saved) if now.get(name) != saved.get(name))
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise ConfigError(f"{where}: holds LoRA adapters only; the frozen weights they adapt, {place}, have changed "
                          f"since it was saved ({changed[0]}{more} differs): the adapters were trained on other "
                          f"weights; {todo}")


def read_frozen(record: dict[str, Any], like: Any, *, scan_layers: bool, where: str) -> Any:
    """The frozen weights ``record`` names, read into the shardings and dtypes of ``like`` (the
    frozen part of a LoRA model's parameters, ``lora.split_trainable(...)[1]``), after checking
    that they are the ones the checkpoint at ``where`` was trained on."""
    from jaxtrain.checkpoint.load import load_checkpoint, load_hf_weights
    from jaxtrain.layers import lora

    check_record(record, where)
    if record.get("step") is None:
        folder = record["path"]
        if _remote(folder):
            from jaxtrain.convert.remote_hf import fetch_hf_folder

            folder = fetch_hf_folder(folder, print_fn=lambda line: None)
        return load_hf_weights(folder, like=like, scan_layers=scan_layers).params
    # a LoRA checkpoint's frozen weights are these (its adapters, read beside them, are dropped),
    # read into like's shardings (a chain of LoRA runs is followed to the weights at its root)
    params = load_checkpoint(record["path"], record["step"], like=like, adapters_beside=True).params
    return lora.split_trainable(params)[1]

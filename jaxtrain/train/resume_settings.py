"""What autoresume does with each setting that changed since a checkpoint was saved.

Every setting belongs to one class (``RESUME_KEYS``, by dotted-key prefix): a setting under which
the checkpoint would be misread (the model, the data its position points into, the train state's
structure) is refused with one line naming it (``refuse_to_resume``); the other settings that
change the numbers are listed in one notice line; the rest (names, folders, logging, evaluation,
rehearsed faults) are not mentioned. ``check_resume_before_build`` applies the refusals before a
run is built, so a mistake costs seconds, not a compile.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax

from jaxtrain.checkpoint.load import few
from jaxtrain.checkpoint.orbax_reads import discard_abandoned_reads, read_only_manager
from jaxtrain.config import ConfigError, config_to_dict, load_config_dict

# What autoresume does with a setting whose value differs from the checkpoint's:
REFUSE_MODEL = "refuse:model"  # the checkpoint's weights are another model's: one-line error
REFUSE_DATA = "refuse:data"  # the checkpoint's data position would point at other samples: one-line error
REFUSE_STATE = "refuse:state"  # the checkpoint's train state is built for the other value: one-line error
NOTICE = "notice"  # continue with the config's value, listed in one notice line (the numbers change)
IGNORE = "ignore"  # cannot change the numbers (names, folders, logging, evaluation, faults): not mentioned

_WHY = {
    REFUSE_MODEL: "its weights are for the model it was saved with",
    REFUSE_DATA: "its data position would point at other samples",
    REFUSE_STATE: "its train state is built for that value",
}

Rule = Callable[[str, Any, Any, dict, dict], str]


def _optimizer_name(key: str, old: Any, new: Any, stored: dict, current: dict) -> str:
    """The Adam optimizers keep the same two moments; Lion keeps one, of another meaning."""
    return REFUSE_STATE if "decoupled_lionw" in (old, new) else NOTICE


def _switched_on_or_off(key: str, old: Any, new: Any, stored: dict, current: dict) -> str:
    """Gradient clipping or the weights' moving average on or off changes the train state's
    structure; their settings do not."""
    return REFUSE_STATE if key in ("algorithms.gradient_clipping", "algorithms.ema") else NOTICE


def _dataset_local(key: str, old: Any, new: Any, stored: dict, current: dict) -> str:
    """``local`` is only the cache folder of a (same) ``remote``, or the data itself: a dataset moved
    to another folder (or bucket) is a common reason to change it, so it is listed, not refused."""
    remote = "train_loader.dataset.remote"
    same_remote = _get(stored, remote) is not None and _get(stored, remote) == _get(current, remote)
    return IGNORE if same_remote else NOTICE


# Every setting by dotted key prefix (the longest matching prefix wins); a key under none of them
# is a NOTICE. Tests check that every field of the schema is listed here explicitly.
RESUME_KEYS: dict[str, str | Rule] = {
    # -- the model: the weights are trained for it. Refused, except how it is computed or trained
    "model": REFUSE_MODEL,
    "model.emb_pdrop": NOTICE,  # dropout
    "model.resid_pdrop": NOTICE,
    "model.attn_config.attn_pdrop": NOTICE,
    "model.z_loss": NOTICE,  # a term of the loss
    "model.fused_loss": NOTICE,  # the same loss in sequence chunks (other rounding)
    "model.remat": NOTICE,  # recompute: the same math, compiled differently
    "model.scan_unroll": NOTICE,
    "model.init_config": IGNORE,  # initialisation only: a resumed run restores its weights
    "model.peft_config": REFUSE_MODEL,  # the adapters: on or off, where, their rank and scale
    "model.peft_config.lora_dropout": NOTICE,  # dropout
    "model.peft_config.init_lora_weights": IGNORE,  # initialisation only
    "model.init_device": IGNORE,  # Foundry keys without effect here
    "model.use_cache": IGNORE,
    "model.loss_fn": IGNORE,
    "model.attn_config.attn_impl": IGNORE,
    # -- the data: the checkpoint's loader position (epoch, sample in epoch) is read in the order
    # of these samples. Refused, except what the loader state stores and wins with (the order's
    # shuffle parameters: the loader says "resuming in the checkpoint's data order") and how the
    # samples are fetched
    "max_seq_len": REFUSE_DATA,  # re-packs the documents into other rows
    "tokenizer": REFUSE_DATA,
    "train_loader.name": REFUSE_DATA,
    "train_loader.dataset": REFUSE_DATA,  # source, paths, split, files, streams, lengths, EOS
    "train_loader.dataset.local": _dataset_local,
    "train_loader.dataset.remote": NOTICE,  # the same data in another bucket (see _dataset_local)
    "train_loader.dataset.target_prompts": NOTICE,  # fine-tuning labels; the rows stay the same
    "train_loader.dataset.target_responses": NOTICE,
    "train_loader.dataset.bos_token_id": NOTICE,  # where documents start: attention masks, same rows
    "train_loader.dataset.decoder_only_format": IGNORE,  # only true is accepted
    "train_loader.dataset.allow_pad_trimming": IGNORE,  # no effect
    "train_loader.dataset.shuffle": IGNORE,  # stored in the loader state, which wins
    "train_loader.dataset.shuffle_seed": IGNORE,
    "train_loader.dataset.extra": NOTICE,  # Streaming options jaxtrain does not know of
    "train_loader.dataset.extra.shuffle_algo": IGNORE,  # stored in the loader state, which wins
    "train_loader.dataset.extra.num_canonical_nodes": IGNORE,
    "train_loader.dataset.extra.shuffle_block_size": IGNORE,
    "train_loader.dataset.extra.sampling_method": REFUSE_DATA,  # the order's stream mixing and epoch
    "train_loader.dataset.extra.sampling_granularity": REFUSE_DATA,
    "train_loader.dataset.extra.epoch_size": REFUSE_DATA,
    "train_loader.dataset.extra.batching_method": REFUSE_DATA,
    "train_loader.dataset.extra.tfds_name": REFUSE_DATA,
    "train_loader.dataset.extra.download_retry": IGNORE,  # how shards are fetched
    "train_loader.dataset.extra.download_timeout": IGNORE,
    "train_loader.dataset.extra.validate_hash": IGNORE,
    "train_loader.dataset.extra.cache_limit": IGNORE,
    "train_loader.dataset.extra.keep_local": IGNORE,
    "train_loader.dataset.extra.predownload": IGNORE,
    "train_loader.drop_last": IGNORE,  # always true for training
    "train_loader.num_workers": IGNORE,  # prefetching: the same batches
    "train_loader.prefetch_factor": IGNORE,
    "train_loader.pin_memory": IGNORE,
    "train_loader.persistent_workers": IGNORE,
    "train_loader.timeout": IGNORE,
    "seed": IGNORE,  # initialisation; the dropout key is restored; the data order is the loader state's
    # -- the train state's structure
    "health.spike_window": REFUSE_STATE,  # the state holds that many recent losses
    "optimizer.name": _optimizer_name,
    "algorithms.gradient_clipping": _switched_on_or_off,
    "algorithms.ema": _switched_on_or_off,
    # -- hyperparameters and numerics: allowed, and listed in the notice
    "optimizer": NOTICE,
    "scheduler": NOTICE,
    "algorithms": NOTICE,
    "global_train_batch_size": NOTICE,
    "device_train_microbatch_size": NOTICE,
    "max_duration": NOTICE,  # also stretches a schedule given in fractions of the run
    "precision": NOTICE,
    "parallelism": NOTICE,  # the same math, summed in another order
    "health.skip_steps": NOTICE,  # updates not applied
    # -- cannot change the numbers of a healthy run: not mentioned
    "health": IGNORE,  # policies and thresholds act on failing steps (recorded as incidents)
    "faults": IGNORE,
    "run_name": IGNORE,
    "run_folder": IGNORE,
    "save_folder": IGNORE,
    "save_interval": IGNORE,
    "save_num_checkpoints_to_keep": IGNORE,
    "save_overwrite": IGNORE,
    "autoresume": IGNORE,
    "load_path": IGNORE,  # a resumed run continues from its checkpoint, not from load_path
    "save_frozen_weights": IGNORE,  # a checkpoint says itself whether it holds them
    "download_cache": IGNORE,  # where downloads are kept, not what they are
    "console_log_interval": IGNORE,
    "progress_bar": IGNORE,
    "log_to_console": IGNORE,
    "python_log_level": IGNORE,
    "peak_flops_per_device": IGNORE,
    "log_shardings": IGNORE,
    "loggers": IGNORE,
    "callbacks": IGNORE,
    "metadata": IGNORE,
    "variables": IGNORE,  # their effect shows in the settings they are interpolated into
    "eval_interval": IGNORE,
    "eval_first": IGNORE,
    "eval_subset_num_batches": IGNORE,
    "device_eval_batch_size": IGNORE,
    "eval_loader": IGNORE,
    "icl_tasks": IGNORE,
    "icl_subset_num_batches": IGNORE,
    "icl_seq_len": IGNORE,
    "eval_gauntlet": IGNORE,
}

_UNSET = object()  # a key one of the two configs does not have


def _get(doc: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


def config_differences(old: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) of every leaf that differs; mappings are compared key by key."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for name in list(old) + [name for name in new if name not in old]:
            found += config_differences(old.get(name, _UNSET), new.get(name, _UNSET), f"{key}.{name}" if key else str(name))
        return found
    return [] if old == new else [(key, old, new)]


def key_class(key: str, old: Any = None, new: Any = None, stored: dict | None = None,
              current: dict | None = None) -> str:
    """The class (``REFUSE_*``, ``NOTICE``, ``IGNORE``) of a setting that changed on resume."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        rule = RESUME_KEYS.get(".".join(parts[:end]))
        if rule is not None:
            return rule(key, old, new, stored or {}, current or {}) if callable(rule) else rule
    return NOTICE


def show_value(value: Any) -> str:
    if value is _UNSET:
        return "unset"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(", ", ": "))


def compare_configs(stored: dict, current: dict, *, both_have: bool = False
                    ) -> tuple[list[tuple[str, Any, Any, str]], list[tuple[str, Any, Any]]]:
    """(refused, noticed) differences between a checkpoint's config and the run's: refused as
    (key, checkpoint value, config value, class), noticed as (key, checkpoint value, config value).
    ``both_have``: only settings both configs have (they come from different versions)."""
    refused, noticed = [], []
    for key, old, new in config_differences(stored, current):
        if both_have and _UNSET in (old, new):
            continue
        kind = key_class(key, old, new, stored, current)
        if kind.startswith("refuse"):
            refused.append((key, old, new, kind))
        elif kind == NOTICE:
            noticed.append((key, old, new))
    return refused, noticed


def _normalized(stored: dict) -> tuple[dict, bool]:
    """The stored config with the defaults of settings added since it was written, and True; or,
    if it no longer loads (another version's settings), the config as stored and False."""
    try:
        return config_to_dict(load_config_dict(stored)), True
    except Exception:  # noqa: BLE001 - compared as stored
        return stored, False


def is_weights_only(meta: dict) -> bool:
    """A checkpoint of converted or imported weights: no optimizer state or data position."""
    return bool(meta.get("weights_only")) or "loader" not in meta


def tokenizer_record(tokenizer) -> dict[str, str]:
    """What a checkpoint's meta keeps of the run's tokenizer: its fingerprint and special tokens."""
    return {"fingerprint": tokenizer.fingerprint, **tokenizer.special_tokens()}


def _tokenizer_moved(cfg, meta: dict[str, Any]) -> bool:
    """Whether ``tokenizer.name`` names a file that is the tokenizer the checkpoint was trained with
    (its fingerprint and special tokens), moved or copied elsewhere: the rows are then the same."""
    from jaxtrain.data.tokenizer import tokenizer_from_file

    record, name = meta.get("tokenizer"), cfg.tokenizer.name
    if not isinstance(record, dict) or not os.path.exists(os.path.expanduser(name)):
        return False
    kwargs = cfg.tokenizer.kwargs or {}
    try:
        tokenizer = tokenizer_from_file(os.path.expanduser(name), what="tokenizer.name",
                                        eos_token=kwargs.get("eos_token"), pad_token=kwargs.get("pad_token"))
    except ConfigError:
        return False
    return tokenizer_record(tokenizer) == record


def refuse_to_resume(cfg, folder: str, step: int, meta: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Raise ``ConfigError`` when the run ``cfg`` cannot resume from the checkpoint ``folder/step``
    with this ``meta``: it holds weights only, or ``cfg`` changes a setting the checkpoint would be
    misread under. Returns the other changed settings that change the numbers (key, old, new)."""
    where = f"{folder}/{step}"
    if is_weights_only(meta):
        raise ConfigError(f"autoresume: the checkpoint at {where} holds weights only (converted or saved outside "
                          f"training), no optimizer state or data position to resume from; start from its weights "
                          f"with load_path: {folder} and another save_folder")
    stored = meta.get("config")
    if not isinstance(stored, dict):
        return []
    stored, complete = _normalized(stored)
    refused, noticed = compare_configs(stored, config_to_dict(cfg), both_have=not complete)
    if any(key == "tokenizer.name" for key, *_ in refused) and _tokenizer_moved(cfg, meta):
        refused = [item for item in refused if item[0] != "tokenizer.name"]  # the same tokenizer elsewhere
    if refused:
        items = few([f"{key}={show_value(old)} (the config says {show_value(new)})" for key, old, new, _ in refused], 4)
        why = "; ".join(dict.fromkeys(_WHY[kind] for *_, kind in refused))
        values = "it back to the checkpoint's value" if len(refused) == 1 else "them back to the checkpoint's values"
        if any(kind == REFUSE_MODEL for *_, kind in refused):
            todo = f"set {values}, or use another save_folder to start a new run"
        else:
            todo = f"set {values}, or start a new run from its weights: another save_folder and load_path: {folder}"
        raise ConfigError(f"autoresume: the checkpoint at {where} was saved with {items}: {why}; {todo}")
    return noticed


def check_resume_before_build(cfg) -> None:
    """Autoresume's refusals before the run is built (data, model, compiling): the newest step of
    a local ``save_folder`` is compared with ``cfg`` (``refuse_to_resume``), so that resuming under
    the wrong config fails in seconds, not after the compile. A step that cannot be read is left to
    autoresume (which falls back past it); remote folders and multi-process runs are checked there."""
    from jaxtrain.checkpoint.remote import is_remote

    folder = cfg.save_folder
    if not (folder and cfg.autoresume) or is_remote(folder) or not os.path.isdir(folder) or jax.process_count() > 1:
        return
    import orbax.checkpoint as ocp

    try:
        manager = read_only_manager(os.path.abspath(folder))
        steps = sorted(manager.all_steps())
        meta = manager.restore(steps[-1], args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] if steps else None
    except Exception:  # noqa: BLE001 - unreadable: autoresume reports it and falls back
        discard_abandoned_reads()
        return
    if isinstance(meta, dict):
        refuse_to_resume(cfg, folder, steps[-1], dict(meta))

"""Checkpoint-side recovery for the Trainer: autoresume with fallback past unreadable
checkpoints, rollback (or a stop) after a bad step, and starting from another run's weights.

Autoresume first compares the config stored in the checkpoint with the run's
(``jaxtrain.train.resume_settings``): a setting under which the checkpoint would be misread is
refused with one line, the others that change the numbers are listed in one notice. A checkpoint
that cannot be read back is skipped for an older one, and once one is restored the newer
unreadable ones are moved aside (renamed, never deleted), so the run saves those steps again;
when none can be restored, nothing is moved.
"""

from __future__ import annotations

import time
from typing import Any

import jax

from jaxtrain.algorithms.ema import init_ema
from jaxtrain.checkpoint.load import ParameterMismatch, few, load_checkpoint, load_hf_weights
from jaxtrain.checkpoint.orbax_reads import CODE_DEFECTS, discard_abandoned_reads, held_back_stderr
from jaxtrain.checkpoint.frozen import RECORD_KEY, can_record, frozen_record, read_frozen
from jaxtrain.checkpoint.manager import abstract_like
from jaxtrain.config import ConfigError, config_to_dict
from jaxtrain.config.schema import error_line
from jaxtrain.convert.folders import is_hf_folder
from jaxtrain.convert.remote_hf import fetch_hf_folder, remote_hf_files
from jaxtrain.layers import lora, quant
from jaxtrain.train.resume_settings import (
    REFUSE_MODEL,
    config_differences,
    is_weights_only,
    key_class,
    refuse_to_resume,
    show_value,
)
from jaxtrain.train.state import TrainState, checkpoint_items, trainable_params


def _is_incident(record: dict) -> bool:
    """A metrics.jsonl record of an incident: a rollback keeps those of the steps it undoes, as
    the steps it skips are not logged again."""
    return "incident" in record


def _only_adapters(names: list[str]) -> bool:
    """Whether parameter ``names`` (``ParameterMismatch``'s) are all LoRA adapters' (and some), or
    the scales of their quantized frozen weights."""
    return (any(name.rsplit(".", 1)[-1] in lora.ADAPTER_NAMES for name in names)
            and all(name.rsplit(".", 1)[-1] in (*lora.ADAPTER_NAMES, quant.SCALE) for name in names))


def _reason(err: BaseException) -> str:
    """The first line of ``err`` (without TensorStore's spec dump), at most 200 characters."""
    return error_line(err, limit=10_000).split(" See full TensorStore details")[0][:200]


class RecoveryMixin:
    """Methods of ``Trainer`` that read checkpoints back. Expects the Trainer's attributes."""

    # The frozen weights' record (``jaxtrain.checkpoint.frozen``) of a LoRA run that read them from
    # load_path (a local folder or one in a bucket): set once they are loaded from load_path or from
    # a checkpoint's record, so the weights in memory are the ones it names.
    frozen_record: dict[str, Any] | None = None

    def saves_adapters_only(self) -> bool:
        """Whether checkpoints leave the frozen weights out, recording where they are instead."""
        return self.frozen_record is not None and self.cfg.save_frozen_weights is not True

    def checkpoint_items(self) -> dict[str, Any]:
        """The train state as this run's checkpoints hold it."""
        items = checkpoint_items(self.state)
        if self.saves_adapters_only():
            items["params"] = lora.split_trainable(items["params"])[0]
        return items

    def _meta(self) -> dict[str, Any]:
        meta = {
            "loader": self.parts.train_loader.state_dict(),
            "config": config_to_dict(self.cfg),
            "layout": {"scan_layers": bool(self.cfg.model.scan_layers), "n_layers": self.cfg.model.n_layers},
            "eval_history": self.eval_history,
            "skip_positions": sorted(self.skip_positions),
            "incidents": self.incidents,
        }
        if self.saves_adapters_only():
            meta[RECORD_KEY] = self.frozen_record
        return meta

    def _check_config(self, step: int, meta: dict[str, Any]) -> None:
        """Refuse (``ConfigError``) a checkpoint holding weights only, or a config under which the
        checkpoint of ``step`` would be misread; print one notice listing the other settings that
        differ and change the numbers."""
        noticed = refuse_to_resume(self.cfg, self.checkpointer.folder, step, meta)
        if noticed:
            items = ", ".join(f"{key} ({show_value(old)} -> {show_value(new)})" for key, old, new in noticed)
            self.print(f"notice: autoresume: the config differs from the checkpoint at {self.checkpointer.folder}/"
                       f"{step} in {items}; training continues with the config's values, so this run will equal an "
                       f"uninterrupted run of neither config")

    def _restore(self, step: int) -> None:
        items = checkpoint_items(self.state)
        record = self.checkpointer.restore_meta(step).get(RECORD_KEY)
        if record is not None:  # the adapters only: the frozen weights are read from where the run read them
            items["params"], frozen = lora.split_trainable(items["params"])
            if record != self.frozen_record:  # not those already here (a rollback keeps them)
                frozen = read_frozen(record, abstract_like(frozen), scan_layers=self.cfg.model.scan_layers,
                                     where=f"autoresume: {self.checkpointer.folder}/{step}")
        with held_back_stderr():  # the tracebacks of reads abandoned when one fails
            items, meta = self.checkpointer.restore(step, abstract_like(items))
        if record is not None:
            items["params"] = lora.merge_trainable(items["params"], frozen)
            self.frozen_record = record
        try:
            self.parts.train_loader.load_state_dict(meta["loader"])
        except ValueError as err:  # the data changed since (the config did not say so)
            raise ConfigError(f"autoresume: the checkpoint at {self.checkpointer.folder}/{step} does not fit the "
                              f"data: {err}; restore the data it was trained on, or start a new run from its weights: "
                              f"another save_folder and load_path: {self.checkpointer.folder}") from None
        self.state = TrainState(**items)
        self._restored_meta = meta
        self.eval_history = [tuple(item) for item in meta.get("eval_history", [])]
        self.skip_positions |= {tuple(p) for p in meta.get("skip_positions", [])}
        self.step = int(jax.device_get(self.state.step))

    def _try_restore(self, step: int, check_config: bool) -> str | None:
        """Restore ``step``; returns None, or why it cannot be read. A config under which it would
        be misread raises ``ConfigError`` before its state is read."""
        failure = None
        try:
            meta = self.checkpointer.restore_meta(step)
        except CODE_DEFECTS:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged meta item: Orbax names no error types
            failure = _reason(err)
        if failure is None:
            if check_config or is_weights_only(meta):
                self._check_config(step, meta)
            try:
                self._restore(step)
            except (ConfigError, *CODE_DEFECTS):
                raise
            except Exception as err:  # noqa: BLE001 - a truncated or corrupted state item
                failure = _reason(err)
        if failure is not None:  # outside the except blocks: their tracebacks hold the abandoned reads
            discard_abandoned_reads()
        return failure

    def restore_newest_readable(self, below: int | None = None, *, check_config: bool = False) -> int | None:
        """Restore the newest checkpoint that reads back (optionally older than ``below``);
        unreadable ones are reported and skipped, and once an older one is restored, moved aside so
        that the run saves their steps again. Returns the step, or None if none reads back (then
        nothing is moved). ``check_config``: compare the newest readable one's config first."""
        self.checkpointer.wait()
        steps = sorted((s for s in self.checkpointer.restorable_steps() if below is None or s < below), reverse=True)
        unreadable = []
        for step in steps:
            failure = self._try_restore(step, check_config)
            if failure is None:
                for bad in unreadable:
                    moved = self.checkpointer.move_aside(bad)
                    where = f" to {moved}" if moved else ""
                    self.print(f"checkpoint {self.checkpointer.folder}/{bad} moved aside{where} (nothing is deleted), "
                               f"so that this run saves step {bad} again")
                return step
            self.print(f"checkpoint {self.checkpointer.folder}/{step} cannot be restored ({failure}); trying an older one")
            self.record_incident("unreadable_checkpoint", checkpoint_step=step)
            unreadable.append(step)
        return None

    def maybe_resume(self) -> None:
        latest = self.checkpointer.latest_step() if self.checkpointer is not None else None
        if latest is None:
            if not self.cfg.load_path and self.parts.weights_placeholders:  # never train on the zeros
                raise ConfigError(f"save_folder: {self.cfg.save_folder} held a checkpoint when this run started "
                                  f"but none now (removed meanwhile?); run the command again")
            if self.cfg.load_path:
                self.load_weights(self.cfg.load_path)
            elif self.cfg.model.peft_config is not None:
                self.print("notice: model.peft_config without load_path: the LoRA adapters train on randomly "
                           "initialised weights, which stay frozen; set load_path to the weights to adapt")
            return
        if not self.cfg.autoresume:
            if self.cfg.save_overwrite:
                return
            raise ConfigError(
                f"save_folder: {self.cfg.save_folder} already holds checkpoints (latest step {latest}); "
                "set autoresume: true to continue, save_overwrite: true to start over, or pick another folder"
            )
        step = self.restore_newest_readable(check_config=True)
        if step is None:
            raise ConfigError(
                f"save_folder: no checkpoint in {self.checkpointer.folder} can be restored (see the lines above); "
                f"they are left as they are: if they are damaged, set save_folder to another folder to start over"
            )
        self.incidents = list(self._restored_meta.get("incidents", [])) + self.incidents
        frozen = "" if self.frozen_record is None else (
            f" (the frozen weights read back from {self.frozen_record['path']}"
            + (")" if self.frozen_record.get("step") is None else f", step {self.frozen_record['step']})"))
        self.print(f"resumed from {self.checkpointer.folder} at step {self.step}{frozen}")

    def rollback(self, bad_steps: list[int]) -> bool:
        """Go back to the newest checkpoint before ``bad_steps[0]`` and never train on the data
        of ``bad_steps`` again. Returns False when there is no checkpoint to go back to."""
        for step in bad_steps:
            if step in self.positions:
                self.skip_positions.add(self.positions[step])
        lr_scale = float(jax.device_get(self.state.lr_scale)) * self.cfg.health.rollback_lr_scale
        restored = self.restore_newest_readable(below=min(bad_steps))
        if restored is None:
            return False
        self.state = self.state.replace(lr_scale=jax.device_put(jax.numpy.float32(lr_scale), self.state.lr_scale.sharding))
        self.print(f"rolled back to step {restored}; batches of steps {bad_steps} will be skipped; lr scale {lr_scale:g}")
        return True

    def _handle_unhealthy(self, bad_steps: list[int], actions: dict[int, str]) -> bool:
        """Roll back or stop after bad steps. Returns True to keep training."""
        if "stop" not in actions.values():
            # A spike rollback skips the run of spiky batches that triggered it; a NaN, its own batch.
            span = self.cfg.health.spike_patience if self.incidents and self.incidents[-1]["incident"] == "spike" else 1
            window = sorted(set(range(bad_steps[0] - span + 1, bad_steps[0] + 1)) | set(bad_steps))
            window = [step for step in window if step >= 1]
            if self.checkpointer is not None and self.rollback(window):
                if self.metrics_file is not None:  # the steps replayed from here are logged once, anew
                    self.metrics_file.drop_after(self.step, keep=_is_incident)
                self.record_incident("rollback", to_step=self.step, skipped_steps=window)
                self.meter.start(time.perf_counter())
                self._last_step_time = None
                return True
            self.stopped_unhealthy = f"rollback needed at step {bad_steps[0]} but no checkpoint to roll back to"
        else:
            self.stopped_unhealthy = f"health policy stopped the run at step {bad_steps[0]} (see incidents in metrics.jsonl)"
        self.record_incident("stop", step=bad_steps[0], reason=self.stopped_unhealthy)
        return False

    def load_weights(self, path: str) -> None:
        """Start from the parameters of another run's checkpoint (the optimizer starts fresh).

        A model with LoRA adapters (``model.peft_config``) takes a checkpoint without them as its
        frozen weights, its adapters starting fresh; a model without adapters takes a checkpoint's
        adapters merged into its weights."""
        ours = self.state.params
        fresh_adapters, merged = None, False
        hf_folder = path if is_hf_folder(path) else None
        if "://" in path:  # in object storage: a Hugging Face folder is downloaded, a checkpoint staged
            try:
                files = remote_hf_files(path)
                hf_folder = fetch_hf_folder(path, files, print_fn=self.print) if files is not None else None
            except ConfigError as err:  # an unsupported URL, a bucket it cannot list, ...
                raise ConfigError(f"load_path: {err}") from None
        if hf_folder is not None:  # a Hugging Face MPT folder, read as it is
            def load(like=None):
                return load_hf_weights(hf_folder, like=like if like is not None else abstract_like(ours),
                                       scan_layers=self.cfg.model.scan_layers)
        else:
            def load(like=None, merge_adapters=False):
                return load_checkpoint(path, like=like, merge_adapters=merge_adapters)
        try:
            try:
                loaded = load(like=abstract_like(ours))
            except ParameterMismatch as err:
                if _only_adapters(err.missing) and not err.extra:  # a model to adapt (or, not fitting, said so)
                    fresh_adapters, frozen = lora.split_trainable(ours)
                    loaded = load(like=abstract_like(frozen))
                elif hf_folder is None and err.model_cfg.peft_config is not None and not lora.has_adapters(ours):
                    # adapters to merge in, read and merged on our devices (the merged model not
                    # fitting is said so)
                    loaded, merged = load(like=abstract_like(ours), merge_adapters=True), True
                else:
                    raise
        except ParameterMismatch as err:
            ours = config_to_dict(self.cfg.model)
            theirs = config_to_dict(err.model_cfg)
            keys = [f"model.{key}={show_value(old)} (the config says {show_value(new)})"
                    for key, old, new in config_differences(theirs, ours)
                    if key_class(f"model.{key}") == REFUSE_MODEL and not key.startswith("peft_config")]
            differ = f"; the checkpoint's model has {few(keys, 4)}" if keys else ""
            raise ConfigError(f"load_path: {path}: {err.detail()}{differ}; make the model section match the "
                              f"checkpoint's") from None
        except ConfigError as err:
            raise ConfigError(f"load_path: {err}") from None
        params = loaded.params if fresh_adapters is None else lora.merge_trainable(fresh_adapters, loaded.params)
        if fresh_adapters is not None and self.cfg.model.peft_config.use_dora:  # DoRA starts from these weights' norms
            params = lora.start_magnitudes(params, self.cfg.model)
        self.state = self.state.replace(params=params)
        if self.cfg.model.peft_config is not None and can_record(path):  # read back from there
            self.frozen_record = frozen_record(path, None if hf_folder is not None else loaded.step)
        if self.state.ema is not None:  # the average starts from the loaded weights too
            self.state = self.state.replace(ema=init_ema(trainable_params(params)))
        averaged = " (their moving average)" if loaded.averaged else ""
        adapters = ""
        if fresh_adapters is not None:
            adapters = "; they stay frozen and LoRA adapters train on them"
        elif loaded.model_cfg.peft_config is not None and lora.has_adapters(params):
            adapters = " with their LoRA adapters"
        elif merged:
            adapters = " with their LoRA adapters merged into them"
        kept = ("; checkpoints hold the adapters and read the frozen weights back from there (save_frozen_weights)"
                if self.saves_adapters_only() else "")
        self.print(f"loaded weights{averaged} from {path} (step {loaded.step}){adapters}; optimizer state is fresh{kept}")

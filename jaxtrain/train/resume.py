"""Checkpoint-side recovery for the Trainer: autoresume with fallback past unreadable
checkpoints, rollback after a bad step, and starting from another run's weights."""

from __future__ import annotations

from typing import Any

import jax

from jaxtrain.checkpoint.load import load_checkpoint
from jaxtrain.checkpoint.manager import abstract_like
from jaxtrain.config import ConfigError, config_to_dict


class RecoveryMixin:
    """Methods of ``Trainer`` that read checkpoints back. Expects the Trainer's attributes."""

    def _meta(self) -> dict[str, Any]:
        return {
            "loader": self.parts.train_loader.state_dict(),
            "config": config_to_dict(self.cfg),
            "layout": {"scan_layers": bool(self.cfg.model.scan_layers), "n_layers": self.cfg.model.n_layers},
            "eval_history": self.eval_history,
            "skip_positions": sorted(self.skip_positions),
            "incidents": self.incidents,
        }

    def _restore(self, step: int) -> None:
        self.state, meta = self.checkpointer.restore(step, abstract_like(self.state))
        self._restored_meta = meta
        self.parts.train_loader.load_state_dict(meta["loader"])
        self.eval_history = [tuple(item) for item in meta.get("eval_history", [])]
        self.skip_positions |= {tuple(p) for p in meta.get("skip_positions", [])}
        self.step = int(jax.device_get(self.state.step))

    def restore_newest_readable(self, below: int | None = None) -> int | None:
        """Restore the newest checkpoint that reads back (optionally older than ``below``);
        unreadable ones are reported and skipped. Returns its step, or None if there is none."""
        self.checkpointer.wait()
        steps = sorted((s for s in self.checkpointer.all_steps() if below is None or s < below), reverse=True)
        for step in steps:
            try:
                self._restore(step)
                return step
            except Exception as err:  # a truncated or corrupted checkpoint: fall back to an older one
                reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                self.print(f"checkpoint {self.checkpointer.folder}/{step} cannot be restored ({reason}); trying an older one")
                self.record_incident("unreadable_checkpoint", checkpoint_step=step)
        return None

    def maybe_resume(self) -> None:
        latest = self.checkpointer.latest_step() if self.checkpointer is not None else None
        if latest is None:
            if self.cfg.load_path:
                self.load_weights(self.cfg.load_path)
            return
        if not self.cfg.autoresume:
            if self.cfg.save_overwrite:
                return
            raise ConfigError(
                f"save_folder: {self.cfg.save_folder} already holds checkpoints (latest step {latest}); "
                "set autoresume: true to continue, save_overwrite: true to start over, or pick another folder"
            )
        step = self.restore_newest_readable()
        if step is not None:
            self.incidents = list(self._restored_meta.get("incidents", [])) + self.incidents
        if step is None:
            raise ConfigError(
                f"save_folder: no checkpoint in {self.cfg.save_folder} can be restored; move it aside to start over"
            )
        self.print(f"resumed from {self.checkpointer.folder} at step {self.step}")

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

    def load_weights(self, path: str) -> None:
        """Start from the parameters of another run's checkpoint (the optimizer starts fresh)."""
        try:
            loaded = load_checkpoint(path, shardings=self.parts.state_shardings.params)
        except ConfigError as err:
            raise ConfigError(f"load_path: {err}") from None
        ours = jax.tree_util.tree_flatten_with_path(self.state.params)[0]
        theirs = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(loaded.params)[0]}
        for key, value in ours:
            other = theirs.get(jax.tree_util.keystr(key))
            if other is None or other.shape != value.shape:
                found = "missing" if other is None else f"shape {other.shape}"
                raise ConfigError(
                    f"load_path: {path}: parameter {jax.tree_util.keystr(key)} is {found}, the model needs "
                    f"shape {value.shape}; make the model section match the checkpoint's"
                )
        self.state = self.state.replace(params=loaded.params)
        self.print(f"loaded weights from {path} (step {loaded.step}); optimizer state is fresh")

"""Load a trained model from a jaxtrain checkpoint folder: its config, parameters and tokenizer.

Used by generation, evaluation, export and ``load_path``. Only the parameters are read (the
optimizer state is skipped), into host memory or the given shardings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxtrain.checkpoint.remote import fetch_checkpoint, is_remote
from jaxtrain.config import ConfigError, load_config_dict
from jaxtrain.config.schema import ModelConfig

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass
class LoadedModel:
    model_cfg: ModelConfig
    params: Any  # nnx.State of the model's parameters
    step: int
    tokenizer_path: str | None
    meta: dict

    def module(self) -> nnx.Module:
        """The NNX module holding these parameters."""
        from jaxtrain.train.state import abstract_model

        graphdef, _ = abstract_model(self.model_cfg)
        return nnx.merge(graphdef, self.params)


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax's warnings (it logs through absl's ``absl`` logger) off inside the block; errors still show."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_checkpoint(folder: str, step: int | None = None, *, shardings: Any = None) -> LoadedModel:
    """Read the model config, parameters and tokenizer path of ``folder`` (newest step by default)."""
    from jaxtrain.train.state import abstract_model

    if "://" not in folder and not os.path.isdir(folder):
        raise ConfigError(f"{folder}: checkpoint folder not found")
    if is_remote(folder):  # staged locally: Orbax reads the downloaded step
        root = fetch_checkpoint(folder, step)
    else:
        root = os.path.abspath(folder) if "://" not in folder else folder
    with _quiet_orbax():  # Orbax warns that a read-only manager is read-only, on every load
        manager = ocp.CheckpointManager(
            root, options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
            item_names=("state", "meta"),
        )
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{folder}: no complete jaxtrain checkpoint found (expected numbered step folders)")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        model_cfg = load_config_dict(meta["config"]).model
        _, abstract_params = abstract_model(model_cfg)
        if shardings is None:
            device = jax.local_devices()[0]
            shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract_params)
        target = {
            "params": jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params, shardings
            )
        }
        # Only the parameters are read; the optimizer state stays on disk.
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target),
                    partial_restore=True,
                )
            ),
        )["state"]
    finally:
        manager.close()
    params = restored["params"]
    tokenizer_path = os.path.join(root, TOKENIZER_FILE)
    return LoadedModel(
        model_cfg=model_cfg,
        params=params,
        step=step,
        tokenizer_path=tokenizer_path if os.path.exists(tokenizer_path) else None,
        meta=dict(meta),
    )

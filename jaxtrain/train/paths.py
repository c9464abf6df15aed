"""A run's name and folders, worked out from its config without importing JAX."""

from __future__ import annotations

import dataclasses
import os

from jaxtrain.config import Config


def resolve_run_name(cfg: Config, config_path: str | None) -> str:
    if cfg.run_name:
        return cfg.run_name
    if config_path:
        return os.path.splitext(os.path.basename(config_path))[0]
    return "run"


def expand_run_paths(cfg: Config, run_name: str) -> Config:
    """Substitute ``{run_name}`` in the run and save folders."""
    run_folder = cfg.run_folder.replace("{run_name}", run_name)
    save_folder = cfg.save_folder.replace("{run_name}", run_name) if cfg.save_folder else None
    return dataclasses.replace(cfg, run_name=run_name, run_folder=run_folder, save_folder=save_folder)


def data_cache_dir(cfg: Config) -> str:
    """Where a run keeps its tokenizer and packed rows (``cfg``'s paths already expanded)."""
    return os.path.join(cfg.run_folder, "cache")

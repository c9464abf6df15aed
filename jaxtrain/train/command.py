"""`jaxtrain train`: load the config, build the run, fit, and print a summary."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Sequence

from jaxtrain.config import ConfigError, dump_yaml, load_config
from jaxtrain.config.interpolate import mask
from jaxtrain.interrupt import INTERRUPTED_AT_START
from jaxtrain.parallel.mesh import MeshError, build_mesh
from jaxtrain.tempfiles import file_in_the_way

from jaxtrain.train.health import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED, EXIT_UNHEALTHY
from jaxtrain.train.summary import format_summary, read_summary, write_summary

EXIT_USAGE = EXIT_CONFIG


def _error(message: str) -> int:
    from jaxtrain.parallel.failures import note

    print(f"error: {message}", file=sys.stderr, flush=True)
    note(message)  # told to the other processes of a multi-host run
    return EXIT_USAGE


def out_of_memory(err: BaseException, cfg) -> str:
    """One line for the device running out of memory while the run was built or trained."""
    from jaxtrain.train.microbatch import out_of_memory_line

    return out_of_memory_line(err, f"lower device_train_microbatch_size (now {cfg.device_train_microbatch_size}), "
                              "set model.remat: full, or use more devices or a smaller model; "
                              "`jaxtrain plan --memory --config ...` estimates what a config needs")


def _process_start() -> float:
    """The ``time.perf_counter()`` reading at which this process started (Linux: from /proc, so
    interpreter start-up and imports count toward time to first step), else now."""
    now = time.perf_counter()
    try:
        with open("/proc/self/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in ticks
    except (OSError, ValueError, IndexError):
        return now
    return now - age if 0 <= age < 3600 else now


def train_command(config_path: str | None, overrides: Sequence[str] = (), *, data_prefetch=None) -> int:
    """Run training from a config file and overrides; returns the process exit code.

    ``data_prefetch``: a ``jaxtrain.train.data_prefetch.DataPrefetch`` building this run's data cache,
    waited for before the data is read, and stopped when the command returns.
    """
    try:
        return _train(config_path, overrides, data_prefetch)
    finally:
        if data_prefetch is not None:
            data_prefetch.close()


def _train(config_path: str | None, overrides: Sequence[str], data_prefetch) -> int:
    started = _process_start()
    if config_path is None:  # the defaults alone are a 1.3B model at 256 x 2048 tokens a step
        return _error("no config: pass --config PATH (configs/quickstart.yaml trains a small model on this machine; "
                      "configs/mpt/ holds the model presets)")
    notices: list[str] = []
    secrets: list[str] = []  # values of credential-named environment variables: never printed
    try:
        cfg = load_config(config_path, overrides, notices=notices, secrets=secrets)
    except ConfigError as err:
        return _error(mask(str(err), secrets))

    import jax  # after the config is read, so a config error is reported without JAX start-up

    from jaxtrain.config import validate_for_devices
    from jaxtrain.models import check_model_config
    from jaxtrain.train.loop import StopNow, Trainer
    from jaxtrain.train.memory_report import start_report
    from jaxtrain.train.paths import expand_run_paths, resolve_run_name
    from jaxtrain.train.resume_settings import check_resume_before_build
    from jaxtrain.train.setup import build_run

    cfg = expand_run_paths(cfg, resolve_run_name(cfg, config_path))
    try:
        validate_for_devices(cfg, build_mesh(cfg.parallelism).size)
        check_model_config(cfg.model)
        if cfg.load_path and "://" not in cfg.load_path and os.path.isfile(cfg.load_path):
            raise ConfigError(f"load_path: {cfg.load_path}: a file, not a folder; give a checkpoint folder (a run's "
                              f"save_folder, or one of its step folders) or a Hugging Face MPT folder")
        for key, folder in (("run_folder", cfg.run_folder), ("save_folder", cfg.save_folder)):
            if folder and "://" not in folder and (blocking := file_in_the_way(folder)):
                itself = blocking == os.path.abspath(os.path.expanduser(folder))
                raise ConfigError(f"{key}: {folder}: {'a file' if itself else f'{blocking} is a file'}, not a folder; "
                                  f"give a folder path")
        if cfg.load_path and "://" not in cfg.load_path and not os.path.isdir(cfg.load_path):
            raise ConfigError(f"load_path: {cfg.load_path}: no such folder; give a checkpoint folder (a run's "
                              f"save_folder, or one that jaxtrain convert wrote) or a Hugging Face MPT folder")
    except (ConfigError, MeshError) as err:
        return _error(mask(str(err), secrets))

    for notice in notices:
        print(f"notice: {mask(notice, secrets)}", flush=True)
    resolved = mask(dump_yaml(cfg), secrets)  # printed and written beside the run (the checkpoint keeps the values)
    print("resolved config:\n" + resolved, flush=True)
    os.makedirs(cfg.run_folder, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(cfg.run_folder, "config.yaml"), "w") as f:
            f.write(resolved)

    # Compiled steps are cached with the run, so a resumed or repeated run starts faster.
    # JAXTRAIN_COMPILATION_CACHE_DIR shares one cache between runs (e.g. many short runs of one model)
    cache_dir = os.environ.get("JAXTRAIN_COMPILATION_CACHE_DIR") or os.path.join(cfg.run_folder, "cache", "xla")
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    parts = None
    try:
        callbacks = _callbacks(cfg)  # a mistake in the ICL tasks is reported before the model is built
        check_resume_before_build(cfg)  # so is a config the newest checkpoint would be misread under
        parts = build_run(cfg, data_prefetch=data_prefetch)
        print(
            f"model: {parts.num_params / 1e6:.2f}M parameters{_adapters(cfg)}; {jax.device_count()} device(s) "
            f"({jax.devices()[0].platform}); mesh {dict(parts.mesh.shape)}; {parts.total_batches} steps of "
            f"{cfg.global_train_batch_size} x {cfg.max_seq_len} tokens; MFU peak: {parts.peak_source}",
            flush=True,
        )
        print(start_report(parts), flush=True)
        result = Trainer(parts, callbacks=callbacks, started=started).fit()
    except ConfigError as err:
        return _error(mask(str(err), secrets))
    except StopNow:
        print("interrupted twice: stopped without a new checkpoint; earlier checkpoints are intact", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # before the run's own handlers were in place: nothing was being saved
        print(INTERRUPTED_AT_START, file=sys.stderr)
        return EXIT_INTERRUPTED
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        return _error(out_of_memory(err, cfg))
    finally:
        if parts is not None:  # stop prefetch threads; drop a streamed dataset's cache unless kept
            for loader in (parts.train_loader, parts.eval_loader):
                if loader is not None:
                    loader.close()
    summary_path = os.path.join(cfg.run_folder, "summary.json")
    earlier = read_summary(summary_path) if result.already_complete else None
    if result.already_complete:
        print(f"the run is already complete: its checkpoint is at the last step ({result.step}); nothing was "
              f"trained" + (f"; its summary ({summary_path}):" if earlier is not None else ""), flush=True)
    if earlier is not None:
        result = dataclasses.replace(earlier, already_complete=True)
    elif jax.process_index() == 0:
        write_summary(summary_path, result)
    print(format_summary(result, time.perf_counter() - started), flush=True)
    if result.stopped_unhealthy:
        return EXIT_UNHEALTHY
    if result.interrupted:
        return EXIT_PREEMPTED if result.stop_signal == "SIGTERM" else EXIT_INTERRUPTED
    return EXIT_OK


def _callbacks(cfg) -> list:
    """Callbacks the config asks for: in-context-learning evaluation after each held-out eval."""
    if not cfg.icl_tasks:
        return []
    from jaxtrain.eval.gauntlet import ICLEvalCallback

    return [ICLEvalCallback(cfg.icl_tasks, gauntlet=cfg.eval_gauntlet, max_len=cfg.icl_seq_len,
                            subset_num_batches=cfg.icl_subset_num_batches)]


def _adapters(cfg) -> str:
    """What trains of a LoRA model: ", training 0.26M in LoRA adapters (rank 8)" (with quantized
    frozen weights, "(rank 8; frozen weights in int8)"); "" without."""
    from jaxtrain.layers.lora import adapter_param_count, rank_text

    if cfg.model.peft_config is None:
        return ""
    frozen = f"; frozen weights in {cfg.model.quantize_frozen}" if cfg.model.quantize_frozen else ""
    return f", training {adapter_param_count(cfg.model) / 1e6:.2f}M in LoRA adapters ({rank_text(cfg.model)}{frozen})"

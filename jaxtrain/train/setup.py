"""Turn a resolved Config into the pieces of a run: mesh, data, model, optimizer, compiled steps."""

from __future__ import annotations

import dataclasses
import re
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.algorithms.ema import ema_plan
from jaxtrain.config import Config, ConfigError, validate_for_devices
from jaxtrain.config.timestr import parse_time, to_batches
from jaxtrain.data import build_loaders
from jaxtrain.metrics.hardware import cpu_bf16_note, detect_hardware
from jaxtrain.models.mpt_config import mpt_param_count
from jaxtrain.layers import fp8, lora
from jaxtrain.layers.attention import fused_attention_kind
from jaxtrain.parallel.layout import check_model_for_mesh
from jaxtrain.parallel.mesh import (
    MeshError, axis_rules, batch_sharding, build_mesh, check_process_rows, data_parallel_size, replicated)
from jaxtrain.plan.memory import estimate_memory
from jaxtrain.train.optim import build_optimizer
from jaxtrain.train.paths import data_cache_dir, expand_run_paths, resolve_run_name
from jaxtrain.train.schedules import build_schedule
from jaxtrain.train.state import abstract_model, create_train_state
from jaxtrain.train.health import FaultInjector
from jaxtrain.train.microbatch import auto_step, memory_analysis
from jaxtrain.train.step import (
    COMPUTE_DTYPES, FP8_PRECISIONS, HealthRules, compile_train_step, compiler_options, make_eval_step, make_train_step)


@dataclasses.dataclass
class RunParts:
    """Everything a Trainer needs, built from a Config."""

    cfg: Config
    mesh: Any
    train_loader: Any
    eval_loader: Any
    tokenizer: Any
    state: Any
    state_shardings: Any
    model_def: Any
    train_step: Any
    eval_step: Any
    schedule: Any
    total_batches: int
    num_params: int
    flops_per_batch: float
    peak_flops_per_device: float | None  # None: an unknown accelerator, no MFU
    peak_source: str
    batch_sharding: Any
    with_control: bool
    device_train_microbatch: int = 0  # sequences per device per forward/backward pass
    remat: str = "none"  # the activation recompute the train step was built with (model.remat, settled if auto)
    train_step_memory: Any = None  # XLA's memory analysis of the compiled train step, where available
    weights_placeholders: bool = False  # built as zeros: a checkpoint's or load_path's weights replace them


def time_to_batches(cfg: Config, value: str, key: str, *, batches_per_epoch: int, total_batches: int | None) -> int:
    """A time string in batches; a time in tokens counts ``global_train_batch_size * max_seq_len``
    tokens per batch (validation refuses it on fine-tuning data)."""
    tokens_per_batch = cfg.global_train_batch_size * cfg.max_seq_len
    return to_batches(
        parse_time(value, key=key),
        batches_per_epoch=batches_per_epoch,
        tokens_per_batch=tokens_per_batch,
        samples_per_batch=cfg.global_train_batch_size,
        total_batches=total_batches,
    )


def microbatch_count(cfg: Config, data_parallel: int) -> int:
    per_device = cfg.global_train_batch_size // data_parallel
    micro = cfg.device_train_microbatch_size
    if micro in (None, "auto"):
        return 1
    return max(1, per_device // int(micro))


def peak_flops(cfg: Config) -> tuple[float | None, str]:
    """Per-device dense peak FLOP/s for MFU, and where the figure came from; None on an
    accelerator the hardware table lacks (no MFU is reported, as Composer reports none there)."""
    if cfg.peak_flops_per_device:
        return float(cfg.peak_flops_per_device), "peak_flops_per_device from the config"
    composer = (cfg.callbacks.get("speed_monitor") or {}).get("gpu_flops_available")
    if composer:  # Composer's SpeedMonitor option, as Foundry configs set it
        return float(composer), "callbacks.speed_monitor.gpu_flops_available from the config"
    hardware = detect_hardware()
    if hardware is None:
        device = jax.devices()[0]
        return None, (f"unknown device {device.device_kind!r}, so MFU is not reported: set peak_flops_per_device to "
                      f"its dense peak FLOP/s for the run's precision")
    peak, kind = hardware.peak_flops(cfg.precision), hardware.peak_kind(cfg.precision)
    return float(peak), f"{hardware.name} {kind} peak ({hardware.notes})"


class _InBackground:
    """Run ``fn(*args, **kwargs)`` on a daemon thread; ``result()`` waits and re-raises its error."""

    def __init__(self, fn, *args, **kwargs):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), name="jaxtrain-setup", daemon=True)
        self._thread.start()

    def _run(self, fn, args, kwargs) -> None:
        try:
            self._value = fn(*args, **kwargs)
        except BaseException as err:  # handed to the caller of result()
            self._error = err

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _note_rows_left_out(cfg: Config, train_loader) -> None:
    """Say so when each epoch leaves out a noticeable part of the training rows: the last
    incomplete batch of an epoch is dropped (batches have a fixed shape), as Composer drops it."""
    rows, batch = train_loader.epoch_size, cfg.global_train_batch_size
    left = rows % batch
    if left and (left * 20 >= rows or "ep" in str(cfg.max_duration)):
        print(f"notice: an epoch of the training data is {rows // batch} batch{'es' if rows // batch != 1 else ''} of "
              f"{batch} rows: the other {left} of its {rows} rows are left out of each epoch (shuffle: true draws "
              f"them anew each epoch); a global_train_batch_size that divides {rows} trains on all of them", flush=True)


def _plan_optimizer(cfg: Config, *, batches_per_epoch: int | None):
    """(total batches, schedule, optimizer); ``batches_per_epoch`` None raises for epoch-based times."""
    total_batches = time_to_batches(
        cfg, cfg.max_duration, "max_duration", batches_per_epoch=batches_per_epoch, total_batches=None
    )
    if total_batches <= 0:
        raise ConfigError(f"max_duration: {cfg.max_duration!r} is shorter than one batch; train for at least 1ba")
    if total_batches >= 2**31:  # the step counter is a 32-bit integer on the devices
        raise ConfigError(f"max_duration: {cfg.max_duration!r} is {total_batches} batches; a run takes at most "
                          f"{2**31 - 1} steps")

    def to_batches_fn(value: str) -> int:
        return time_to_batches(cfg, value, "scheduler", batches_per_epoch=batches_per_epoch, total_batches=total_batches)

    schedule = build_schedule(cfg.scheduler, base_lr=cfg.optimizer.lr, total_batches=total_batches, to_batches=to_batches_fn)
    return total_batches, schedule, build_optimizer(cfg.optimizer, schedule, clipping=cfg.algorithms.gradient_clipping)


def _built_loaders(cfg: Config, data_prefetch, **kwargs):
    if data_prefetch is not None:
        data_prefetch.wait()  # then the tokenizer and rows come from the cache it filled
        if data_prefetch.stalled:
            print(f"warning: the data process {data_prefetch.pid} used no CPU for {data_prefetch.stall_seconds:.0f}s "
                  "and was stopped; building the data here", file=sys.stderr, flush=True)
    return build_loaders(cfg, **kwargs)


def eval_batch_size(cfg: Config) -> int:
    """Rows in one global held-out batch."""
    return cfg.device_eval_batch_size * jax.device_count()


def _eval_batch_spec(cfg: Config, eval_loader, sharding) -> dict:
    """The global batch ``Trainer.evaluate`` passes to the eval step, as abstract arrays (from the
    loader's first batch, this process's share)."""
    local = next(eval_loader.batches(eval_batch_size(cfg)))
    return {key: jax.ShapeDtypeStruct((value.shape[0] * jax.process_count(), *value.shape[1:]), value.dtype,
                                      sharding=sharding)
            for key, value in local.items()}


def _loaded_data(cfg: Config, loaders: _InBackground):
    """(train loader, eval loader, tokenizer) once built, checked against the model's vocabulary."""
    train_loader, eval_loader, tokenizer = loaders.result()
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}); set model.vocab_size to at least {tokenizer.vocab_size}"
        )
    for loader in (train_loader, eval_loader):  # rows read as stored (pre-tokenized): check their ids
        if loader is not None and not isinstance(loader.rows, np.ndarray):
            loader.vocab_size = cfg.model.vocab_size
    batch_size = eval_batch_size(cfg)
    if eval_loader is not None and cfg.eval_loader.drop_last and eval_loader.num_batches(batch_size, drop_last=True) == 0:
        raise ConfigError(f"eval_loader.drop_last: true leaves no batch to evaluate: the held-out split has "
                          f"{eval_loader.num_sequences} sequences, fewer than one eval batch of {batch_size} "
                          f"(device_eval_batch_size x devices); set it to false or lower device_eval_batch_size")
    return train_loader, eval_loader, tokenizer


def _weights_loaded(cfg: Config) -> bool:
    """Whether every weight the run builds is replaced before its first step: by load_path's, or
    by a checkpoint's when the run resumes from its save folder (local or in a bucket); then the
    state is built with zeros in their place rather than drawn weights (``create_train_state``).
    A resume that finds no readable checkpoint there stops with an error rather than training on them."""
    from jaxtrain.checkpoint.manager import holds_checkpoint

    return bool(cfg.load_path) or (cfg.autoresume and holds_checkpoint(cfg.save_folder))


def _train_state(cfg: Config, tx, mesh, rules, weights_loaded: bool):
    try:
        return create_train_state(cfg.model, tx, seed=cfg.seed, mesh=mesh, rules=rules, spike_window=cfg.health.spike_window,
                                  ema=cfg.algorithms.ema is not None, frozen_dtype=COMPUTE_DTYPES[cfg.precision],
                                  weights_loaded=weights_loaded)
    except MeshError as err:
        raise ConfigError(str(err)) from None


def build_run(cfg: Config, *, data_prefetch=None) -> RunParts:
    """Build mesh, loaders, model state and the compiled step from ``cfg``.

    With ``load_path`` set, or a checkpoint in ``save_folder`` (local or in a bucket) to resume from,
    the state's weights are zeros until the ``Trainer`` reads them in (``maybe_resume``, which
    ``fit`` calls; ``RunParts.weights_placeholders`` says so).

    ``data_prefetch`` (``jaxtrain.train.data_prefetch.DataPrefetch``): a child process filling the data
    cache, waited for before the data is read. A ``{run_name}`` left in the run or save folder (a
    config straight from ``load_config``) is filled in, with ``run_name`` or else "run"."""
    if "{run_name}" in cfg.run_folder or "{run_name}" in (cfg.save_folder or ""):
        cfg = expand_run_paths(cfg, resolve_run_name(cfg, None))
    devices = jax.devices()
    try:
        mesh = build_mesh(cfg.parallelism, devices)
        check_model_for_mesh(cfg.model, mesh)
        check_process_rows(mesh, cfg.global_train_batch_size)
    except MeshError as err:
        raise ConfigError(str(err)) from None
    validate_for_devices(cfg, mesh.size)
    if cfg.precision in FP8_PRECISIONS:
        try:
            note = fp8.device_note(devices[0])
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if note:
            print(f"warning: {note}", flush=True)
    if devices[0].platform == "cpu" and cfg.precision != "fp32" and (note := cpu_bf16_note()):
        print(f"warning: {note}", flush=True)
    rules = axis_rules(cfg.parallelism)
    from jaxtrain.convert.remote_hf import set_download_cache

    set_download_cache(cfg.download_cache)  # where downloads of Hugging Face weights from buckets are kept (or not)

    cache_dir = data_cache_dir(cfg)
    # The data (tokenizer training, packing) is built on a thread while the model state is
    # initialised, which needs the data only for durations in epochs. (Compiling the train step
    # alongside as well gained nothing on two cores: both already keep the cores busy.)
    loaders = _InBackground(
        _built_loaders, cfg, data_prefetch, cache_dir=cache_dir, process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    try:
        planned = _plan_optimizer(cfg, batches_per_epoch=None)
    except ConfigError:  # an epoch-based duration (or a config error, reported after the data's own errors)
        planned = None
    weights_loaded = _weights_loaded(cfg)
    state_parts = _train_state(cfg, planned[2], mesh, rules, weights_loaded) if planned is not None else None
    train_loader, eval_loader, tokenizer = _loaded_data(cfg, loaders)
    if planned is None:
        planned = _plan_optimizer(cfg, batches_per_epoch=train_loader.batches_per_epoch)
        state_parts = _train_state(cfg, planned[2], mesh, rules, weights_loaded)
    total_batches, schedule, tx = planned
    _note_rows_left_out(cfg, train_loader)
    state, model_def, state_shardings = state_parts
    ema = None if cfg.algorithms.ema is None else ema_plan(
        cfg.algorithms.ema, batches_per_epoch=train_loader.batches_per_epoch, total_batches=total_batches)

    compute_dtype = COMPUTE_DTYPES[cfg.precision]
    fp8_products = cfg.precision in FP8_PRECISIONS
    options = compiler_options(cfg.precision, devices[0].platform)
    model = cfg.model
    use_dropout = max(model.emb_pdrop, model.resid_pdrop, model.attn_config.attn_pdrop) > 0 or lora.uses_dropout(model)
    health = HealthRules(
        detect_spikes=cfg.health.spike_policy != "none",
        skip_spikes=cfg.health.spike_policy != "none",
        spike_ratio=cfg.health.spike_ratio,
        spike_min_steps=cfg.health.spike_min_steps,
    )
    shard_batch = batch_sharding(mesh)
    with_control = bool(cfg.health.skip_steps) or FaultInjector(cfg.faults, cfg.run_folder).active

    model_defs = {"none" if model.remat == "auto" else model.remat: model_def}  # the model builds auto as none

    def build_step(num_microbatches: int, remat: str | None = None):
        remat = remat or ("none" if model.remat == "auto" else model.remat)
        if remat not in model_defs:  # the same parameters; only the traced block differs
            graphdef, _ = abstract_model(dataclasses.replace(model, remat=remat))
            model_defs[remat] = dataclasses.replace(model_def, graphdef=graphdef)
        train_step = make_train_step(
            model_defs[remat], tx, schedule, compute_dtype=compute_dtype, num_microbatches=num_microbatches,
            z_loss=model.z_loss, use_dropout=use_dropout, health=health, fp8_products=fp8_products, ema=ema,
        )
        return compile_train_step(
            train_step, state_shardings, shard_batch, control_sharding=replicated(mesh) if with_control else None,
            options=options,
        )

    eval_step = jax.jit(
        make_eval_step(model_def, compute_dtype=compute_dtype, fp8_products=fp8_products),
        in_shardings=(state_shardings.params, shard_batch),
        compiler_options=options,
    )
    eval_compile = None
    if cfg.eval_first and eval_loader is not None and devices[0].platform == "cpu":
        # Traced here and compiled on a thread while this one traces the train step (one core's
        # work): the evaluation before step one then finds it compiled. (Not on accelerators:
        # XLA:GPU times candidate kernels on the device while compiling, and two compiles at
        # once would time each other's.)
        lowered = eval_step.lower(state.params, _eval_batch_spec(cfg, eval_loader, shard_batch))
        eval_compile = _InBackground(lowered.compile)

    # Compiled ahead of time for its memory analysis; the first call reuses this executable.
    example_args = (state, {"input_ids": jax.ShapeDtypeStruct(
        (cfg.global_train_batch_size, cfg.max_seq_len), jnp.int32, sharding=shard_batch)})
    if with_control:
        example_args += (jax.ShapeDtypeStruct((2,), jnp.float32, sharding=replicated(mesh)),)
    per_device_batch = cfg.global_train_batch_size // data_parallel_size(mesh)
    auto = tuple(name for name, setting in (("microbatch", cfg.device_train_microbatch_size), ("remat", model.remat))
                 if setting == "auto")  # fmt: skip
    if auto:
        def estimate(microbatch: int, remat: str) -> float | None:
            try:
                return estimate_memory(
                    model, global_batch=cfg.global_train_batch_size, microbatch=microbatch, seq_len=cfg.max_seq_len,
                    precision=cfg.precision, mesh_shape=dict(mesh.shape), remat=remat,
                    optimizer=cfg.optimizer.name, n_params=mpt_param_count(model),
                    fused_attention=fused_attention_kind(model, compute_dtype), ema=ema is not None,
                ).total_bytes  # fmt: skip
            except ValueError:  # a setting the planner does not model
                return None

        fixed = per_device_batch // microbatch_count(cfg, data_parallel_size(mesh))
        compiled = auto_step(build_step, example_args, per_device_batch=per_device_batch, auto=auto,
                             microbatch="auto" if "microbatch" in auto else fixed, remat=model.remat,
                             seq_len=cfg.max_seq_len, estimate=estimate)
        settled = compiled.settled
        device_microbatch, step_memory, remat = settled.microbatch, settled.memory, settled.remat
        executable = settled.executable
    else:
        num_microbatches = microbatch_count(cfg, data_parallel_size(mesh))
        compiled = build_step(num_microbatches)
        device_microbatch = per_device_batch // num_microbatches
        executable = compiled.lower(*example_args).compile()
        step_memory = memory_analysis(executable)
        remat = model.remat
    if fp8_products and devices[0].platform in ("gpu", "cuda") and executable is not None:
        print(fp8.compiled_note(executable.as_text()), flush=True)
    if eval_compile is not None:
        eval_compile.result()  # its errors surface here
    from jaxtrain.metrics.flops import training_flops_per_batch

    num_params = mpt_param_count(model)
    flops = training_flops_per_batch(model, cfg.max_seq_len, cfg.global_train_batch_size)
    peak, peak_source = peak_flops(cfg)
    return RunParts(
        cfg=cfg,
        mesh=mesh,
        train_loader=train_loader,
        eval_loader=eval_loader,
        tokenizer=tokenizer,
        state=state,
        state_shardings=state_shardings,
        model_def=model_def,
        train_step=compiled,
        eval_step=eval_step,
        schedule=schedule,
        total_batches=total_batches,
        num_params=num_params,
        flops_per_batch=flops,
        peak_flops_per_device=peak,
        peak_source=peak_source,
        batch_sharding=shard_batch,
        with_control=with_control,
        device_train_microbatch=device_microbatch,
        remat=remat,
        train_step_memory=step_memory,
        weights_placeholders=weights_loaded,
    )


def interval_batches(cfg: Config, value: str | int | None, key: str, parts: RunParts) -> int:
    """An interval time string in batches (0 disables)."""
    if value in (None, 0, "0", "0ba", ""):
        return 0
    if isinstance(value, str) and re.fullmatch(r"\s*0+(\.0+)?[a-z]*\s*", value):
        return 0
    return max(
        1,
        time_to_batches(
            cfg, value, key, batches_per_epoch=parts.train_loader.batches_per_epoch, total_batches=parts.total_batches
        ),
    )

"""Exponential moving average of the weights, as Composer's ``EMA`` algorithm keeps it.

The average lives in the train state (``TrainState.ema``, float32, sharded like the parameters)
and is updated inside the compiled step, so it costs no host work. Composer's rules, in batches:

* Updates fall on Composer's update events: every batch for an interval in batches, the last
  batch of each epoch for one in epochs; ``update_interval`` k updates on every k-th of them.
* The average starts at the first update event at or after ``ema_start``, as a copy of the
  weights then; each later update is ``ema = smoothing * ema + (1 - smoothing) * weights``, with
  ``smoothing = 2 ** -(update_interval / half_life)`` unless ``smoothing`` is given.
* Before it starts, evaluation uses the trained weights; jaxtrain keeps ``ema`` equal to them
  until then, so ``ema`` is always the weights to evaluate, generate and export with (Composer
  checkpoints hold the average as the model's weights).

A step skipped by the health rules (non-finite loss, loss spike) changes no weights, the average
included.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from jaxtrain.config.schema import ConfigError, EMAConfig

if TYPE_CHECKING:
    import jax
from jaxtrain.config.timestr import Time, parse_time

# jax is imported inside the traced functions: configs are checked before jax is imported

DEFAULT_HALF_LIFE = "1000ba"
KEY = "algorithms.ema"


@dataclasses.dataclass(frozen=True)
class EMAPlan:
    """The average's schedule in batches: it starts at batch ``start`` (1-based: the state after
    that many steps), then updates on each batch that is a multiple of ``every``."""

    start: int
    every: int
    smoothing: float


def _times(cfg: EMAConfig) -> tuple[Time | None, Time, Time]:
    """(half life or None, update interval, start), checked as Composer checks them."""
    if cfg.half_life is not None and cfg.smoothing is not None:
        raise ConfigError(f"{KEY}: half_life and smoothing both set the average's decay: keep one of them")
    half_life = None
    if cfg.smoothing is None:
        half_life = parse_time(cfg.half_life or DEFAULT_HALF_LIFE, key=f"{KEY}.half_life")
        if half_life.unit not in ("ba", "ep") or half_life.value <= 0:
            raise ConfigError(f"{KEY}.half_life: {cfg.half_life!r} must be a positive number of batches or epochs "
                              f"(e.g. 1000ba or 1ep)")
    elif not 0 < cfg.smoothing < 1:
        raise ConfigError(f"{KEY}.smoothing: {cfg.smoothing} must be between 0 and 1 (e.g. 0.999)")
    if cfg.update_interval is None:
        interval = Time(1.0, half_life.unit if half_life is not None else "ba")
    else:
        interval = parse_time(cfg.update_interval, key=f"{KEY}.update_interval")
        if interval.unit not in ("ba", "ep") or interval.value < 1:
            raise ConfigError(f"{KEY}.update_interval: {cfg.update_interval!r} must be a whole number of batches or "
                              f"epochs, at least 1 (e.g. 1ba)")
        if half_life is not None and interval.unit != half_life.unit:
            raise ConfigError(f"{KEY}.update_interval: {cfg.update_interval!r} and half_life {str(half_life)!r} "
                              f"must count the same unit (ba or ep)")
    start = parse_time(cfg.ema_start, key=f"{KEY}.ema_start")
    if start.unit not in ("dur", "ba", "ep"):
        raise ConfigError(f"{KEY}.ema_start: {cfg.ema_start!r} must be in dur, ba or ep (e.g. 0.5dur)")
    return half_life, interval, start


def check_ema(cfg: EMAConfig | None) -> None:
    """Raise ``ConfigError`` for settings Composer would refuse; nothing for a valid or absent one."""
    if cfg is not None:
        _times(cfg)


def ema_plan(cfg: EMAConfig, *, batches_per_epoch: int | None, total_batches: int) -> EMAPlan:
    """The schedule of ``cfg`` for a run of ``total_batches`` batches of ``batches_per_epoch``."""
    half_life, interval, start = _times(cfg)
    in_epochs = interval.unit == "ep" or start.unit == "ep"
    if in_epochs and not batches_per_epoch:
        raise ConfigError(f"{KEY}: times in epochs need the dataset's length, which is unknown here; give them in "
                          f"batches")
    event = batches_per_epoch if interval.unit == "ep" else 1  # batches between update events
    if start.unit == "ba":
        first = int(start.value)
    elif start.unit == "dur":
        first = math.ceil(start.value * total_batches - 1e-9)
    elif interval.unit == "ep":  # checked at the epoch's end, when the epoch count has moved on
        first = int(start.value) * batches_per_epoch
    else:  # checked after a batch, while the epoch count is still that of the batch's epoch
        first = int(start.value) * batches_per_epoch + 1
    first = max(first, 1)
    smoothing = cfg.smoothing if half_life is None else 2.0 ** (-(interval.value / half_life.value))
    return EMAPlan(start=-(-first // event) * event, every=int(interval.value) * event, smoothing=float(smoothing))


def init_ema(params: Any) -> Any:
    """The average before it starts: the weights themselves (a float32 copy)."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params)


def update_ema(plan: EMAPlan, ema: Any, params: Any, steps_done: jax.Array, applied: jax.Array) -> Any:
    """The average after the step that brought the count of steps to ``steps_done`` and left the
    weights at ``params`` (traced; ``applied`` false: a skipped step, nothing changes)."""
    import jax
    import jax.numpy as jnp

    tracking = steps_done <= plan.start  # not started yet, or starting now: a copy of the weights
    updating = (steps_done > plan.start) & (steps_done % plan.every == 0)
    keep = jnp.float32(plan.smoothing)

    def one(average, weight):
        weight = weight.astype(jnp.float32)
        new = jnp.where(tracking, weight, jnp.where(updating, keep * average + (1 - keep) * weight, average))
        return jnp.where(applied, new, average)

    return jax.tree.map(one, ema, params)


def evaluation_params(state: Any) -> Any:
    """The weights a train state is evaluated with: its moving average when it keeps one (a state
    without the field, e.g. a research loop's own, is evaluated with its ``params``). With LoRA
    adapters the average is the adapters' (the rest never changes), taken with the frozen weights."""
    from jaxtrain.layers import lora

    ema = getattr(state, "ema", None)
    if ema is None:
        return state.params
    return lora.merge_trainable(ema, lora.split_trainable(state.params)[1]) if lora.has_adapters(state.params) else ema

"""Learning-rate schedules with Composer's formulas, as Optax schedules of the batch index.

``schedule(t)`` is the learning rate for the batch trained when ``t`` batches are complete
(Composer's ``state.timestamp.batch`` during that batch); the optimizer calls it with its own
update count, so the first update uses ``schedule(0)``, which is 0 under a linear warmup.

Multipliers (``base_lr`` times these), with ``tau = (t - t_warmup) / (t_max - t_warmup)`` clipped to
[0, 1] (0 when ``t_max <= t_warmup``):

- ``cosine_with_warmup``: ``t / t_warmup`` while ``t < t_warmup``, then
  ``alpha_f + (1 - alpha_f) * (1 + cos(pi * tau)) / 2`` (Composer's CosineAnnealingWithWarmupScheduler).
- ``linear_decay_with_warmup``: ``alpha_i * t / t_warmup`` while warming up, then
  ``alpha_i + (alpha_f - alpha_i) * tau`` (LinearWithWarmupScheduler).
- ``constant_with_warmup``: ``alpha * t / t_warmup`` while warming up, then ``alpha``
  (ConstantWithWarmupScheduler is LinearWithWarmupScheduler with alpha_i = alpha_f = alpha, so
  it stays at ``alpha`` past ``t_max``; ``alpha`` defaults to 1).
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
import optax

from jaxtrain.config.schema import ConfigError, SchedulerConfig

SCHEDULERS = ("cosine_with_warmup", "linear_decay_with_warmup", "constant_with_warmup")


def _warmup_then(step, t_warmup: int, warmup_peak: float, after: Callable):
    """``warmup_peak * t / t_warmup`` for ``t < t_warmup``, else ``after(t)``."""
    t = jnp.asarray(step, jnp.float32)
    if t_warmup <= 0:
        return after(t)
    return jnp.where(t < t_warmup, warmup_peak * t / t_warmup, after(t))


def _decay_fraction(t, t_warmup: int, t_max: int):
    """Fraction of the post-warmup time elapsed, clipped to [0, 1]; 0 when t_max <= t_warmup."""
    if t_max <= t_warmup:
        return jnp.zeros_like(t)
    return jnp.clip((t - t_warmup) / (t_max - t_warmup), 0.0, 1.0)


def lr_multiplier(cfg: SchedulerConfig, *, t_warmup: int, t_max: int) -> optax.Schedule:
    """The schedule's multiplier of the peak lr as a function of the batch index (durations in batches)."""
    if cfg.name == "cosine_with_warmup":
        alpha_f = cfg.alpha_f

        def after(t):
            tau = _decay_fraction(t, t_warmup, t_max)
            return alpha_f + (1.0 - alpha_f) * 0.5 * (1.0 + jnp.cos(math.pi * tau))

        return lambda step: _warmup_then(step, t_warmup, 1.0, after)
    if cfg.name == "linear_decay_with_warmup":
        alpha_i, alpha_f = cfg.alpha_i, cfg.alpha_f

        def after(t):
            return alpha_i + (alpha_f - alpha_i) * _decay_fraction(t, t_warmup, t_max)

        return lambda step: _warmup_then(step, t_warmup, alpha_i, after)
    if cfg.name == "constant_with_warmup":
        alpha = float(cfg.alpha)
        return lambda step: _warmup_then(step, t_warmup, alpha, lambda t: jnp.full_like(t, alpha))
    raise ValueError(f"scheduler.name: unknown scheduler {cfg.name!r}; valid names: {', '.join(SCHEDULERS)}")


def build_schedule(
    cfg: SchedulerConfig,
    *,
    base_lr: float,
    total_batches: int,
    to_batches: Callable[[str], int],
) -> optax.Schedule:
    """The learning rate as a function of the batch index: ``base_lr * multiplier(t)``.

    ``to_batches`` turns the config's time strings ("100ba", "0.1dur", ...) into batch counts;
    ``total_batches`` is the run length, which ``t_max`` must cover (as Composer requires).
    """
    t_warmup = int(to_batches(cfg.t_warmup))
    t_max = int(to_batches(cfg.t_max))
    if t_warmup < 0:
        raise ConfigError(f"scheduler.t_warmup: {cfg.t_warmup!r} is negative ({t_warmup} batches)")
    if t_max < total_batches:
        raise ConfigError(
            f"scheduler.t_max: {cfg.t_max!r} is {t_max} batches, shorter than the run ({total_batches} batches); "
            "the schedule would be undefined at the end of training. Use t_max: 1dur or longer."
        )
    multiplier = lr_multiplier(cfg, t_warmup=t_warmup, t_max=t_max)
    return lambda step: base_lr * multiplier(step)

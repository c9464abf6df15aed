"""Wall time and dollars of a training run on a hardware type.

Two FLOP counts are in play, and each is used where it belongs:

* ``scaling_flops = 6 * N * D``: the scaling-law count, used for Chinchilla allocation and loss
  (``plan.chinchilla``).
* ``model_flops``: LLM Foundry's MFU accounting, ``3 * B * (2 * N * seq + n_layers * 4 * d_model *
  seq**2)`` per batch (``jaxtrain.metrics.flops.mpt_flops_per_batch``), which adds attention's
  ``seq**2`` term. Wall time is ``model_flops / (devices * peak * MFU)``, so an MFU read off LLM
  Foundry's throughput tables (or measured by ``jaxtrain bench``, which uses the same formula)
  gives the time that the measured throughput would give.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jaxtrain.metrics.flops import mpt_flops_per_batch
from jaxtrain.metrics.hardware import Hardware
from jaxtrain.plan import chinchilla

SECONDS_PER_HOUR = 3600.0


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the attention FLOPs depend on: depth, width and training sequence length."""

    n_layers: int
    d_model: int
    seq_len: int = 2048
    name: str = ""


def model_flops(n_params: float, n_tokens: float, shape: ModelShape) -> float:
    """LLM Foundry's model FLOPs for training on ``n_tokens`` tokens (forward + backward)."""
    sequences = n_tokens / shape.seq_len
    return mpt_flops_per_batch(n_params, shape.n_layers, shape.d_model, shape.seq_len, sequences)


def model_flops_per_token(n_params: float, shape: ModelShape) -> float:
    """LLM Foundry's model FLOPs per training token: ``6*N + 12*n_layers*d_model*seq``."""
    return model_flops(n_params, shape.seq_len, shape) / shape.seq_len


@dataclasses.dataclass(frozen=True)
class RunCost:
    """Time and money of training ``params`` on ``tokens`` with ``devices`` of ``hardware``."""

    params: float
    tokens: float
    shape: ModelShape
    hardware: Hardware
    devices: int
    mfu: float
    precision: str = "amp_bf16"

    @property
    def scaling_flops(self) -> float:
        return chinchilla.scaling_flops(self.params, self.tokens)

    @property
    def model_flops(self) -> float:
        return model_flops(self.params, self.tokens, self.shape)

    @property
    def seconds(self) -> float:
        peak = self.hardware.peak_flops(self.precision)
        return self.model_flops / (self.devices * peak * self.mfu)

    @property
    def hours(self) -> float:
        return self.seconds / SECONDS_PER_HOUR

    @property
    def days(self) -> float:
        return self.hours / 24.0

    @property
    def device_hours(self) -> float:
        return self.hours * self.devices

    @property
    def cost_usd(self) -> float:
        return self.device_hours * self.hardware.price_per_hour_usd

    @property
    def tokens_per_second_per_device(self) -> float:
        return self.tokens / self.seconds / self.devices

    @property
    def loss(self) -> float:
        return chinchilla.predicted_loss(self.params, self.tokens)


def check_mfu(mfu: float) -> float:
    """``mfu`` if it is a fraction in (0, 1], else a one-line error."""
    if not 0.0 < mfu <= 1.0:
        raise ValueError(f"MFU must be a fraction in (0, 1], got {mfu}")
    return mfu


def device_hours_for_budget(budget_usd: float, hardware: Hardware) -> float:
    """Device-hours that ``budget_usd`` buys at the hardware's hourly price."""
    if hardware.price_per_hour_usd <= 0:
        raise ValueError(f"hardware {hardware.name!r} has no price per hour above 0, so a dollar budget buys no "
                         f"definite time: pass --price-per-hour (above 0), or plan owned hardware by --hours or "
                         f"--budget-flops")
    return budget_usd / hardware.price_per_hour_usd


def model_flops_for_device_hours(
    device_hours: float, hardware: Hardware, mfu: float, precision: str = "amp_bf16"
) -> float:
    """Model FLOPs that ``device_hours`` deliver at ``mfu`` of the dense peak."""
    return device_hours * SECONDS_PER_HOUR * hardware.peak_flops(precision) * mfu


def allocation_for_model_flops(
    budget_model_flops: float,
    shape_for_params: Callable[[float], ModelShape],
    approach: str = "approach1",
) -> tuple[chinchilla.Allocation, ModelShape]:
    """The compute-optimal allocation whose LLM Foundry model FLOPs fill ``budget_model_flops``.

    Hardware delivers model FLOPs (attention included); Chinchilla allocates ``6*N*D``. The two
    differ by the attention share ``12*n_layers*d_model*seq / 6N``, which depends on the model
    shape chosen for ``N``, so the split is found by a short fixed-point iteration.
    """
    if not budget_model_flops > 0:
        raise ValueError(f"the compute budget must be positive, got {budget_model_flops:.3g} FLOPs")
    scaling = budget_model_flops
    for _ in range(20):
        allocation = chinchilla.compute_optimal(scaling, approach)
        shape = shape_for_params(allocation.params)
        overhead = model_flops_per_token(allocation.params, shape) / (6.0 * allocation.params)
        updated = budget_model_flops / overhead
        if abs(updated - scaling) <= 1e-9 * scaling:
            break
        scaling = updated
    allocation = chinchilla.compute_optimal(scaling, approach)
    return allocation, shape_for_params(allocation.params)

"""Scaling-law and cost planning: Chinchilla allocation and loss, time and dollars on a hardware
type, the scaling ladder, and a per-device memory estimate. ``jaxtrain plan`` is ``plan.cli``."""

from jaxtrain.plan.chinchilla import Allocation, compute_optimal, compute_optimal_for_params, predicted_loss
from jaxtrain.plan.cost import ModelShape, RunCost, model_flops

__all__ = [
    "Allocation",
    "ModelShape",
    "RunCost",
    "compute_optimal",
    "compute_optimal_for_params",
    "model_flops",
    "predicted_loss",
]

"""Chinchilla scaling laws (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models").

Two things come from the paper, and they are kept apart:

* **Allocation** (how to split a FLOP budget ``C`` into parameters ``N`` and tokens ``D``): a power
  law ``N_opt = G * C**a`` with ``D_opt = C / (6 * N_opt)``. The default, ``approach1``, is fitted
  (least squares in log space) to the nine rows of the paper's Table 3, which are Approach 1's
  projections (a ~ b ~ 0.50: double the compute, ~1.41x params and ~1.41x tokens; about 20 tokens
  per parameter). ``approach2`` and ``approach3`` are fitted the same way to Table A3's columns.
  ``parametric`` is the closed-form argmin of the published loss law below; with its rounded
  exponents it allocates noticeably more tokens than the paper's own Approach 3 column (1B params
  at 44B tokens, against Table A3's 27.1B): the paper computed Table A3 from the unrounded fit.

* **Loss prediction**: Approach 3's parametric law ``L(N, D) = E + A / N**alpha + B / D**beta``
  with the published ``E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28`` (nats per
  token on the paper's MassiveText data: a guide to relative gains, not to the loss a jaxtrain run
  on other data will log).

All FLOPs here are the scaling-law count ``C = 6 * N * D`` (no attention term), as in the paper's
tables. Wall time on real hardware uses LLM Foundry's accounting instead (see ``plan.cost``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Published fit of Approach 3 (Section 3.3, Equation 10).
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28

# Table 3 (Approach 1): (parameters, FLOPs, tokens) as printed.
TABLE_3 = (
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
)

# Table A3 (Approaches 2 and 3), same layout.
TABLE_A3_APPROACH_2 = (
    (400e6, 1.84e19, 7.7e9),
    (1e9, 1.20e20, 20.0e9),
    (10e9, 1.32e22, 219.5e9),
    (67e9, 6.88e23, 1.7e12),
    (175e9, 4.54e24, 4.3e12),
    (280e9, 1.18e25, 7.1e12),
    (520e9, 4.19e25, 13.4e12),
    (1e12, 1.59e26, 26.5e12),
    (10e12, 1.75e28, 292.0e12),
)
TABLE_A3_APPROACH_3 = (
    (400e6, 2.21e19, 9.2e9),
    (1e9, 1.62e20, 27.1e9),
    (10e9, 2.46e22, 410.1e9),
    (67e9, 1.71e24, 4.1e12),
    (175e9, 1.26e25, 12.0e12),  # printed as 1.26e+24, a typo: 6 * 175e9 * 12.0e12 = 1.26e25
    (280e9, 3.52e25, 20.1e12),
    (520e9, 1.36e26, 43.5e12),
    (1e12, 5.65e26, 94.1e12),
    (10e12, 8.55e28, 1425.5e12),
)

APPROACH_DESCRIPTIONS = {
    "approach1": "Chinchilla Approach 1 (training-curve envelope, a=b=0.50), power law fitted to the paper's Table 3",
    "approach2": "Chinchilla Approach 2 (IsoFLOP profiles, a=0.49), power law fitted to the paper's Table A3",
    "approach3": "Chinchilla Approach 3 (parametric loss, a=0.46), power law fitted to the paper's Table A3",
    "parametric": "closed-form argmin of the published L(N,D) (rounded alpha=0.34, beta=0.28) under 6*N*D = C",
}


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """``N_opt = coefficient * C**exponent`` and ``D_opt = C / (6 * N_opt)``."""

    coefficient: float
    exponent: float

    def params(self, flops: float) -> float:
        return self.coefficient * flops**self.exponent

    def flops_for_params(self, n_params: float) -> float:
        return (n_params / self.coefficient) ** (1.0 / self.exponent)


def _fit(table: tuple[tuple[float, float, float], ...]) -> PowerLaw:
    params = np.array([row[0] for row in table])
    flops = np.array([row[1] for row in table])
    exponent, log_coefficient = np.polyfit(np.log(flops), np.log(params), 1)
    return PowerLaw(float(math.exp(log_coefficient)), float(exponent))


def _parametric_law() -> PowerLaw:
    # argmin over N of L(N, C / (6N)): N_opt = G * (C/6)**(beta/(alpha+beta)), G = (alpha*A/(beta*B))**(1/(alpha+beta)).
    g = (ALPHA * A / (BETA * B)) ** (1.0 / (ALPHA + BETA))
    exponent = BETA / (ALPHA + BETA)
    return PowerLaw(g * 6.0 ** (-exponent), exponent)


ALLOCATIONS: dict[str, PowerLaw] = {
    "approach1": _fit(TABLE_3),
    "approach2": _fit(TABLE_A3_APPROACH_2),
    "approach3": _fit(TABLE_A3_APPROACH_3),
    "parametric": _parametric_law(),
}


def predicted_loss(n_params: float, n_tokens: float) -> float:
    """Approach 3's fitted loss ``E + A / N**alpha + B / D**beta`` (nats per token, MassiveText)."""
    if n_params <= 0 or n_tokens <= 0:
        raise ValueError(f"parameters and tokens must be positive, got {n_params} and {n_tokens}")
    return E + A / n_params**ALPHA + B / n_tokens**BETA


@dataclasses.dataclass(frozen=True)
class Allocation:
    """A compute-optimal split of a scaling-law FLOP budget ``flops = 6 * params * tokens``."""

    flops: float
    params: float
    tokens: float
    approach: str

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    @property
    def loss(self) -> float:
        return predicted_loss(self.params, self.tokens)


def _law(approach: str) -> PowerLaw:
    try:
        return ALLOCATIONS[approach]
    except KeyError:
        raise ValueError(f"unknown allocation {approach!r}; valid: {', '.join(ALLOCATIONS)}") from None


def compute_optimal(flops: float, approach: str = "approach1") -> Allocation:
    """The compute-optimal parameters and tokens for ``flops = 6*N*D`` scaling-law FLOPs."""
    if not flops > 0:
        raise ValueError(f"the FLOP budget must be positive, got {flops}")
    params = _law(approach).params(flops)
    return Allocation(flops=flops, params=params, tokens=flops / (6.0 * params), approach=approach)


def compute_optimal_for_params(n_params: float, approach: str = "approach1") -> Allocation:
    """The FLOP budget (and tokens) for which ``n_params`` is compute-optimal: Table 3's direction."""
    if not n_params > 0:
        raise ValueError(f"the parameter count must be positive, got {n_params}")
    flops = _law(approach).flops_for_params(n_params)
    return Allocation(flops=flops, params=n_params, tokens=flops / (6.0 * n_params), approach=approach)


def scaling_flops(n_params: float, n_tokens: float) -> float:
    """The scaling-law FLOP count ``6 * N * D``."""
    return 6.0 * n_params * n_tokens

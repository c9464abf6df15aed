"""Logical axis names for parameters and activations, and their mapping to mesh axes.

Layers name their axes (``batch``, ``length``, ``embed``, ``heads``, ``kv``, ``mlp``, ``vocab``,
``layers``); a rules table maps each name to a mesh axis (``data``, ``fsdp``, ``tensor``) or to
nothing (replicated). Outside a rules context, constraints are no-ops, so models run unsharded
in a notebook.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import linen as nn

# logical name -> mesh axis (or tuple of axes, or None for replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def constrain(x: jax.Array, logical_names: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical axis names (a no-op without rules and a mesh)."""
    return nn.with_logical_constraint(x, tuple(logical_names))

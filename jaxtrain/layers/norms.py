"""LayerNorm as MPT uses it: ``low_precision_layernorm`` (compute dtype) or ``layernorm`` (float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.layers import cpu_kernels
from jaxtrain.layers.linear import annotated

NORM_TYPES = ("low_precision_layernorm", "layernorm")


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; ``scale`` starts at 1, ``bias`` (when present) at 0."""

    def __init__(
        self,
        features: int,
        *,
        norm_type: str = "low_precision_layernorm",
        eps: float = 1e-5,
        use_bias: bool = False,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        if norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type={norm_type!r} is not supported; use one of {NORM_TYPES}")
        self.low_precision = norm_type == "low_precision_layernorm"
        self.eps = eps
        ones = annotated(jax.nn.initializers.ones, ("norm",))
        self.scale = nnx.Param(ones(rngs.params(), (features,), param_dtype))
        if use_bias:
            zeros = annotated(jax.nn.initializers.zeros, ("norm",))
            self.bias = nnx.Param(zeros(rngs.params(), (features,), param_dtype))
        else:
            self.bias = None

    def __call__(self, x: jax.Array, *, compute_dtype=jnp.float32) -> jax.Array:
        if cpu_kernels.use_cpu_kernels(compute_dtype):
            # float32 statistics and a written-out gradient; equal to the low-precision form
            # within bf16 rounding (XLA:CPU evaluates bf16 elementwise math op by op)
            bias = None if self.bias is None else self.bias[...]
            return cpu_kernels.layer_norm(x, self.scale[...], bias, self.eps, compute_dtype)
        # low precision: input and affine parameters cast down first, as Foundry's LPLayerNorm does
        dtype = compute_dtype if self.low_precision else jnp.float32
        x = x.astype(dtype)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + jnp.asarray(self.eps, dtype))
        y = y * self.scale[...].astype(dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y.astype(compute_dtype)

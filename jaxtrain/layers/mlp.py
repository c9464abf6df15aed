"""MPT's feed-forward blocks: ``mptmlp`` (up, act, down) and ``mptglu`` (gated)."""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config.schema import ConfigError
from jaxtrain.layers import cpu_kernels
from jaxtrain.layers.linear import Dense
from jaxtrain.parallel.logical import constrain

FFN_TYPES = ("mptmlp", "mptglu")


def resolve_activation(ffn_act_fn: dict | None) -> Callable[[jax.Array], jax.Array]:
    """Foundry's ``ffn_act_fn`` ({name: gelu, approximate: none} by default) as a JAX function."""
    spec = dict(ffn_act_fn or {"name": "gelu", "approximate": "none"})
    name = spec.pop("name", None)
    if name == "gelu":
        approximate = spec.pop("approximate", "none")
        if approximate not in ("none", "tanh"):
            raise ConfigError(f"model.ffn_config.ffn_act_fn: gelu approximate={approximate!r}; use none or tanh")
        fn = functools.partial(jax.nn.gelu, approximate=True) if approximate == "tanh" else exact_gelu
    elif name == "silu":
        fn = jax.nn.silu
    elif name == "relu":
        fn = jax.nn.relu
    else:
        raise ConfigError(f"model.ffn_config.ffn_act_fn: name={name!r} is not supported; use gelu, silu or relu")
    if spec:
        raise ConfigError(f"model.ffn_config.ffn_act_fn: {name} has no options {sorted(spec)}")
    return fn


def exact_gelu(x: jax.Array) -> jax.Array:
    """``x·Φ(x)``; on the CPU the erf-based kernel, elsewhere ``jax.nn.gelu`` with a
    written-out gradient (both keep only the input for the backward pass)."""
    if cpu_kernels.use_cpu_kernels(x.dtype):
        return cpu_kernels.gelu(x)
    return _gelu(x)


@jax.custom_vjp
def _gelu(x: jax.Array) -> jax.Array:
    """``jax.nn.gelu(x, approximate=False)`` whose backward pass is one fused float32 expression,
    ``dy·(Φ(x) + x·φ(x))``, of the saved input. Autodiff of ``x·Φ(x)`` saves two more
    hidden-sized tensors per layer and sums two cotangent terms in a separate pass over them."""
    return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
    return _gelu(x), x


def _gelu_bwd(x, dy):
    xf = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(xf * (1.0 / math.sqrt(2.0))))
    pdf = jnp.exp(-0.5 * xf * xf) * (1.0 / math.sqrt(2.0 * math.pi))
    return ((dy.astype(jnp.float32) * (cdf + xf * pdf)).astype(dy.dtype),)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


def ffn_hidden_size(d_model: int, expansion_ratio: float) -> int:
    hidden = d_model * expansion_ratio
    if hidden != int(hidden):
        raise ValueError(f"d_model*expansion_ratio = {hidden} must be an integer")
    return int(hidden)


class MPTFFN(nnx.Module):
    """``down(act(up(x)))``, or with ``glu`` ``down(act(gate(x)) * up(x))``."""

    def __init__(
        self,
        d_model: int,
        hidden: int,
        *,
        glu: bool,
        activation: Callable[[jax.Array], jax.Array],
        use_bias: bool,
        in_std: float,
        down_std: float,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        adapters: dict | None = None,
        quantize: str | None = None,
    ):
        """``adapters``: ``{"up_proj" | "gate_proj" | "down_proj": LoraSpec}`` (LoRA adapters);
        ``quantize``: the kernels' format, int8 or nf4 (``jaxtrain.layers.quant``)."""
        adapters = adapters or {}
        self.activation = activation
        dense = functools.partial(Dense, use_bias=use_bias, rngs=rngs, param_dtype=param_dtype, quantize=quantize)
        self.up_proj = dense(d_model, hidden, kernel_std=in_std, axes=("embed", "mlp"), lora=adapters.get("up_proj"))
        self.gate_proj = (dense(d_model, hidden, kernel_std=in_std, axes=("embed", "mlp"),
                                lora=adapters.get("gate_proj")) if glu else None)
        self.down_proj = dense(hidden, d_model, kernel_std=down_std, axes=("mlp", "embed"),
                               lora=adapters.get("down_proj"))

    def __call__(self, x: jax.Array, *, compute_dtype=jnp.float32, lora_rng: jax.Array | None = None) -> jax.Array:
        """``[batch, length, d_model]`` -> ``[batch, length, d_model]`` in the compute dtype;
        ``lora_rng`` draws the adapters' input dropout."""
        up_rng = gate_rng = down_rng = None
        if lora_rng is not None:
            up_rng, gate_rng, down_rng = jax.random.split(lora_rng, 3)
        hidden = self.up_proj(x, compute_dtype=compute_dtype, lora_rng=up_rng)
        if self.gate_proj is not None:
            gate = self.gate_proj(x, compute_dtype=compute_dtype, lora_rng=gate_rng)
            hidden = self.activation(gate) * hidden
        else:
            hidden = self.activation(hidden)
        hidden = constrain(hidden, ("batch", "length", "act_mlp"))
        return self.down_proj(hidden, compute_dtype=compute_dtype, lora_rng=down_rng)

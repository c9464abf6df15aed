"""LoRA adapters, as Hugging Face PEFT defines them (LLM Foundry's ``model.peft_config``).

A targeted linear layer computes ``y = x·W + scaling · (dropout(x)·A)·B`` with ``A [in, r]`` and
``B [r, out]`` (PEFT stores their transposes, ``lora_A.weight [r, in]`` and ``lora_B.weight
[out, r]``), ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). ``B``
starts at zero, so training starts from the model as it was; ``A`` starts Kaiming-uniform as
PEFT's ``init_lora_weights=True`` (``U(±1/sqrt(in))``) or ``N(0, 1/r)`` with ``gaussian``.
Only the adapters train: the model's own weights are frozen, so neither their gradients nor
optimizer moments are ever computed or kept.

DoRA (``use_dora``) adds a magnitude per output column, ``m [out]``, starting at the column norms
of ``W``: the layer computes ``g·(x·W + scaling·(x·A)·B)`` with ``g = m / ||W + scaling·A·B||``
per column, the norm held constant in the gradient, as PEFT does (``Dense.dora_term``).

Which layers take adapters, and the config's checks: ``jaxtrain.config.peft``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config.peft import (  # noqa: F401 - the settings' names, re-exported beside the adapters
    ATTENTION_MODULES,
    FFN_MODULES,
    full_name,
    module_rank,
    module_scaling,
    scaling,
    targeted_modules,
)


ADAPTER_NAMES = ("lora_a", "lora_b", "lora_magnitude")  # the parameters LoRA trains


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The adapter of one linear layer: rank, output scale, input dropout and A's initialisation."""

    r: int
    scaling: float
    dropout: float
    init: bool | str = True
    dora: bool = False  # a magnitude per output column (``Dense.lora_magnitude``)


def adapter_specs(model_cfg: Any) -> dict[str, LoraSpec]:
    """``{module name: LoraSpec}`` for each layer of a block that takes an adapter ({} without LoRA)."""
    peft = getattr(model_cfg, "peft_config", None)
    if peft is None:
        return {}
    init = "gaussian" if peft.init_lora_weights == "gaussian" else True
    return {name: LoraSpec(r=module_rank(model_cfg, name), scaling=module_scaling(model_cfg, name),
                           dropout=float(peft.lora_dropout), init=init, dora=bool(peft.use_dora))
            for name in targeted_modules(model_cfg)}


def adapted_weight(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``W + scale·A·B`` in float32, for ``kernel [..., in, out]``, ``a [..., in, r]``, ``b [..., r, out]``."""
    return jnp.asarray(kernel, jnp.float32) + scale * jnp.einsum(
        "...ir,...ro->...io", jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))


def column_norms(kernel: jax.Array) -> jax.Array:
    """The L2 norm of each output column of ``kernel [..., in, out]``, in float32 (DoRA's)."""
    return jnp.linalg.norm(kernel.astype(jnp.float32), axis=-2)


def uses_dropout(model_cfg: Any) -> bool:
    peft = getattr(model_cfg, "peft_config", None)
    return peft is not None and peft.lora_dropout > 0


def init_a(spec: LoraSpec, in_features: int) -> Callable:
    """PEFT's initialiser of ``A`` (stored ``[in, r]``): Kaiming-uniform with a = sqrt(5) over
    fan-in ``in`` (bound 1/sqrt(in)), or ``N(0, 1/r)`` with ``gaussian``."""

    def init(key, shape, dtype=jnp.float32):
        if spec.init == "gaussian":
            return (jax.random.normal(key, shape, jnp.float32) / spec.r).astype(dtype)
        bound = 1.0 / math.sqrt(in_features)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


def is_adapter(path: tuple, value: Any = None) -> bool:
    """An NNX filter: the adapters' parameters (``lora_a``, ``lora_b``, DoRA's ``lora_magnitude``),
    the ones LoRA trains."""
    return any(str(getattr(key, "key", key)) in ADAPTER_NAMES for key in path)


def split_trainable(params: Any) -> tuple[Any, Any]:
    """(the adapters, the frozen rest) of a parameter state with adapters."""
    return nnx.split_state(params, is_adapter, ...)


def merge_trainable(adapters: Any, frozen: Any) -> Any:
    return nnx.merge_state(adapters, frozen)


def cast_frozen(params: Any, dtype: Any) -> Any:
    """``params`` with the frozen weights in ``dtype`` (the adapters, quantized kernels and their
    scales as they are)."""
    from jaxtrain.layers.quant import SCALE

    adapters, frozen = split_trainable(params)

    def cast(path, x):
        keep = jnp.issubdtype(x.dtype, jnp.integer) or any(str(getattr(key, "key", key)) == SCALE for key in path)
        return x if keep else x.astype(dtype)

    return merge_trainable(adapters, jax.tree_util.tree_map_with_path(cast, frozen))


def has_adapters(params: Any) -> bool:
    return any(is_adapter(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def without_adapters(model_cfg: Any) -> Any:
    """``model_cfg`` with no ``peft_config`` (nor quantized frozen weights): the model that merged weights are for."""
    return dataclasses.replace(model_cfg, peft_config=None, quantize_frozen=None)


def merge_adapters(params: Any, model_cfg: Any) -> Any:
    """The parameters of ``without_adapters(model_cfg)``: each adapted kernel ``W + scaling·A·B``
    (with DoRA, each column of it times ``magnitude / its norm``; float32 products, stored in the
    kernel's dtype), as PEFT's ``merge_and_unload`` computes it. Quantized kernels (int8 or nf4) are
    read back in the dtype of the other frozen weights first (``jaxtrain.layers.quant``)."""
    from jaxtrain.layers.quant import dequantized

    adapters, frozen = split_trainable(params)
    frozen = dequantized(frozen)
    merged = nnx.to_pure_dict(frozen)

    def walk(node: dict, target: dict, module: str | None) -> None:
        for key, value in node.items():
            if key == "lora_a":
                kernel = target["kernel"]
                weight = adapted_weight(kernel, node["lora_a"], node["lora_b"], module_scaling(model_cfg, module))
                if "lora_magnitude" in node:  # DoRA: each column rescaled to its magnitude
                    magnitude = jnp.asarray(node["lora_magnitude"], jnp.float32)
                    weight = weight * (magnitude / column_norms(weight))[..., None, :]
                target["kernel"] = weight.astype(kernel.dtype)
            elif isinstance(value, dict):
                walk(value, target[key], str(key))

    walk(nnx.to_pure_dict(adapters), merged, None)
    nnx.replace_by_pure_dict(frozen, merged)
    return frozen


def start_magnitudes(params: Any, model_cfg: Any) -> Any:
    """``params`` with each DoRA magnitude set to the column norms of its layer's ``W + scaling·A·B``,
    as PEFT starts it: for adapters trained on weights other than those they were made with."""
    from jaxtrain.layers.quant import dequantized

    adapters, frozen = split_trainable(params)
    weights, values = nnx.to_pure_dict(dequantized(frozen, jnp.float32)), nnx.to_pure_dict(adapters)

    def walk(node: dict, weight: dict, module: str | None) -> None:
        for key, value in node.items():
            if key == "lora_magnitude":
                merged = adapted_weight(weight["kernel"], node["lora_a"], node["lora_b"], module_scaling(model_cfg, module))
                node[key] = jax.device_put(column_norms(merged).astype(value.dtype), value.sharding)
            elif isinstance(value, dict):
                walk(value, weight[key], str(key))

    walk(values, weights, None)
    nnx.replace_by_pure_dict(adapters, values)
    return merge_trainable(adapters, frozen)


def rank_text(model_cfg: Any) -> str:
    """``rank 8``, or with ranks per layer ``rank 8 (Wqkv 2, down_proj 6)``."""
    r = int(model_cfg.peft_config.r)
    others = [f"{name} {module_rank(model_cfg, name)}" for name in targeted_modules(model_cfg)
              if module_rank(model_cfg, name) != r]
    return f"rank {r}" + (f" ({', '.join(others)})" if others else "")


def layer_shapes(model_cfg: Any) -> dict[str, tuple[int, int]]:
    """``{module: (in, out)}`` of the linear layers of one block."""
    from jaxtrain.layers.mlp import ffn_hidden_size
    from jaxtrain.models.mpt_config import kv_heads

    d = model_cfg.d_model
    hidden = ffn_hidden_size(d, model_cfg.expansion_ratio)
    return {"Wqkv": (d, d + 2 * kv_heads(model_cfg) * (d // model_cfg.n_heads)), "out_proj": (d, d),
            "up_proj": (d, hidden), "gate_proj": (d, hidden), "down_proj": (hidden, d)}


def adapted_weight_count(model_cfg: Any) -> int:
    """Weights of the layers that take adapters, over all blocks (0 without LoRA)."""
    if getattr(model_cfg, "peft_config", None) is None:
        return 0
    shapes = layer_shapes(model_cfg)
    return model_cfg.n_layers * sum(shapes[name][0] * shapes[name][1] for name in targeted_modules(model_cfg))


def adapter_param_count(model_cfg: Any) -> int:
    """Parameters of ``model_cfg``'s adapters: ``r·(in + out)`` per adapted layer (its own rank) and
    block (0 without)."""
    if getattr(model_cfg, "peft_config", None) is None:
        return 0
    shapes = layer_shapes(model_cfg)
    magnitudes = bool(getattr(model_cfg.peft_config, "use_dora", False))
    return model_cfg.n_layers * sum(module_rank(model_cfg, name) * sum(shapes[name]) + magnitudes * shapes[name][1]
                                    for name in targeted_modules(model_cfg))

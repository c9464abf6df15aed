"""The Linear layer and MPT's weight initialisers.

Kernels are stored ``[in, out]`` (JAX convention; Hugging Face's PyTorch weights are the
transpose). Matmuls run in the compute dtype and accumulate in float32.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config.schema import ConfigError, InitConfig
from jaxtrain.layers import cpu_kernels, fp8, quant
from jaxtrain.layers import lora as lora_lib
from jaxtrain.layers.dropout import dropout

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

# torch.nn.init.calculate_gain for the nonlinearities Foundry configs name
_KAIMING_GAINS = {
    "relu": math.sqrt(2.0),
    "leaky_relu": math.sqrt(2.0),  # negative slope 0, torch's default for kaiming_*
    "linear": 1.0,
    "sigmoid": 1.0,
    "tanh": 5.0 / 3.0,
    "selu": 0.75,
}
SUPPORTED_INITS = ("kaiming_normal_", "normal_")


def annotated(init: Initializer, axes: tuple[str | None, ...]) -> Initializer:
    """Attach logical axis names to an initializer's Variable.

    Sharding is applied by whoever places the state on a mesh (``nnx.get_partition_spec`` plus
    the logical rules), so construction also works outside any mesh.
    """
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def normal_init(std: float) -> Initializer:
    def init(key, shape, dtype=jnp.float32):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def weight_std(init_config: InitConfig, *, fan_in: int, fan_out: int, divisor: float = 1.0) -> float:
    """Standard deviation Foundry's param init gives a Linear-like weight.

    ``fan_in``/``fan_out`` follow torch's convention for the PyTorch-layout weight (for an
    embedding ``[vocab, d_model]`` that is fan_in = d_model). ``divisor`` is the residual
    scaling sqrt(2*n_layers) for ``out_proj``/``down_proj`` when ``init_div_is_residual``.
    """
    if init_config.name == "kaiming_normal_":
        try:
            gain = _KAIMING_GAINS[init_config.init_nonlinearity]
        except KeyError:
            raise ConfigError(
                f"model.init_config.init_nonlinearity={init_config.init_nonlinearity!r} is not supported; "
                f"use one of {sorted(_KAIMING_GAINS)}"
            ) from None
        if init_config.fan_mode not in ("fan_in", "fan_out"):
            raise ConfigError(f"model.init_config.fan_mode={init_config.fan_mode!r}; use fan_in or fan_out")
        fan = fan_in if init_config.fan_mode == "fan_in" else fan_out
        std = gain / math.sqrt(fan)
    elif init_config.name == "normal_":
        if init_config.init_std is None:
            raise ConfigError("model.init_config.name=normal_ needs model.init_config.init_std")
        std = float(init_config.init_std)
    else:
        raise ConfigError(f"model.init_config.name={init_config.name!r} is not supported; use one of {SUPPORTED_INITS}")
    return std / divisor


_PLACEHOLDERS: contextvars.ContextVar = contextvars.ContextVar("loaded_weight_placeholders", default=None)
_PARAM_DTYPE = object()  # placeholders in each parameter's own dtype


@contextlib.contextmanager
def loaded_placeholders(dtype: Any = None) -> Iterator[None]:
    """Inside the block, the ``Dense`` and ``Embed`` layers built hold zeros, not drawn weights:
    for a model whose weights are loaded right after (``load_path``), so that building it on its
    devices draws nothing and takes no float temporaries (drawing a stacked kernel holds several
    float copies of it at once; quantizing it after, more).

    ``dtype``: the kernels' dtype (a LoRA model's frozen weights are kept in the compute dtype),
    or None for each layer's parameter dtype. Quantized kernels hold the codes of zeros and unit
    scales. LoRA adapters are drawn as always."""
    token = _PLACEHOLDERS.set(_PARAM_DTYPE if dtype is None else dtype)
    try:
        yield
    finally:
        _PLACEHOLDERS.reset(token)


_FROZEN_DTYPE: contextvars.ContextVar = contextvars.ContextVar("frozen_kernel_dtype", default=None)


@contextlib.contextmanager
def frozen_kernels_in(dtype: Any) -> Iterator[None]:
    """Inside the block, each ``Dense`` kernel drawn is stored in ``dtype`` as soon as it is drawn:
    a LoRA model's frozen weights (kept in the compute dtype), cast inside the layer scan one layer
    at a time, not as float32 stacks of every layer after it (MPT-7B in bf16: 25 GiB of
    temporaries). The numbers are those of drawing in the parameter dtype and casting after (XLA
    fusing the draw with the cast may round a rare element the other way)."""
    token = _FROZEN_DTYPE.set(dtype)
    try:
        yield
    finally:
        _FROZEN_DTYPE.reset(token)


def placeholder_dtype(param_dtype: Any) -> Any:
    """The dtype a layer's loaded weights start in as placeholders (``loaded_placeholders``), or
    None when they are drawn."""
    dtype = _PLACEHOLDERS.get()
    return param_dtype if dtype is _PARAM_DTYPE else dtype


class Dense(nnx.Module):
    """``y = x @ kernel (+ bias)``; kernel ``[in, out]``, output in the compute dtype.

    With ``quantize`` (``"int8"`` or ``"nf4"``: a LoRA run's frozen weights, ``jaxtrain.layers.quant``)
    the kernel is stored in that format beside its float32 scales, ``kernel_scale``, and read back
    as the float kernel they stand for.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        kernel_std: float,
        axes: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        lora: lora_lib.LoraSpec | None = None,
        quantize: str | None = None,
    ):
        kernel_key = rngs.params()
        placeholder = placeholder_dtype(param_dtype)  # weights loaded right after: not drawn
        shape = (in_features, out_features)
        if quantize:  # stored in 8 or 4 bits with float32 scales
            if placeholder is not None:
                q, scale = quant.placeholder(shape, quantize)
            else:
                q, scale = quant.quantize(normal_init(kernel_std)(kernel_key, shape, param_dtype), quantize)
            self.kernel = nnx.Param(annotated(lambda *_: q, axes)(kernel_key, q.shape, q.dtype))
            scale_axes = (None, axes[1]) if scale.ndim == 2 else (axes[1],)  # nf4: [blocks, out]
            self.kernel_scale = nnx.Param(annotated(lambda *_: scale, scale_axes)(kernel_key, scale.shape, scale.dtype))
        else:
            kernel_init = normal_init(kernel_std) if placeholder is None else jax.nn.initializers.zeros
            frozen = _FROZEN_DTYPE.get() if placeholder is None else None
            if frozen is not None:  # a LoRA model's frozen kernel, drawn in param_dtype and stored in frozen
                drawn = kernel_init
                kernel_init = lambda key, shape, dtype: drawn(key, shape, param_dtype).astype(dtype)  # noqa: E731
            self.kernel = nnx.Param(annotated(kernel_init, axes)(kernel_key, shape, placeholder or frozen or param_dtype))
            self.kernel_scale = None
        if use_bias:
            bias_init = annotated(jax.nn.initializers.zeros, (axes[1],))
            self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
        else:
            self.bias = None
        # LoRA (``jaxtrain.layers.lora``): the adapter's A [in, r] and B [r, out], B zero at first.
        # A's key derives from the kernel's without drawing from ``rngs``, so a model with adapters
        # has the same weights as the one without.
        if lora is not None:
            a_init = annotated(lora_lib.init_a(lora, in_features), (axes[0], None))
            b_init = annotated(jax.nn.initializers.zeros, (None, axes[1]))
            self.lora_a = nnx.LoRAParam(a_init(jax.random.fold_in(kernel_key, 1), (in_features, lora.r), param_dtype))
            self.lora_b = nnx.LoRAParam(b_init(kernel_key, (lora.r, out_features), param_dtype))
            self.lora_scaling, self.lora_dropout = lora.scaling, lora.dropout
            # DoRA's magnitude [out]: the column norms of W + scaling·A·B, those of W while B is zero
            kernel = self.weight()
            m_init = annotated(lambda key, shape, dtype: lora_lib.column_norms(kernel).astype(dtype), (axes[1],))
            self.lora_magnitude = nnx.LoRAParam(m_init(kernel_key, (out_features,), param_dtype)) if lora.dora else None
        else:
            self.lora_a = self.lora_b = self.lora_magnitude = None

    def weight(self, dtype=None) -> jax.Array:
        """The kernel ``[in, out]`` (a quantized one read back as float), in ``dtype`` (default: as
        stored; float32 for a quantized kernel)."""
        if self.kernel_scale is not None:
            return quant.dequantize(self.kernel[...], self.kernel_scale[...], dtype or jnp.float32)
        kernel = self.kernel[...]
        return kernel if dtype is None else kernel.astype(dtype)

    def __call__(self, x: jax.Array, *, compute_dtype=jnp.float32, lora_rng: jax.Array | None = None) -> jax.Array:
        """``x [..., in]`` -> ``[..., out]`` in the compute dtype; ``lora_rng`` draws the adapter's
        input dropout (none without it)."""
        y = self._product(x, compute_dtype)
        if self.lora_a is None:
            return y
        if self.lora_magnitude is not None:
            return y + self.dora_term(x, y, compute_dtype=compute_dtype, lora_rng=lora_rng)
        return y + self.adapter(x, compute_dtype=compute_dtype, lora_rng=lora_rng)

    def dora_term(self, x: jax.Array, y: jax.Array, *, compute_dtype=jnp.float32,
                  lora_rng: jax.Array | None = None) -> jax.Array:
        """DoRA's term, added to ``y = x·W (+ bias)`` as PEFT adds it: ``(g - 1)·(x'·W) + g·scaling·(x'·A)·B``
        with ``x' = dropout(x)`` and ``g = magnitude / ||W + scaling·A·B||`` per output column, the
        norm held constant (no gradient flows through it). Without dropout ``x'·W`` is ``y`` less
        the bias; with it, one more product."""
        a, b = self.lora_a[...], self.lora_b[...]
        merged = lora_lib.adapted_weight(self.weight(), a, b, self.lora_scaling)
        g = self.lora_magnitude[...].astype(jnp.float32) / jax.lax.stop_gradient(lora_lib.column_norms(merged))
        if lora_rng is not None and self.lora_dropout > 0:
            x = dropout(x, self.lora_dropout, lora_rng)
            base = self.with_weight(lambda x, kernel: _plain_product(x, kernel, compute_dtype), x,
                                    compute_dtype).astype(jnp.float32)
        else:
            base = y.astype(jnp.float32) - (0.0 if self.bias is None else self.bias[...].astype(jnp.float32))
        update = _plain_product(_plain_product(x, a, compute_dtype), b, compute_dtype).astype(jnp.float32)
        return ((g - 1) * base + g * self.lora_scaling * update).astype(compute_dtype)

    def adapter(self, x: jax.Array, *, compute_dtype=jnp.float32, lora_rng: jax.Array | None = None) -> jax.Array:
        """The adapter's term ``scaling · (dropout(x)·A)·B`` in the compute dtype, as PEFT adds it."""
        h = self.adapter_input(x, compute_dtype=compute_dtype, lora_rng=lora_rng)
        return self.adapter_output(h, self.lora_b[...], compute_dtype=compute_dtype)

    def adapter_input(self, x: jax.Array, *, compute_dtype=jnp.float32, lora_rng: jax.Array | None = None):
        """``dropout(x)·A`` ``[..., r]``: the adapter's first product."""
        return _plain_product(dropout(x, self.lora_dropout, lora_rng), self.lora_a[...], compute_dtype)

    def adapter_output(self, h: jax.Array, b: jax.Array, *, compute_dtype=jnp.float32) -> jax.Array:
        """``scaling · h·b`` for ``h`` from ``adapter_input`` and ``b`` B or columns of it."""
        return _plain_product(h, b, compute_dtype) * jnp.asarray(self.lora_scaling, compute_dtype)

    def with_weight(self, fn: Callable, x: jax.Array, compute_dtype) -> Any:
        """``fn(x, kernel)``, the kernel as stored or, quantized, read back in the compute dtype. That
        read is inside a rematerialised function, so the backward pass keeps ``q`` and its scales
        and reads the kernel back again, rather than keeping the float kernel of every layer (the
        float model) until then."""
        if self.kernel_scale is None:
            return fn(x, self.kernel[...])
        read = jax.checkpoint(lambda x, q, scale: fn(x, quant.dequantize(q, scale, compute_dtype)))
        return read(x, self.kernel[...], self.kernel_scale[...])

    def _product(self, x: jax.Array, compute_dtype) -> jax.Array:
        return self.with_weight(lambda x, kernel: self._product_of(x, kernel, compute_dtype), x, compute_dtype)

    def _product_of(self, x: jax.Array, kernel: jax.Array, compute_dtype) -> jax.Array:
        if fp8.enabled():  # amp_fp8: the product in fp8, rounded once to the compute dtype
            y = fp8.dot(x.astype(compute_dtype), kernel.astype(compute_dtype))
            if self.bias is None:
                return y
        elif cpu_kernels.use_cpu_kernels(compute_dtype):
            if self.bias is None:
                return cpu_kernels.dense(x, kernel, compute_dtype, out_dtype=compute_dtype)
            y = cpu_kernels.dense(x, kernel, compute_dtype)
        elif self.bias is None:
            # the product is accumulated in float32 and rounded once; asking for a float32 result
            # and casting after would make that float32 tensor what remat policies save
            return jnp.einsum("...i,io->...o", x.astype(compute_dtype), kernel.astype(compute_dtype))
        else:
            y = jnp.einsum("...i,io->...o", x.astype(compute_dtype), kernel.astype(compute_dtype),
                           preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(compute_dtype)


def _plain_product(x: jax.Array, w: jax.Array, compute_dtype) -> jax.Array:
    """``x @ w`` in the compute dtype, float32-accumulated (the CPU's kernel where it applies)."""
    if cpu_kernels.use_cpu_kernels(compute_dtype):
        return cpu_kernels.dense(x, w, compute_dtype, out_dtype=compute_dtype)
    return jnp.einsum("...i,io->...o", x.astype(compute_dtype), w.astype(compute_dtype))

"""Layer products in fp8 (``precision: amp_fp8``).

Within ``products()`` every bias-free or biased linear layer of the transformer blocks (Q/K/V,
out_proj, the MLP's up/gate/down) takes its matrix product in fp8, as Transformer Engine's
Linear does under LLM Foundry's ``amp_fp8``; the output head, attention itself, LayerNorm, the
loss and the optimizer stay in bf16/float32. The forward product takes e4m3 inputs and weights;
the backward takes e5m2 output gradients (wider range, as gradients need) against e4m3 saved
inputs and weights. Products accumulate in float32 and round once to bf16.

Scaling is per tensor and *current*: each tensor is divided by a power of two chosen from its own
absolute maximum of this step, so that the maximum lands in the fp8 type's top binade. No state
crosses steps, which keeps the train step a pure function of (state, batch): microbatching,
remat, resumption and sharding need nothing special, and the first step is as safe as the
thousandth (PyTorch's float8 training made the same choice and dropped delayed scaling, whose
stale scales overflow when a tensor outgrows its history). Power-of-two scales are exact in
every float type, so dequantising adds no rounding of its own. A tensor with a NaN or infinity
has a non-finite scale and its product is NaN, which the train step's finite check then refuses.

The quantise-barrier-dequantise shape around ``lax.dot_general`` is what XLA's GPU GEMM rewriter
turns into cuBLASLt fp8 matmuls (scales as the GEMM's scalar operands); the barrier stops XLA's
excess-precision simplification from folding the fp8 round trip away. XLA's Triton GEMMs would
instead dequantise in separate kernels, so fp8 runs on GPUs compile with them off
(``GPU_COMPILER_OPTIONS``). On CPUs and on TPUs without fp8 matrix units the same program runs
with the products emulated: the numbers are fp8's, the speed is not.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import jax.numpy as jnp

FORWARD_DTYPE = jnp.float8_e4m3fn  # activations and weights: 3 mantissa bits, max 448
GRADIENT_DTYPE = jnp.float8_e5m2  # output gradients: 2 mantissa bits, max 57344

# XLA options for compiling an fp8 step for a GPU: cuBLASLt takes the fp8 products only with
# Triton GEMMs off.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}

# NVIDIA compute capability from which GPUs have fp8 tensor cores (Ada 8.9, Hopper 9.0, Blackwell)
MIN_COMPUTE_CAPABILITY = (8, 9)

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxtrain_fp8_products", default=False)


@contextlib.contextmanager
def products(enabled: bool = True) -> Iterator[None]:
    """Trace the linear layers' products in fp8 inside this block (no effect when not ``enabled``)."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    """Whether the layer products being traced now are to be taken in fp8."""
    return _ENABLED.get()


def scale_for(amax: jax.Array, dtype) -> jax.Array:
    """The power of two ``s`` >= ``amax / max(dtype)`` (float32 scalar); 1 for an all-zero tensor.

    A non-finite ``amax`` gives a non-finite scale, so the product it feeds is NaN."""
    top = float(jnp.finfo(dtype).max)
    amax = amax.astype(jnp.float32)
    mantissa, exponent = jnp.frexp(amax / top)  # amax / top = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = jnp.clip(jnp.where(mantissa == 0.5, exponent - 1, exponent), -126, 127)
    # 2**exponent built from its bits (exp2 is not exact on every backend)
    scale = jax.lax.bitcast_convert_type(((exponent + 127) << 23).astype(jnp.int32), jnp.float32)
    scale = jnp.where(amax / scale > top, scale * 2, scale)  # amax / top rounded down past a power of two
    return jnp.where(jnp.isfinite(amax), jnp.where(amax > 0, scale, jnp.float32(1.0)), jnp.float32(jnp.nan))


def quantize(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """``x`` divided by its scale and cast to ``dtype``: (fp8 array, float32 scale)."""
    scale = scale_for(jnp.max(jnp.abs(x)), dtype)
    # dividing by a power of two is exact in x's own type; the barrier keeps the fp8 cast
    return jax.lax.optimization_barrier((x / scale.astype(x.dtype)).astype(dtype)), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """The values ``q`` stands for, in ``dtype`` (exact: ``scale`` is a power of two)."""
    return q.astype(dtype) * scale.astype(dtype)


def _product(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., i] @ w [i, o]``."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _forward(x, w):
    if x.dtype != w.dtype:
        raise TypeError(f"fp8.dot takes x and w in one compute dtype, got {x.dtype} and {w.dtype}")
    xq, x_scale = quantize(x, FORWARD_DTYPE)
    wq, w_scale = quantize(w, FORWARD_DTYPE)
    y = _product(dequantize(xq, x_scale, x.dtype), dequantize(wq, w_scale, w.dtype))
    return y, (xq, x_scale, wq, w_scale)


@jax.custom_vjp
def dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., i] @ w [i, o]`` in fp8, for ``x`` and ``w`` in one compute dtype (bf16); the
    result in that dtype.

    A fused kernel (Q, K and V) is best taken as one product whose output is split: XLA merges
    products that share an input, and a merged product over column slices of a dequantised
    kernel is no longer one cuBLASLt fp8 call (the MPT-125M step compiled for an H200 then kept
    its Q/K/V products in bf16)."""
    return _forward(x, w)[0]


def _dot_bwd(saved, g):
    xq, x_scale, wq, w_scale = saved
    dtype = g.dtype
    gq, g_scale = quantize(g, GRADIENT_DTYPE)
    gd = dequantize(gq, g_scale, dtype)
    # dx = g @ wᵀ, dw = xᵀ @ g: each an e5m2 x e4m3 product
    dx = jax.lax.dot_general(gd, dequantize(wq, w_scale, dtype), (((g.ndim - 1,), (1,)), ((), ())))
    rows = dequantize(xq, x_scale, dtype).reshape(-1, xq.shape[-1])
    dw = jax.lax.dot_general(rows, gd.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())))
    return dx, dw


dot.defvjp(_forward, _dot_bwd)


def device_note(device) -> str | None:
    """None when ``device`` multiplies fp8 in hardware; otherwise what amp_fp8 will do on it.

    Raises ValueError for an NVIDIA GPU without fp8 tensor cores (compute capability below 8.9,
    e.g. an A100), where fp8 would only cost accuracy."""
    platform = str(getattr(device, "platform", "")).lower()
    kind = str(getattr(device, "device_kind", ""))
    if platform in ("gpu", "cuda"):
        capability = str(getattr(device, "compute_capability", "") or "")
        try:
            major, minor = (int(part) for part in capability.split(".")[:2])
        except ValueError:
            return f"{kind}: compute capability unknown ({capability!r}); fp8 products may be emulated"
        if (major, minor) < MIN_COMPUTE_CAPABILITY:
            raise ValueError(
                f"precision amp_fp8 needs fp8 tensor cores (NVIDIA compute capability 8.9 or higher: L4, L40S, "
                f"H100, H200, B200); {kind} has {major}.{minor}. Use precision: amp_bf16")
        return None
    if platform == "tpu":
        return (f"precision amp_fp8 on tpu ({kind}): TPUs v4 to v6e have no fp8 matrix units, so there the fp8 "
                f"products are emulated (fp8 numbers at bf16 speed or slower); train with amp_bf16 on them")
    return (f"precision amp_fp8 on {platform} ({kind}): no fp8 matrix units are used, the fp8 products are "
            f"emulated (fp8 numbers at bf16 speed or slower); use it here to test, train with amp_bf16")


def gemm_calls(hlo_text: str) -> int:
    """How many cuBLASLt fp8 GEMM calls a compiled GPU program (its HLO text) makes."""
    return hlo_text.count('custom_call_target="__cublas$lt$matmul$f8"')


def compiled_note(hlo_text: str) -> str:
    """One line on a GPU train step compiled with fp8 products: how many of its GEMMs are cuBLASLt
    fp8 calls, or a warning when XLA kept them all in bf16 (fp8 rounding without fp8 speed)."""
    calls = gemm_calls(hlo_text)
    if calls:
        return f"amp_fp8: the compiled train step takes {calls} fp8 GEMM calls"
    return ("warning: precision amp_fp8: the compiled train step has no fp8 GEMM (XLA kept the layer "
            "products in bf16), so it trains with fp8 rounding but at bf16 speed; use amp_bf16, or a newer jax")

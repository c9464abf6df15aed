"""What fp8 matrix products would save on an H200: the train step compiled by ``gpu_aot.py`` with
every bias-free layer product (Q/K/V, out_proj, up and down projections; not the output head, not
attention) taken in fp8, and its kernel census printed the same way.

    python bench/fp8_aot.py --config configs/mpt/1b.yaml --batch 8 --set model.remat=none [--scaling given]

A sizing experiment, not a training mode: jaxtrain trains in bf16. The products use per-tensor
*current* scaling (each tensor's absolute maximum of this step), e4m3 for activations and
weights, e5m2 for gradients, quantised and dequantised around ``lax.dot_general`` in the pattern
XLA's GEMM rewriter turns into cuBLASLt fp8 calls. What it takes for XLA to emit them:

* an ``optimization_barrier`` after the cast to fp8: otherwise XLA's excess-precision
  simplification folds the fp8 round trip away and the product stays in bf16;
* ``--xla_gpu_enable_triton_gemm=false`` (this script sets it): with Triton GEMMs on, XLA
  dequantises in separate kernels and runs bf16 Triton GEMMs.

The census counts fp8 GEMMs at twice the bf16 peak (1,979 TFLOP/s dense on an H200). Run it in the
side environment ``gpu_aot.py``'s docstring describes.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


SCALING = {"mode": "current"}


def quantize(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """``x`` scaled into ``dtype``'s range and cast: (fp8 array, float32 scale). Current scaling
    divides by this tensor's absolute maximum; ``--scaling given`` by a scale that comes in with
    the step (as delayed scaling's, from earlier steps' maxima), which costs no extra pass."""
    if SCALING["mode"] == "given":
        scale = jnp.float32(1.0)
    else:
        scale = jnp.maximum(jnp.max(jnp.abs(x)).astype(jnp.float32), 1e-12) / float(jnp.finfo(dtype).max)
    return jax.lax.optimization_barrier((x.astype(jnp.float32) / scale).astype(dtype)), scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    return q.astype(jnp.bfloat16) * scale.astype(jnp.bfloat16)


def _forward(x, w):
    (xq, x_scale), (wq, w_scale) = quantize(x, E4M3), quantize(w, E4M3)
    y = jax.lax.dot_general(dequantize(xq, x_scale), dequantize(wq, w_scale), (((x.ndim - 1,), (0,)), ((), ())))
    return y, (xq, x_scale, wq, w_scale)


@jax.custom_vjp
def fp8_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., i] @ w [i, o]`` in fp8 (bf16 in and out)."""
    return _forward(x, w)[0]


def _backward(saved, g):
    xq, x_scale, wq, w_scale = saved
    gq, g_scale = quantize(g, E5M2)
    g_dq, w_dq = dequantize(gq, g_scale), dequantize(wq, w_scale)
    dx = jax.lax.dot_general(g_dq, w_dq, (((g.ndim - 1,), (1,)), ((), ())))
    rows = dequantize(xq, x_scale).reshape(-1, xq.shape[-1]), g_dq.reshape(-1, g.shape[-1])
    dw = jax.lax.dot_general(*rows, (((0,), (0,)), ((), ())))
    return dx, dw


fp8_product.defvjp(_forward, _backward)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--scaling", choices=("current", "given"), default="current",
                        help="current: each tensor's maximum this step; given: a scale from outside the "
                             "step (delayed scaling's cost without its bookkeeping)")  # fmt: skip
    args, rest = parser.parse_known_args(argv)
    SCALING["mode"] = args.scaling
    # read when the first backend starts, which the compile below does
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()
    plain_einsum = jnp.einsum

    def einsum(equation, *operands, **kwargs):
        # the bias-free layer products (Dense and the Q/K/V column slices) in bf16
        if equation == "...i,io->...o" and not kwargs and all(o.dtype == jnp.bfloat16 for o in operands):
            return fp8_product(*operands)
        return plain_einsum(equation, *operands, **kwargs)

    import gpu_aot  # noqa: PLC0415

    jnp.einsum = einsum
    try:
        return gpu_aot.main(rest)
    finally:
        jnp.einsum = plain_einsum


if __name__ == "__main__":
    main()

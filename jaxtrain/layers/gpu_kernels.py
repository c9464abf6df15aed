"""Fused attention on NVIDIA GPUs: cuDNN's flash attention through ``jax.nn.dot_product_attention``.

ALiBi goes in as an additive bias ``-slope*(i-j)`` and packed-document masking as a boolean mask;
the causal mask is cuDNN's own. Used only on the GPU backend in bf16/fp16 without attention
dropout; anything cuDNN turns down at trace time (head size, dtype, library version) falls back
to the XLA formulation (``cudnn_attention`` returns None).

JAX treats an explicit ``bias`` as differentiable and has cuDNN's backward kernel compute its
gradient (for MPT-1B a ``[1, 16, 2048, 2048]`` tensor summed over the batch, per layer), which
nothing here uses: ALiBi is a constant. JAX skips that gradient for a bias it builds itself from
a boolean mask, so the ALiBi bias is handed over the same way: while the call is traced, JAX's
bias-and-mask combiner returns the ALiBi bias (plus the document mask). If that hook is missing
or unused in the installed JAX, the bias goes in as a plain argument, gradient and all.

That bias is a ``[1, heads, L, L]`` tensor in HBM: 128 MiB per layer call for MPT-1B at 2048, but
``2·heads·L²`` bytes grows to 8 GiB at 16k and 128 GiB at 64k. cuDNN 9.13+ on Hopper can instead
add ALiBi inside the kernel from the score's row and column indices (JAX's ``score_mod``, the
flex-attention hook), so no bias exists at all. Which form is used (``alibi_mode``):

* ``key_dims``: ALiBi rides in the ``Q·Kᵀ`` product itself, with no bias and no ``score_mod``.
  Under a causal softmax ``slope·(j-i)`` equals ``slope·j`` up to a constant per query row, which
  the softmax ignores. So each key gets extra head dimensions holding its position ``j`` as
  base-256 digits (integers below 256 are exact in bf16 and fp16), each query the matching
  ``slope·256^m/scale`` split into a high and a low half-precision part, and the value zeros;
  the head size is padded to a multiple of 8 and the extra output columns are dropped.
  Products accumulate in float32, so the added score is ``slope·j`` to about 1e-5 relative:
  closer than a bf16 bias tensor. It costs ``8/head_size`` more attention FLOPs (6 % at 128) and
  holds no ``[heads, L, L]`` tensor, on any cuDNN that takes the padded head size (up to 256 on
  Hopper).
* ``JAXTRAIN_CUDNN_ALIBI=bias``, ``=score_mod`` or ``=key_dims`` forces one;
* ``auto`` (the default) keeps the constant bias while it is at most ``BIAS_BYTES_LIMIT``. Above
  that it takes the first of ``score_mod`` and ``key_dims`` whose one-off probe on this process's
  GPU (a small attention against XLA's, forward and backward) passes, else the bias. Compiling for
  a GPU this process does not drive, nothing can be probed, so ``auto`` keeps the bias there.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

try:  # where JAX builds cuDNN's additive bias; used to pass ALiBi as a constant (see above)
    from jax._src.cudnn import fused_attention_stablehlo as _cudnn_fused
except ImportError:  # pragma: no cover (a JAX without the cuDNN attention module)
    _cudnn_fused = None

from jaxtrain.parallel.platform import target_platform

_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)
ALIBI_MODES = ("auto", "bias", "score_mod", "key_dims")
ALIBI_ENV = "JAXTRAIN_CUDNN_ALIBI"
BIAS_BYTES_LIMIT = 1 << 30  # auto: a larger ALiBi bias is computed in-kernel instead (if it probes well)
ALIBI_DIGIT_BASE = 256  # key_dims: positions as digits below 256, exact in bf16 and fp16
_warned: set[str] = set()
_combiner_lock = threading.Lock()


def use_cudnn_attention(q: jax.Array, compute_dtype, dropout_rate: float) -> bool:
    """Whether to try cuDNN: GPU backend, half precision, no dropout, head size a multiple of 8 up to 128."""
    return cudnn_attention_applies(q.shape[-1], compute_dtype, dropout_rate)


def cudnn_attention_applies(head_dim: int, compute_dtype, dropout_rate: float, platform: str | None = None) -> bool:
    """``use_cudnn_attention`` from the head size alone, on ``platform`` (default: the target)."""
    return (
        (platform or target_platform()) == "gpu"
        and jnp.dtype(compute_dtype) in [jnp.dtype(d) for d in _FUSED_DTYPES]
        and dropout_rate == 0.0
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def model_uses_cudnn_attention(model_cfg, compute_dtype, platform: str | None = None) -> bool:
    """Whether an MPT config's attention runs in cuDNN (for memory planning before tracing)."""
    return cudnn_attention_applies(model_cfg.d_model // model_cfg.n_heads, compute_dtype,
                                   model_cfg.attn_config.attn_pdrop, platform)  # fmt: skip


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    slopes: jax.Array | None,
    sequence_id: jax.Array | None,
    compute_dtype,
) -> jax.Array | None:
    """Causal attention ``[batch, length, heads, head_dim]`` (k, v with kv_heads dividing heads) in
    cuDNN, or None when cuDNN does not take this configuration."""
    length, heads = q.shape[1], q.shape[2]
    bias = mask = None
    if sequence_id is not None:
        mask = (sequence_id[:, :, None] == sequence_id[:, None, :])[:, None]
    q, k, v = (a.astype(compute_dtype) for a in (q, k, v))
    options = dict(scale=scale, is_causal=True, implementation="cudnn")
    mode = alibi_mode(heads, length, compute_dtype) if slopes is not None else "bias"
    if mode != "bias":
        form = score_mod_alibi_attention if mode == "score_mod" else key_dims_alibi_attention
        try:
            return form(q, k, v, slopes=slopes, mask=mask, scale=scale)
        except (NotImplementedError, ValueError, RuntimeError, TypeError) as err:
            _warn_once(f"cuDNN ALiBi form {mode} unavailable for heads={heads} length={length} "
                       f"({type(err).__name__}: {err}); ALiBi goes in as a bias")  # fmt: skip
    try:
        if slopes is not None:
            pos = jnp.arange(length, dtype=jnp.float32)
            distance = pos[None, :] - pos[:, None]
            bias = (slopes.astype(jnp.float32)[:, None, None] * distance)[None].astype(compute_dtype)
            out = _constant_bias_attention(q, k, v, bias, mask, options)
            if out is not None:
                return out
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, **options)
    except (NotImplementedError, ValueError, RuntimeError, TypeError) as err:
        _warn_once(f"cuDNN attention unavailable for heads={heads} length={length} "
                   f"({type(err).__name__}: {err}); using XLA")  # fmt: skip
        return None


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logging.warning("%s", message)


def alibi_score_mod(score: jax.Array, slopes: jax.Array) -> jax.Array:
    """ALiBi added to a ``[batch, heads, q, k]`` float32 score inside the kernel: ``slope*(j-i)``
    from the score's own row and column indices."""
    rows = jax.lax.broadcasted_iota(jnp.int32, score.shape, 2)
    cols = jax.lax.broadcasted_iota(jnp.int32, score.shape, 3)
    return score + slopes.reshape(1, -1, 1, 1) * (cols - rows).astype(jnp.float32)


def score_mod_alibi_attention(q, k, v, *, slopes, mask, scale) -> jax.Array:
    """Causal cuDNN attention with ALiBi computed in-kernel (cuDNN 9.13+, Hopper or newer); a
    boolean ``mask`` (packed documents) goes in as JAX's constant additive bias."""
    return _cudnn_fused.dot_product_attention(
        q, k, v, mask=mask, scale=scale, mask_type=_cudnn_fused.MaskType.CAUSAL,
        score_mod=alibi_score_mod, score_mod_args=(slopes.astype(jnp.float32),),
    )  # fmt: skip


def alibi_key_columns(slopes: jax.Array, length: int, scale: float, dtype) -> tuple[jax.Array, jax.Array]:
    """The extra head dimensions of the ``key_dims`` form: ``([heads, e], [length, e])`` for the
    queries and the keys, whose product is ``slope·j/scale`` (``e`` = 2 per base-256 digit of the
    position ``j``: each digit twice, against the high and low parts of ``slope·256^m/scale``)."""
    digits = 1
    while ALIBI_DIGIT_BASE**digits < length:  # positions 0 .. length-1
        digits += 1
    if jnp.dtype(dtype) == jnp.float16 and digits > 2:
        raise ValueError(f"ALiBi in key dimensions needs bf16 past {ALIBI_DIGIT_BASE**2} tokens in fp16")
    powers = [ALIBI_DIGIT_BASE**m for m in reversed(range(digits))]
    coef = slopes.astype(jnp.float32)[:, None] / scale * jnp.asarray(powers, jnp.float32)  # [heads, digits]
    high = coef.astype(dtype)
    low = (coef - high.astype(jnp.float32)).astype(dtype)
    query_columns = jnp.stack([high, low], axis=-1).reshape(coef.shape[0], 2 * digits)
    position = np.arange(length)
    key_digits = np.stack([(position // power) % ALIBI_DIGIT_BASE for power in powers], axis=-1)  # [L, digits]
    key_columns = jnp.asarray(np.repeat(key_digits, 2, axis=-1), dtype)
    return query_columns, key_columns


def key_dims_alibi_attention(q, k, v, *, slopes, mask, scale) -> jax.Array:
    """Causal cuDNN attention with ALiBi in extra head dimensions (the ``key_dims`` form of the
    module doc); a boolean ``mask`` (packed documents) goes in as JAX's constant additive bias."""
    length, head_dim = q.shape[1], q.shape[3]
    query_columns, key_columns = alibi_key_columns(slopes, length, scale, q.dtype)
    extra = query_columns.shape[-1]
    padding = -(head_dim + extra) % 8

    def widen(x, columns):
        parts = [x]
        if columns is not None:
            parts.append(jnp.broadcast_to(columns, (*x.shape[:-1], extra)))
        parts.append(jnp.zeros((*x.shape[:-1], padding + (extra if columns is None else 0)), x.dtype))
        return jnp.concatenate(parts, axis=-1)

    q_wide = widen(q, query_columns[None, None])
    k_wide = widen(k, key_columns[None, :, None])
    v_wide = widen(v, None)
    out = jax.nn.dot_product_attention(q_wide, k_wide, v_wide, mask=mask, scale=scale, is_causal=True,
                                       implementation="cudnn")  # fmt: skip
    return out[..., :head_dim]


def alibi_mode(heads: int, length: int, compute_dtype) -> str:
    """``bias``, ``score_mod`` or ``key_dims``: how ALiBi reaches cuDNN for ``heads`` x ``length``
    (see the module doc)."""
    mode = os.environ.get(ALIBI_ENV, "auto").strip().lower() or "auto"
    if mode not in ALIBI_MODES:
        raise ValueError(f"{ALIBI_ENV}={mode!r}; use one of {', '.join(ALIBI_MODES)}")
    if mode != "auto":
        return mode
    bias_bytes = heads * length * length * jnp.dtype(compute_dtype).itemsize
    if bias_bytes <= BIAS_BYTES_LIMIT or _cudnn_fused is None or jax.default_backend() != "gpu":
        return "bias"
    device_kind = jax.devices()[0].device_kind
    if score_mod_probe(device_kind):
        return "score_mod"
    return "key_dims" if key_dims_probe(device_kind) else "bias"


@functools.cache
def score_mod_probe(device_kind: str) -> bool:
    """Whether in-kernel ALiBi works on this GPU: a small GQA attention through ``score_mod``
    against XLA's with the same bias, outputs and gradients within bf16 tolerance. Run once per
    process, on a thread of its own so that it runs eagerly even when first asked while a train
    step is being traced."""
    return _probe("in-kernel ALiBi (score_mod)", score_mod_alibi_attention, device_kind)


@functools.cache
def key_dims_probe(device_kind: str) -> bool:
    """``score_mod_probe`` for ALiBi in extra key dimensions."""
    return _probe("ALiBi in key dimensions", key_dims_alibi_attention, device_kind)


def _probe(name: str, form, device_kind: str) -> bool:
    """Whether ``alibi_form_error(form)`` (run on a thread of its own) is below bf16 tolerance;
    logs the outcome."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            error = pool.submit(alibi_form_error, form).result()
        except Exception as err:  # noqa: BLE001 (any failure means: keep the bias form)
            logging.warning("cuDNN %s unavailable on %s (%s: %s)", name, device_kind, type(err).__name__,
                            str(err)[:200])  # fmt: skip
            return False
    ok = error < 0.05
    (logging.info if ok else logging.warning)(
        "cuDNN %s on %s: max relative error %.4f against XLA; %s", name, device_kind, error,
        "may be used for long sequences" if ok else "not used")
    return ok


def alibi_form_error(form) -> float:
    """The largest relative error of a bias-free ALiBi attention ``form``'s output and gradients
    against XLA's attention with the ALiBi bias: GQA, bf16, causal."""
    from jaxtrain.layers.attention import alibi_slopes  # here: attention imports this module

    b, length, heads, kv_heads, head_dim = 2, 512, 4, 2, 64  # 512: two position digits for key_dims
    rng = np.random.default_rng(0)
    q, ct = (jnp.asarray(rng.standard_normal((b, length, heads, head_dim)), jnp.bfloat16) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, length, kv_heads, head_dim)), jnp.bfloat16) for _ in range(2))
    slopes = alibi_slopes(heads)
    pos = np.arange(length, dtype=np.float32)
    bias = jnp.asarray(slopes[:, None, None] * (pos[None, :] - pos[:, None]))[None].astype(jnp.bfloat16)

    def fused(q, k, v):
        return form(q, k, v, slopes=jnp.asarray(slopes), mask=None, scale=head_dim**-0.5)

    def plain(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=head_dim**-0.5, is_causal=True,
                                            implementation="xla")  # fmt: skip

    def outputs(attend):
        loss = lambda q, k, v: (attend(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32)).sum()  # noqa: E731
        return [jax.jit(attend)(q, k, v), *jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)]

    errors = [jnp.abs(a.astype(jnp.float32) - c.astype(jnp.float32)).max() / jnp.abs(c.astype(jnp.float32)).max()
              for a, c in zip(outputs(fused), outputs(plain))]  # fmt: skip
    return max(float(e) for e in errors)


def _constant_bias_attention(q, k, v, bias, mask, options) -> jax.Array | None:
    """cuDNN attention with ``bias`` (+ ``mask``) as a constant, so its backward pass computes no
    bias gradient; None when the installed JAX does not build the bias where this expects."""
    combine = getattr(_cudnn_fused, "combine_bias_and_mask", None)
    if combine is None:
        return None
    used = []

    def constant_bias(_bias, _mask, dtype):
        used.append(True)
        return combine(bias, mask, dtype)

    with _combiner_lock, _swapped(_cudnn_fused, "combine_bias_and_mask", constant_bias):
        out = jax.nn.dot_product_attention(q, k, v, bias=None, mask=None, **options)
    return out if used else None


@contextlib.contextmanager
def _swapped(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)

"""MPT attention: ALiBi, causal and packed-document masks, the attention op, and the fused-QKV layer."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxtrain.layers import cpu_attention, cpu_kernels, fp8, gpu_kernels, tpu_kernels
from jaxtrain.layers.dropout import dropout
from jaxtrain.layers.linear import Dense
from jaxtrain.layers.norms import LayerNorm
from jaxtrain.parallel.logical import constrain
from jaxtrain.parallel.platform import target_platform

ATTN_TYPES = ("multihead_attention", "multiquery_attention", "grouped_query_attention")


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8) -> np.ndarray:
    """ALiBi slopes ``[n_heads]`` as MosaicML's ``gen_slopes`` computes them.

    N is the next power of two >= n_heads; slopes are 2^(-i*alibi_bias_max/N) for i = 1..N, and
    when N != n_heads the heads take ``concat(slopes[1::2], slopes[::2])[:n_heads]``.
    """
    n = 2 ** math.ceil(math.log2(n_heads))
    slopes = 2.0 ** (-np.arange(1, n + 1, dtype=np.float64) * (alibi_bias_max / n))
    if n != n_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes.astype(np.float32)


def alibi_bias(n_heads: int, length: int, alibi_bias_max: float = 8, *, full: bool = False) -> np.ndarray:
    """MosaicML's ``build_alibi_bias``: ``[n_heads, 1, length]`` (causal) or ``[n_heads, length, length]``.

    The causal form is ``slope*(j-(length-1))`` for key position j; the full form ``-slope*|i-j|``.
    Under a causal mask both give the same softmax (they differ by a constant per query row).
    """
    key_pos = np.arange(1 - length, 1, dtype=np.float32)[None, :]
    if full:
        bias = -np.abs(key_pos - key_pos.T)
    else:
        bias = key_pos
    return alibi_slopes(n_heads, alibi_bias_max)[:, None, None] * bias[None]


def attention_mask(length: int, sequence_id: jax.Array | None = None) -> jax.Array:
    """Boolean ``[batch or 1, length, length]``: query i may attend key j (j <= i, same document)."""
    pos = jnp.arange(length)
    mask = (pos[None, :] <= pos[:, None])[None]
    if sequence_id is not None:
        mask = mask & (sequence_id[:, :, None] == sequence_id[:, None, :])
    return mask


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    slopes: jax.Array | None = None,
    sequence_id: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    compute_dtype=jnp.float32,
) -> jax.Array:
    """Causal attention with optional ALiBi and packed-document masking.

    q ``[batch, length, heads, head_dim]``; k, v ``[batch, length, kv_heads, head_dim]`` with
    kv_heads dividing heads (query head h reads kv head h // (heads // kv_heads)). Scores and
    softmax are float32; the ALiBi bias is added after scaling and before masking. Returns
    ``[batch, length, heads, head_dim]`` in the compute dtype.
    """
    if dropout_rate == 0.0 and cpu_kernels.use_cpu_kernels(compute_dtype):
        return cpu_attention.blocked_causal_attention(
            q, k, v, scale=scale, slopes=slopes, sequence_id=sequence_id, compute_dtype=compute_dtype
        )
    if gpu_kernels.use_cudnn_attention(q, compute_dtype, dropout_rate):
        fused = gpu_kernels.cudnn_attention(
            q, k, v, scale=scale, slopes=slopes, sequence_id=sequence_id, compute_dtype=compute_dtype
        )
        if fused is not None:
            return fused
    if tpu_kernels.use_tpu_flash_attention(q.shape[1], dropout_rate):
        q, k, v = (a.astype(compute_dtype) for a in (q, k, v))
        return tpu_kernels.flash_attention(q, k, v, scale=scale, slopes=slopes, sequence_id=sequence_id)
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, group, head_dim)
    scores = jnp.einsum(
        "bqhgd,bkhd->bhgqk", q.astype(compute_dtype), k.astype(compute_dtype), preferred_element_type=jnp.float32
    )
    scores = scores * jnp.float32(scale)
    if slopes is not None:
        # relative form -slope*(i-j), built from iotas so XLA fuses it rather than storing [heads, L, L]
        pos = jnp.arange(length, dtype=jnp.float32)
        distance = pos[None, :] - pos[:, None]
        bias = slopes.astype(jnp.float32).reshape(kv_heads, group, 1, 1) * distance
        scores = scores + bias[None]
    mask = attention_mask(length, sequence_id)[:, None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = dropout(probs, dropout_rate, dropout_rng)
    out = jnp.einsum(
        "bhgqk,bkhd->bqhgd", probs.astype(compute_dtype), v.astype(compute_dtype), preferred_element_type=jnp.float32
    )
    return out.reshape(batch, length, heads, head_dim).astype(compute_dtype)


def fused_attention_kind(model_cfg, compute_dtype, platform: str | None = None) -> str:
    """Which fused kernel an MPT config's training attention runs in on ``platform`` (default: the
    target): ``"cudnn"`` (GPU), ``"flash"`` (the Pallas kernel on TPU) or ``""`` (XLA's, or the
    CPU kernels, which hold the scores). For memory planning before tracing."""
    platform = platform or target_platform()
    if gpu_kernels.model_uses_cudnn_attention(model_cfg, compute_dtype, platform):
        return "cudnn"
    if platform == "tpu" and tpu_kernels.use_tpu_flash_attention(model_cfg.max_seq_len, model_cfg.attn_config.attn_pdrop,
                                                                 platform="tpu"):  # fmt: skip
        return "flash"
    return ""


@struct.dataclass
class KVCache:
    """One layer's key/value cache for decoding (stacked models add a leading ``[n_layers]`` axis).

    Slots fill left to right, shared by the batch; ``positions`` holds each slot's position in its
    own sequence (-1 for padding and empty slots), so batched prompts of different lengths, padded
    on either side, get their true ALiBi distances and learned positions.
    """

    key: jax.Array  # [batch, max_len, kv_heads, head_dim]
    value: jax.Array  # [batch, max_len, kv_heads, head_dim]
    positions: jax.Array  # int32 [batch, max_len]
    index: jax.Array  # int32 scalar: the slot the next token is written to

    @classmethod
    def empty(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
        zeros = jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
        return cls(zeros, zeros, jnp.full((batch, max_len), -1, jnp.int32), jnp.zeros((), jnp.int32))

    def append(self, key: jax.Array, value: jax.Array, positions: jax.Array) -> "KVCache":
        """Write ``[batch, length, kv_heads, head_dim]`` keys/values and ``[batch, length]`` positions at ``index``."""
        start = (0, self.index, 0, 0)
        return KVCache(
            key=jax.lax.dynamic_update_slice(self.key, key.astype(self.key.dtype), start),
            value=jax.lax.dynamic_update_slice(self.value, value.astype(self.value.dtype), start),
            positions=jax.lax.dynamic_update_slice(self.positions, positions.astype(jnp.int32), (0, self.index)),
            index=self.index + key.shape[1],
        )


def cached_attention(
    q: jax.Array,
    q_positions: jax.Array,
    cache: KVCache,
    *,
    scale: float,
    slopes: jax.Array | None = None,
    compute_dtype=jnp.float32,
) -> jax.Array:
    """Queries ``[batch, length, heads, head_dim]`` at ``q_positions [batch, length]`` against every
    cache slot. A key is visible when its position is set and not after the query's; the ALiBi bias
    is ``-slope*(query position - key position)``. Returns ``[batch, length, heads, head_dim]``.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = cache.key.shape[2]
    group = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, group, head_dim)
    scores = jnp.einsum(
        "bqhgd,bkhd->bhgqk", q.astype(compute_dtype), cache.key.astype(compute_dtype),
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    scores = scores * jnp.float32(scale)
    k_positions = cache.positions[:, None, :]  # [batch, 1, max_len]
    q_positions = q_positions[:, :, None]  # [batch, length, 1]
    if slopes is not None:
        distance = (k_positions - q_positions).astype(jnp.float32)  # [batch, length, max_len]
        scores = scores + slopes.astype(jnp.float32).reshape(1, kv_heads, group, 1, 1) * distance[:, None, None]
    visible = (k_positions >= 0) & (k_positions <= q_positions)
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum(
        "bhgqk,bkhd->bqhgd", probs.astype(compute_dtype), cache.value.astype(compute_dtype),
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    return out.reshape(batch, length, heads, head_dim).astype(compute_dtype)


class MPTAttention(nnx.Module):
    """Fused ``Wqkv`` [Q | K | V], optional clip and QK LayerNorm, attention, ``out_proj``."""

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        kv_n_heads: int,
        use_bias: bool,
        clip_qkv: float | None,
        qk_ln: bool,
        norm_type: str,
        norm_eps: float,
        softmax_scale: float | None,
        attn_pdrop: float,
        in_std: float,
        out_std: float,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        adapters: dict | None = None,
        quantize: str | None = None,
    ):
        """``adapters``: ``{"Wqkv" | "out_proj": LoraSpec}`` for the layers that take LoRA adapters;
        ``quantize``: the kernels' format, int8 or nf4 (``jaxtrain.layers.quant``)."""
        adapters = adapters or {}
        self.n_heads = n_heads
        self.kv_n_heads = kv_n_heads
        self.head_dim = d_model // n_heads
        self.clip_qkv = clip_qkv
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.attn_pdrop = attn_pdrop
        kv_width = kv_n_heads * self.head_dim
        self.Wqkv = Dense(
            d_model, d_model + 2 * kv_width, use_bias=use_bias, kernel_std=in_std,
            axes=("embed", "heads"), rngs=rngs, param_dtype=param_dtype, lora=adapters.get("Wqkv"), quantize=quantize,
        )  # fmt: skip
        if qk_ln:
            norm = dict(norm_type=norm_type, eps=norm_eps, use_bias=use_bias, rngs=rngs, param_dtype=param_dtype)
            self.q_ln = LayerNorm(d_model, **norm)
            self.k_ln = LayerNorm(kv_width, **norm)
        else:
            self.q_ln = self.k_ln = None
        self.out_proj = Dense(
            d_model, d_model, use_bias=use_bias, kernel_std=out_std,
            axes=("heads", "embed"), rngs=rngs, param_dtype=param_dtype, lora=adapters.get("out_proj"),
            quantize=quantize,
        )  # fmt: skip

    def __call__(
        self,
        x: jax.Array,
        *,
        slopes: jax.Array | None,
        sequence_id: jax.Array | None = None,
        compute_dtype=jnp.float32,
        dropout_rng: jax.Array | None = None,
        cache: KVCache | None = None,
        positions: jax.Array | None = None,
        lora_rng: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """``[batch, length, d_model]`` -> ``[batch, length, d_model]`` in the compute dtype;
        ``lora_rng`` draws the adapters' input dropout.

        With ``cache`` (decoding): the new keys/values are written at ``cache.index`` with
        ``positions [batch, length]`` (-1 marks padding), queries attend to the whole cache, and
        ``(out, updated cache)`` is returned.
        """
        batch, length, d_model = x.shape
        kv_width = self.kv_n_heads * self.head_dim
        plain = self.Wqkv.bias is None and self.clip_qkv is None and getattr(self.Wqkv, "lora_magnitude", None) is None
        qkv_rng = out_rng = None
        if lora_rng is not None:
            qkv_rng, out_rng = jax.random.split(lora_rng)
        if plain and not fp8.enabled() and not cpu_kernels.use_cpu_kernels(compute_dtype):
            # three products with column slices of Wqkv: splitting one product's output copies Q,
            # K and V out of it (the H200-compiled 1B step moved 16 GB a step doing so). Not in
            # fp8, where XLA would merge the slices' products back into a bf16 one (fp8.dot).
            # A LoRA adapter adds its term the same way: (dropout(x)·A) times column slices of B.
            splits = [d_model, d_model + kv_width]
            def products(xc, kernel):
                kernel = kernel.astype(compute_dtype)
                return [jnp.einsum("...i,io->...o", xc, w) for w in jnp.split(kernel, splits, axis=-1)]

            q, k, v = self.Wqkv.with_weight(products, x.astype(compute_dtype), compute_dtype)
            if self.Wqkv.lora_a is not None:
                h = self.Wqkv.adapter_input(x, compute_dtype=compute_dtype, lora_rng=qkv_rng)
                q, k, v = (part + self.Wqkv.adapter_output(h, b, compute_dtype=compute_dtype)
                           for part, b in zip((q, k, v), jnp.split(self.Wqkv.lora_b[...], splits, axis=-1)))
        else:
            qkv = self.Wqkv(x, compute_dtype=compute_dtype, lora_rng=qkv_rng)
            if self.clip_qkv is not None:
                qkv = jnp.clip(qkv, -self.clip_qkv, self.clip_qkv)
            q, k, v = jnp.split(qkv, [d_model, d_model + kv_width], axis=-1)
        if self.q_ln is not None:
            q = self.q_ln(q, compute_dtype=compute_dtype)
            k = self.k_ln(k, compute_dtype=compute_dtype)
        q = constrain(q.reshape(batch, length, self.n_heads, self.head_dim), ("batch", "length", "act_heads", "kv"))
        k = k.reshape(batch, length, self.kv_n_heads, self.head_dim)
        v = v.reshape(batch, length, self.kv_n_heads, self.head_dim)
        if cache is not None:
            cache = cache.append(k, v, positions)
            out = cached_attention(
                q, positions, cache, scale=self.softmax_scale, slopes=slopes, compute_dtype=compute_dtype
            )
            return self.out_proj(out.reshape(batch, length, d_model), compute_dtype=compute_dtype), cache
        out = dot_product_attention(
            q, k, v,
            scale=self.softmax_scale, slopes=slopes, sequence_id=sequence_id,
            dropout_rate=self.attn_pdrop, dropout_rng=dropout_rng, compute_dtype=compute_dtype,
        )  # fmt: skip
        return self.out_proj(out.reshape(batch, length, d_model), compute_dtype=compute_dtype, lora_rng=out_rng)

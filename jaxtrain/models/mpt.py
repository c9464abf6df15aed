"""MosaicML's MPT decoder in Flax NNX, parameter names close to Hugging Face's ``MPTForCausalLM``.

Parameter tree (kernels ``[in, out]``; with ``scan_layers`` every block leaf gains a leading
``[n_layers]`` axis named ``layers``, otherwise blocks are ``blocks/0 ... blocks/{n-1}``)::

    wte/embedding            [vocab, d_model]            (vocab, embed)
    wpe/embedding            [max_seq_len, d_model]      (None, embed)   only when alibi is off
    blocks/norm_1/{scale,bias}                [d_model]                  (norm,)
    blocks/attn/Wqkv/{kernel,bias}            [d_model, d_model+2*kv*hd] (embed, heads)
    blocks/attn/{q_ln,k_ln}/{scale,bias}      [d_model], [kv*hd]         (norm,)
    blocks/attn/out_proj/{kernel,bias}        [d_model, d_model]         (heads, embed)
    blocks/norm_2/{scale,bias}                [d_model]
    blocks/ffn/{up_proj,gate_proj}/{kernel,bias}  [d_model, hidden]      (embed, mlp)
    blocks/ffn/down_proj/{kernel,bias}        [hidden, d_model]          (mlp, embed)
    norm_f/{scale,bias}                       [d_model]
    lm_head/kernel                            [d_model, vocab]           (embed, vocab)  untied only
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config.schema import ModelConfig
from jaxtrain.layers import cpu_kernels, lm_loss, lora
from jaxtrain.layers.attention import KVCache, MPTAttention, alibi_slopes
from jaxtrain.layers.dropout import dropout
from jaxtrain.layers.embed import Embed
from jaxtrain.layers.linear import Dense, weight_std
from jaxtrain.layers.mlp import MPTFFN, ffn_hidden_size, resolve_activation
from jaxtrain.layers.norms import LayerNorm
from jaxtrain.models.mpt_config import kv_heads, logit_scale, mpt_param_count, validate_mpt_config
from jaxtrain.parallel.logical import constrain
from jaxtrain.parallel.platform import target_platform

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}
# ``scan_unroll: auto`` unrolls the layer scan up to these depths (compile time grows with them): on
# CPU always, on GPU and TPU when blocks save activations for the backward pass (remat other than full)
AUTO_UNROLL_MAX_LAYERS = 12
AUTO_UNROLL_MAX_LAYERS_ACCELERATOR = 48


class MPTBlock(nnx.Module):
    """Pre-LN block: ``x += attn(norm_1(x))``; ``x += ffn(norm_2(x))`` (residual stream float32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        init = cfg.init_config
        d_model, use_bias = cfg.d_model, not cfg.no_bias
        hidden = ffn_hidden_size(d_model, cfg.expansion_ratio)
        divisor = math.sqrt(2 * cfg.n_layers) if init.init_div_is_residual else 1.0
        std = functools.partial(weight_std, init)
        norm = functools.partial(
            LayerNorm, norm_type=cfg.norm_type, eps=cfg.norm_eps, use_bias=use_bias, rngs=rngs, param_dtype=param_dtype
        )
        self.resid_pdrop = cfg.resid_pdrop
        self.lora_dropout = lora.uses_dropout(cfg)
        adapters = lora.adapter_specs(cfg)
        quantized = cfg.quantize_frozen  # int8 or nf4 frozen weights (jaxtrain.layers.quant)
        self.norm_1 = norm(d_model)
        kv = kv_heads(cfg)
        self.attn = MPTAttention(
            d_model=d_model,
            n_heads=cfg.n_heads,
            kv_n_heads=kv,
            use_bias=use_bias,
            clip_qkv=cfg.attn_config.clip_qkv,
            qk_ln=cfg.attn_config.qk_ln,
            norm_type=cfg.norm_type,
            norm_eps=cfg.norm_eps,
            softmax_scale=cfg.attn_config.softmax_scale,
            attn_pdrop=cfg.attn_config.attn_pdrop,
            in_std=std(fan_in=d_model, fan_out=d_model + 2 * kv * (d_model // cfg.n_heads)),
            out_std=std(fan_in=d_model, fan_out=d_model, divisor=divisor),
            rngs=rngs,
            param_dtype=param_dtype,
            adapters={name: spec for name, spec in adapters.items() if name in lora.ATTENTION_MODULES},
            quantize=quantized,
        )
        self.norm_2 = norm(d_model)
        self.ffn = MPTFFN(
            d_model,
            hidden,
            glu=cfg.ffn_config.ffn_type == "mptglu",
            activation=resolve_activation(cfg.ffn_config.ffn_act_fn),
            use_bias=use_bias,
            in_std=std(fan_in=d_model, fan_out=hidden),
            down_std=std(fan_in=hidden, fan_out=d_model, divisor=divisor),
            rngs=rngs,
            param_dtype=param_dtype,
            adapters={name: spec for name, spec in adapters.items() if name in lora.FFN_MODULES},
            quantize=quantized,
        )

    def __call__(
        self, x, *, slopes, sequence_id=None, compute_dtype=jnp.float32, dropout_rng=None, cache=None, positions=None
    ):
        """``x [batch, length, d_model]`` float32 -> same; with a ``KVCache``, ``(x, updated cache)``."""
        attn_rng = resid_attn_rng = resid_ffn_rng = attn_lora_rng = ffn_lora_rng = None
        if dropout_rng is not None:
            attn_rng, resid_attn_rng, resid_ffn_rng = jax.random.split(dropout_rng, 3)
            if self.lora_dropout:  # the adapters' input dropout, from keys of their own
                attn_lora_rng, ffn_lora_rng = jax.random.split(jax.random.fold_in(dropout_rng, 3))
        h = self.norm_1(x, compute_dtype=compute_dtype)
        if cache is not None:
            h, cache = self.attn(h, slopes=slopes, compute_dtype=compute_dtype, cache=cache, positions=positions)
            x = x + h.astype(jnp.float32)
            x = x + self.ffn(self.norm_2(x, compute_dtype=compute_dtype), compute_dtype=compute_dtype).astype(jnp.float32)
            return x, cache
        h = self.attn(h, slopes=slopes, sequence_id=sequence_id, compute_dtype=compute_dtype, dropout_rng=attn_rng,
                      lora_rng=attn_lora_rng)
        x = x + dropout(h, self.resid_pdrop, resid_attn_rng).astype(jnp.float32)
        h = self.norm_2(x, compute_dtype=compute_dtype)
        h = self.ffn(h, compute_dtype=compute_dtype, lora_rng=ffn_lora_rng)
        x = x + dropout(h, self.resid_pdrop, resid_ffn_rng).astype(jnp.float32)
        return constrain(x, ("batch", "length", "act_embed"))


class MPTForCausalLM(nnx.Module):
    """MPT causal language model: ``input_ids [batch, length]`` -> float32 logits ``[batch, length, vocab]``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        validate_mpt_config(cfg)
        init = cfg.init_config
        self.n_layers = cfg.n_layers
        self.max_seq_len = cfg.max_seq_len
        self.kv_heads, self.head_dim = kv_heads(cfg), cfg.d_model // cfg.n_heads
        self.scan_layers = cfg.scan_layers
        self.scan_unroll = cfg.scan_unroll
        # auto is settled by the trainer, which rebuilds the block with the policy it picks;
        # anything else that builds the model (evaluation, generation) recomputes nothing
        self.remat = "none" if cfg.remat == "auto" else cfg.remat
        self.fused_loss = cfg.fused_loss
        self.emb_pdrop = cfg.emb_pdrop
        self.attn_uses_sequence_id = cfg.attn_config.attn_uses_sequence_id
        self.logit_scale = logit_scale(cfg)
        self.slopes = (
            tuple(float(s) for s in alibi_slopes(cfg.n_heads, cfg.attn_config.alibi_bias_max))
            if cfg.attn_config.alibi
            else None
        )
        if init.emb_init_std is not None:
            emb_std = float(init.emb_init_std)
        else:
            emb_std = weight_std(init, fan_in=cfg.d_model, fan_out=cfg.vocab_size)
        self.wte = Embed(
            cfg.vocab_size, cfg.d_model, std=emb_std, axes=("vocab", "embed"), rngs=rngs, param_dtype=param_dtype
        )
        if not cfg.attn_config.alibi and cfg.learned_pos_emb:
            pos_std = emb_std if init.emb_init_std is not None else weight_std(
                init, fan_in=cfg.d_model, fan_out=cfg.max_seq_len
            )
            self.wpe = Embed(
                cfg.max_seq_len, cfg.d_model, std=pos_std, axes=(None, "embed"), rngs=rngs, param_dtype=param_dtype
            )
        else:
            self.wpe = None
        # one key per layer, so stacked and unrolled models built from one seed hold the same weights
        layer_keys = jax.random.split(rngs.params(), cfg.n_layers)

        def make_block(key):
            return MPTBlock(cfg, rngs=nnx.Rngs(params=key), param_dtype=param_dtype)

        if cfg.scan_layers:
            # drawn one layer after another (a scan, not a vmap): the same numbers, but XLA holds one
            # layer's random draws at a time instead of every layer's (7B on one device: 3.8 GiB, not 48)
            stacked = nnx.scan(make_block, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            self.blocks = stacked(layer_keys)
        else:
            self.blocks = nnx.List([make_block(layer_keys[i]) for i in range(cfg.n_layers)])
        self.norm_f = LayerNorm(
            cfg.d_model, norm_type=cfg.norm_type, eps=cfg.norm_eps, use_bias=not cfg.no_bias,
            rngs=rngs, param_dtype=param_dtype,
        )  # fmt: skip
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Dense(
                cfg.d_model, cfg.vocab_size, use_bias=False,
                kernel_std=weight_std(init, fan_in=cfg.d_model, fan_out=cfg.vocab_size),
                axes=("embed", "vocab"), rngs=rngs, param_dtype=param_dtype,
            )  # fmt: skip

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        compute_dtype=jnp.float32,
        sequence_id: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """float32 logits ``[batch, length, vocab]``."""
        x = self.features(input_ids, compute_dtype=compute_dtype, sequence_id=sequence_id, dropout_rng=dropout_rng)
        return self._logits(x, compute_dtype)

    def lm_loss(
        self,
        input_ids: jax.Array,
        targets: jax.Array,
        *,
        compute_dtype=jnp.float32,
        sequence_id: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        z_loss: float = 0.0,
        fused: bool | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(loss_sum, z_loss_sum, token_count) of the shifted ``targets`` (-100 ignored).

        ``fused`` (default: ``model.fused_loss``) computes the head and the loss in sequence
        chunks without materialising the full logits; the numbers equal the plain path within
        bfloat16 rounding.
        """
        x = self.features(input_ids, compute_dtype=compute_dtype, sequence_id=sequence_id, dropout_rng=dropout_rng)
        if fused is None:
            fused = self.fused_loss
        tied = self.lm_head is None
        weight = self.wte.embedding[...] if tied else self.lm_head.kernel[...]
        if fused:
            return lm_loss.chunked_cross_entropy(
                x, weight, targets, tied=tied, compute_dtype=compute_dtype, z_loss=z_loss, logit_scale=self.logit_scale
            )
        if cpu_kernels.use_cpu_kernels(compute_dtype):  # one backward pass over the logits
            return lm_loss.head_cross_entropy(
                x, weight, targets, tied=tied, compute_dtype=compute_dtype, z_loss=z_loss, logit_scale=self.logit_scale
            )
        return lm_loss.softmax_cross_entropy_sum(self._logits(x, compute_dtype), targets, z_loss)

    def features(
        self,
        input_ids: jax.Array,
        *,
        compute_dtype=jnp.float32,
        sequence_id: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """The final-normed hidden state ``[batch, length, d_model]`` that the output head reads."""
        batch, length = input_ids.shape
        if length > self.max_seq_len:
            raise ValueError(f"input length {length} exceeds model.max_seq_len={self.max_seq_len}")
        if not self.attn_uses_sequence_id:
            sequence_id = None  # as in Foundry, packed-document masking is opt-in by config
        slopes = None if self.slopes is None else jnp.asarray(self.slopes, jnp.float32)

        x = self.wte(input_ids)
        if self.wpe is not None:
            x = x + self.wpe.embedding[:length].astype(jnp.float32)[None]
        emb_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, self.n_layers)
        x = constrain(dropout(x, self.emb_pdrop, emb_rng), ("batch", "length", "act_embed"))

        def layer_rng(index):
            return None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)

        def run_block(graphdef, state, x, rng):
            block = nnx.merge(graphdef, state)
            return block(x, slopes=slopes, sequence_id=sequence_id, compute_dtype=compute_dtype, dropout_rng=rng)

        if self.remat != "none":
            # inside a rolled scan XLA cannot CSE the recompute away; unrolled blocks need the guard
            rolled = self.scan_layers and self._scan_unroll() == 1
            run_block = jax.checkpoint(
                run_block, policy=REMAT_POLICIES[self.remat], static_argnums=(0,), prevent_cse=not rolled
            )

        if self.scan_layers:
            graphdef, state = nnx.split(self.blocks)

            def body(x, layer):
                layer_state, index = layer
                return run_block(graphdef, layer_state, x, layer_rng(index)), None

            x, _ = jax.lax.scan(body, x, (state, jnp.arange(self.n_layers)), unroll=self._scan_unroll())
        else:
            for index, block in enumerate(self.blocks):
                graphdef, state = nnx.split(block)
                x = run_block(graphdef, state, x, layer_rng(index))

        return self.norm_f(x, compute_dtype=compute_dtype)

    def _scan_unroll(self) -> int:
        """Blocks per scan iteration. A rolled scan writes every activation a block saves for the
        backward pass into a stacked buffer (zero-filled first, a dynamic-update-slice per block)
        and reads it back with a dynamic slice. On XLA:CPU that was about 9% of a 4-layer step; in
        the H200-compiled MPT-1B step without remat it is a third of the HBM bytes and two thirds
        of the kernels (``bench/gpu_aot.py``); compiled for a TPU v5p it is 55% of the bytes and
        11 GiB of temporaries. Straight-line code avoids it at the cost of compile time (1B on a
        2-core host: GPU 6.6 s rolled, 61 s unrolled; TPU 12 s and 82 s), so ``auto`` unrolls
        small models on CPU and, on GPU and TPU, models up to 48 layers whose blocks save
        activations; with ``remat: full`` a block saves only its input and the loop costs about
        3%, so it stays."""
        if self.scan_unroll != "auto":
            return min(int(self.scan_unroll), self.n_layers)
        platform = target_platform()
        if platform == "cpu" and self.n_layers <= AUTO_UNROLL_MAX_LAYERS:
            return self.n_layers
        if platform in ("gpu", "tpu") and self.remat != "full" and self.n_layers <= AUTO_UNROLL_MAX_LAYERS_ACCELERATOR:
            return self.n_layers
        return 1

    def _logits(self, x: jax.Array, compute_dtype) -> jax.Array:
        """Output head: final-normed hidden state ``[batch, length, d_model]`` -> float32 logits."""
        if cpu_kernels.use_cpu_kernels(compute_dtype):
            if self.lm_head is None:
                logits = cpu_kernels.tied_logits(x, self.wte.embedding[...], compute_dtype)
            else:
                logits = cpu_kernels.dense(x, self.lm_head.kernel[...], compute_dtype)
        elif self.lm_head is None:
            logits = self.wte.attend(x, compute_dtype=compute_dtype)
        else:
            logits = lm_loss.head_logits(x, self.lm_head.kernel[...], tied=False, compute_dtype=compute_dtype)
        if self.logit_scale is not None:
            logits = logits * jnp.float32(self.logit_scale)
        return constrain(logits, ("batch", "length", "act_vocab"))

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        """An empty cache for every layer: leaves ``[n_layers, batch, max_len, ...]``."""
        one = KVCache.empty(batch, max_len, self.kv_heads, self.head_dim, dtype)
        return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (self.n_layers, *leaf.shape)), one)

    def decode(
        self, input_ids: jax.Array, positions: jax.Array, cache: KVCache, *, compute_dtype=jnp.float32
    ) -> tuple[jax.Array, KVCache]:
        """Run ``input_ids [batch, length]`` at ``positions [batch, length]`` (-1: padding) on top of
        ``cache`` (from ``init_cache``): float32 logits ``[batch, length, vocab]`` and the updated cache.

        Prefill passes the whole padded prompt; each decode step passes one token per sequence.
        """
        slopes = None if self.slopes is None else jnp.asarray(self.slopes, jnp.float32)
        x = self.wte(input_ids)
        if self.wpe is not None:
            x = x + jnp.take(self.wpe.embedding[...], jnp.maximum(positions, 0), axis=0).astype(jnp.float32)

        def run_block(block, x, layer_cache):
            return block(x, slopes=slopes, compute_dtype=compute_dtype, cache=layer_cache, positions=positions)

        if self.scan_layers:
            graphdef, state = nnx.split(self.blocks)

            def body(x, layer):
                layer_state, layer_cache = layer
                return run_block(nnx.merge(graphdef, layer_state), x, layer_cache)

            x, cache = jax.lax.scan(body, x, (state, cache))
        else:
            layer_caches = []
            for index, block in enumerate(self.blocks):
                x, layer_cache = run_block(block, x, jax.tree.map(lambda leaf: leaf[index], cache))
                layer_caches.append(layer_cache)
            cache = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layer_caches)
        return self._logits(self.norm_f(x, compute_dtype=compute_dtype), compute_dtype), cache


__all__ = ["MPTBlock", "MPTForCausalLM", "REMAT_POLICIES", "kv_heads", "mpt_param_count", "validate_mpt_config"]

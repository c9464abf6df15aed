"""Device memory of one training step: parameters, gradients, optimizer state and activations.

Everything is bytes per device. The model state is sharded over ``fsdp * tensor`` devices and
replicated over ``data``; the batch is split over ``data * fsdp``; ``tensor`` splits heads and the
MLP hidden. Activations are what the backward pass keeps, per microbatch, counted for one block
of jaxtrain's MPT (``b`` microbatch, ``L`` sequence, ``d`` width, ``H`` heads, ``f`` MLP hidden,
``c`` bytes of the compute dtype); the list is what ``print_saved_residuals`` shows for the block,
less what XLA fuses away:

* each LayerNorm keeps four ``[L, d]`` intermediates in the compute dtype: ``8*b*L*d*c`` for two
  (and in amp_bf16 the float32 residual stream, ``4*b*L*d``)
* Q, K, V ``b*L*(d + 2*kv_heads*head_dim)*c`` and the attention context ``b*L*d*c``
* attention probabilities: the float32 ``exp`` of the scores and the normalised probabilities
  in the compute dtype that the probs @ V matmul reads, ``b*H*L^2*(4 + c)``; with a fused
  attention kernel (``fused_attention``: cuDNN's flash attention on GPUs, the Pallas flash kernel
  on TPUs) only the softmax statistics, ``4*b*H*L`` (128 times that on TPUs, whose float32
  ``[.., L, 1]`` arrays fill a 128-lane tile per row), and the queries, keys and values once more
  in the kernel's layout; cuDNN also holds one constant ``[H, L, L]`` ALiBi bias up to 1 GiB
* the MLP hidden: GELU's input (its gradient is written out from it) and output (the down
  projection's input), ``2*b*L*f*c``; a gated MLP also the gate's activation and the up
  projection, ``4*b*L*f*c``
* logits ``[b, L, V]``: the float32 logits and their float32 gradient, ``8*b*L*V`` (XLA fuses
  the softmax into the gradient).

That list is what XLA:CPU keeps. The GPU and TPU compilers keep less, and with a fused attention
kernel (the step compiled for those chips) the block counts what their memory figures show
(``bench/gpu_aot.py``): each LayerNorm's float32 input and compute-dtype output, ``2*b*L*d*(4 + c)``
for two; Q, K, V and the attention output once (on TPUs also the output in the kernel's layout);
GELU's input alone (its output is recomputed for the down projection's gradient; a gated MLP
keeps three hidden-sized tensors); and the logits' gradient written over the logits, ``4*b*L*V``
(the head's backward products round it to the compute dtype as they load it).

``remat="full"`` keeps only each block's float32 input and recomputes one block at a time;
``"dots_saveable"`` keeps the float32 matmul outputs (QKV, scores, context, out_proj, up/gate,
down) and recomputes the rest. With remat, the last block's recomputation is counted as live
together with the logits: XLA is free to schedule it before the loss gradient is consumed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxtrain.layers.attention import fused_attention_kind
from jaxtrain.layers.gpu_kernels import BIAS_BYTES_LIMIT
from jaxtrain.layers.lora import adapter_param_count
from jaxtrain.layers.quant import frozen_weight_bytes
from jaxtrain.metrics.hardware import Hardware
from jaxtrain.models.mpt_config import kv_heads, mpt_param_count

OPTIMIZER_STATE_COPIES = {
    "adam": 2, "adamw": 2, "decoupled_adamw": 2,  # first and second moments, fp32
    "lion": 1, "decoupled_lionw": 1,  # momentum, fp32
    "sgd": 0,
}
REMAT_POLICIES = ("none", "full", "dots_saveable")
# amp_fp8 keeps the layer products' saved inputs in 1 byte but everything else in bf16: counted as bf16
COMPUTE_BYTES = {"amp_bf16": 2, "amp_fp8": 2, "bf16": 2, "fp32": 4}
MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of one training step, and whether it fits the device."""

    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    working_weights_bytes: float  # compute-dtype weight copies and gathered FSDP layers
    activations_bytes: float  # per microbatch, under the chosen remat policy
    activations_no_remat_bytes: float
    activations_full_remat_bytes: float
    batch_bytes: float
    device_memory_bytes: float
    usable_fraction: float
    microbatch: int
    per_device_batch: int
    max_microbatch: int  # the largest microbatch that fits (0: not even one sequence)
    remat: str
    ema_bytes: float = 0.0  # the moving average of the weights (algorithms.ema), fp32

    @property
    def total_bytes(self) -> float:
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.ema_bytes
                + self.working_weights_bytes + self.activations_bytes + self.batch_bytes)

    @property
    def usable_bytes(self) -> float:
        return self.device_memory_bytes * self.usable_fraction

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes


def _activation_bytes_per_sequence(model_cfg: Any, seq_len: int, compute_bytes: int, tensor: int,
                                   fused_attention: bool | str = False) -> dict[str, float]:
    """Activation bytes of one sequence: per block under each policy, and the model's ends."""
    d, heads = model_cfg.d_model, model_cfg.n_heads
    qkv_width = d + 2 * kv_heads(model_cfg) * (d // heads)
    hidden = int(d * model_cfg.expansion_ratio)
    glu = model_cfg.ffn_config.ffn_type == "mptglu"
    L, c = seq_len, compute_bytes
    stats = heads * L * 4 * (128 if fused_attention == "flash" else 1)  # softmax statistics, float32

    if fused_attention:  # what the GPU and TPU compilers keep (module docstring)
        norms = 2 * L * d * (c + (4 if c != 4 else 0))  # not split by tensor
        attn = (L * qkv_width * c + (2 if fused_attention == "flash" else 1) * L * d * c + stats) / tensor
        mlp = (3 if glu else 1) * L * hidden * c / tensor
    else:
        norms = L * d * (8 * c + (4 if c != 4 else 0))  # not split by tensor
        attn = (L * qkv_width * c + L * d * c + heads * L * L * (4 + c)) / tensor
        mlp = (4 if glu else 2) * L * hidden * c / tensor
    block = norms + attn + mlp

    if fused_attention:  # the projections' products in the compute dtype, no scores
        dots = (c * (L * qkv_width + L * d + (2 if glu else 1) * L * hidden) / tensor + stats / tensor
                + c * 2 * L * d)
    else:
        dots = (4 * (L * qkv_width + heads * L * L + L * d + (2 if glu else 1) * L * hidden) / tensor
                + 4 * 2 * L * d)  # out_proj and down_proj outputs, replicated
    logits = (4 if fused_attention else 8) * L * model_cfg.vocab_size / tensor
    ends = L * d * (8 + 4 * c)  # embedding out and norm_f in (fp32), norm_f's intermediates
    return {"block": block, "dots": dots, "input": L * d * 4, "logits": logits, "ends": ends}


def activation_bytes(
    model_cfg: Any, *, microbatch: int, seq_len: int, precision: str, remat: str, tensor: int = 1,
    fused_attention: bool | str = False,
) -> float:
    """Activation bytes per device for one microbatch under a remat policy. ``fused_attention``:
    ``"cudnn"`` (or True), ``"flash"`` (TPU) or falsy for XLA's attention."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
    a = _activation_bytes_per_sequence(model_cfg, seq_len, _compute_bytes(precision), tensor, fused_attention)
    saved = {"none": a["block"], "full": a["input"], "dots_saveable": a["dots"]}[remat]
    recompute = 0.0 if remat == "none" else a["block"]  # the block being recomputed in backward
    return (microbatch * (model_cfg.n_layers * saved + recompute + a["logits"] + a["ends"])
            + (_alibi_bias_bytes(model_cfg, seq_len, precision) / tensor
               if fused_attention in (True, "cudnn") else 0.0))  # fmt: skip


def _alibi_bias_bytes(model_cfg: Any, seq_len: int, precision: str) -> float:
    """cuDNN's constant ``[heads, L, L]`` ALiBi bias, one for all layers, while it is small enough
    to be kept as a tensor (larger ones are computed in the kernel or carried in extra head
    dimensions; ``gpu_kernels.alibi_mode``)."""
    size = model_cfg.n_heads * seq_len * seq_len * _compute_bytes(precision)
    return float(size) if model_cfg.attn_config.alibi and size <= BIAS_BYTES_LIMIT else 0.0


def is_gpu(hardware: Hardware) -> bool:
    """Whether a hardware table entry is a GPU (not a TPU chip or the CPU)."""
    return not hardware.name.startswith("tpu") and hardware.name != "cpu"


def hardware_platform(hardware: Hardware) -> str:
    """``gpu``, ``tpu`` or ``cpu`` for a hardware table entry."""
    return "gpu" if is_gpu(hardware) else ("tpu" if hardware.name.startswith("tpu") else "cpu")


def _compute_bytes(precision: str) -> int:
    try:
        return COMPUTE_BYTES[precision]
    except KeyError:
        raise ValueError(f"precision must be one of {', '.join(COMPUTE_BYTES)}, got {precision!r}") from None


def _mesh(mesh_shape: dict[str, int]) -> tuple[int, int, int]:
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes are {', '.join(MESH_AXES)}; got unknown {', '.join(sorted(unknown))}")
    sizes = tuple(int(mesh_shape.get(axis, 1)) for axis in MESH_AXES)
    if any(s < 1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive, got {dict(zip(MESH_AXES, sizes))}")
    return sizes


def estimate_memory(
    model_cfg: Any,
    *,
    global_batch: int,
    microbatch: int,
    seq_len: int,
    precision: str = "amp_bf16",
    mesh_shape: dict[str, int],
    remat: str = "none",
    optimizer: str = "adam",
    hardware: Hardware | None = None,
    n_params: int | None = None,
    usable_fraction: float = 0.9,
    fused_attention: bool | str | None = None,
    ema: bool = False,
) -> MemoryEstimate:
    """Bytes per device of one training step of an MPT model (see the module docstring).

    ``fused_attention`` (default: from ``hardware``: ``"cudnn"`` on a GPU in half precision with a
    head size cuDNN takes, ``"flash"`` on a TPU, else none) counts attention as that kernel keeps it.

    ``microbatch`` is sequences per device per forward/backward; gradients are accumulated (an
    extra fp32 gradient buffer) when it is smaller than the per-device batch ``global_batch /
    (data * fsdp)``. ``usable_fraction`` of the device memory is counted as available, leaving
    room for the runtime, collectives' buffers and fragmentation. ``ema``: the state also keeps a
    moving average of the weights (one more fp32 copy, sharded like them). With LoRA adapters
    (``model.peft_config``), gradients and optimizer moments are the adapters' alone, and the
    frozen weights are kept in the compute dtype (no working copy), or with ``quantize_frozen`` the
    blocks' linear weights in int8 or nf4.
    """
    data, fsdp, tensor = _mesh(mesh_shape)
    batch_shards = data * fsdp
    if global_batch < 1 or global_batch % batch_shards:
        raise ValueError(f"global batch {global_batch} must be a positive multiple of data*fsdp = {batch_shards}")
    per_device_batch = global_batch // batch_shards
    if not 1 <= microbatch <= per_device_batch:
        raise ValueError(f"microbatch {microbatch} must be between 1 and the per-device batch {per_device_batch}")
    if optimizer not in OPTIMIZER_STATE_COPIES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATE_COPIES)}, got {optimizer!r}")
    if n_params is None:
        n_params = int(mpt_param_count(model_cfg))
    c = _compute_bytes(precision)
    state_shards = fsdp * tensor

    # With LoRA adapters (model.peft_config) only they have gradients and optimizer moments, and the
    # frozen weights are kept in the compute dtype (or int8/nf4)
    adapters = adapter_param_count(model_cfg)
    quantized, quantized_bytes = frozen_weight_bytes(model_cfg)  # model.quantize_frozen: int8 or nf4, with scales
    params_bytes = ((c if adapters else 4.0) * (n_params - quantized) + quantized_bytes + 4.0 * adapters) / state_shards
    trained_bytes = 4.0 * adapters / state_shards if adapters else params_bytes
    accumulating = microbatch < per_device_batch
    grads_bytes = trained_bytes * (2 if accumulating else 1)  # + the accumulator
    optimizer_bytes = trained_bytes * OPTIMIZER_STATE_COPIES[optimizer]
    ema_bytes = trained_bytes if ema else 0.0  # an fp32 average of what trains
    embed_params = model_cfg.vocab_size * model_cfg.d_model * (1 if model_cfg.tie_word_embeddings else 2)
    layer_params = (n_params - embed_params) / model_cfg.n_layers
    working = n_params * c / state_shards if c != 4 and not adapters else 0.0  # compute-dtype copy of the weights
    if fsdp > 1:
        working += 2 * layer_params * c / tensor  # gathered weights of the current and next block
    if quantized:  # a block's quantized weights read back in the compute dtype for its products
        working += quantized / model_cfg.n_layers * c / tensor

    if fused_attention is None:
        fused_attention = "" if hardware is None else fused_attention_kind(
            model_cfg, jnp.bfloat16 if c == 2 else jnp.float32, platform=hardware_platform(hardware))

    def acts(policy: str, mb: int) -> float:
        return activation_bytes(
            model_cfg, microbatch=mb, seq_len=seq_len, precision=precision, remat=policy, tensor=tensor,
            fused_attention=fused_attention,
        )

    batch_bytes = 2 * 4.0 * per_device_batch * seq_len  # int32 inputs and targets
    fixed = params_bytes + optimizer_bytes + ema_bytes + working + batch_bytes
    per_sequence = acts(remat, 1)
    hardware_bytes = float(hardware.memory_bytes) if hardware is not None else float("inf")
    usable = hardware_bytes * usable_fraction
    # Accumulation (one more gradient buffer) applies below the per-device batch.
    max_microbatch = per_device_batch if hardware is None else 0
    if hardware is not None and usable > fixed + 2 * trained_bytes + per_sequence:
        max_microbatch = int((usable - fixed - 2 * trained_bytes) // per_sequence)
    if usable >= fixed + trained_bytes + per_sequence * per_device_batch:
        max_microbatch = max(max_microbatch, per_device_batch)
    max_microbatch = min(max_microbatch, per_device_batch)

    return MemoryEstimate(
        params_bytes=params_bytes,
        grads_bytes=grads_bytes,
        optimizer_bytes=optimizer_bytes,
        working_weights_bytes=working,
        activations_bytes=acts(remat, microbatch),
        activations_no_remat_bytes=acts("none", microbatch),
        activations_full_remat_bytes=acts("full", microbatch),
        batch_bytes=batch_bytes,
        device_memory_bytes=hardware_bytes,
        usable_fraction=usable_fraction,
        microbatch=microbatch,
        per_device_batch=per_device_batch,
        max_microbatch=max_microbatch,
        remat=remat,
        ema_bytes=ema_bytes,
    )


def format_memory(estimate: MemoryEstimate) -> str:
    """A short per-device report of an estimate."""
    gib = 2.0**30
    accumulator = ", + accumulator" if estimate.microbatch < estimate.per_device_batch else ""
    rows = [
        ("parameters", estimate.params_bytes),
        (f"gradients (fp32{accumulator})", estimate.grads_bytes),
        ("optimizer state (fp32)", estimate.optimizer_bytes),
        *([("moving average of the weights (fp32)", estimate.ema_bytes)] if estimate.ema_bytes else []),
        ("working weights (compute dtype, gathered)", estimate.working_weights_bytes),
        (f"activations (microbatch {estimate.microbatch}, remat={estimate.remat})", estimate.activations_bytes),
        ("batch (token ids)", estimate.batch_bytes),
        ("total", estimate.total_bytes),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name.ljust(width)}  {value / gib:9.2f} GiB" for name, value in rows]
    lines.append(
        f"  activations without remat {estimate.activations_no_remat_bytes / gib:.2f} GiB, "
        f"with full remat {estimate.activations_full_remat_bytes / gib:.2f} GiB"
    )
    if estimate.device_memory_bytes != float("inf"):
        verdict = "fits" if estimate.fits else "does NOT fit"
        lines.append(
            f"  {verdict} in {estimate.usable_bytes / gib:.1f} GiB usable "
            f"({estimate.usable_fraction:.0%} of {estimate.device_memory_bytes / gib:.1f} GiB); "
            f"largest microbatch that fits: {estimate.max_microbatch} (per-device batch {estimate.per_device_batch})"
        )
    return "\n".join(lines)

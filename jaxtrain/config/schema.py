"""The typed configuration schema, in LLM Foundry's vocabulary.

Every field is a dataclass field with a default and a one-line doc (the ``doc`` metadata).
Time-valued fields (``max_duration``, ``eval_interval``, ``save_interval``, ``t_warmup``, ...)
hold Composer-style strings ("100ba", "2ep", "50000tok", "0.1dur"); they are parsed by
``jaxtrain.config.timestr``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A mistake in a config file or an override: one line saying where, what, and what to do."""


def error_line(error: BaseException, limit: int = 300) -> str:
    """The first line of ``error``'s message (at most ``limit`` characters), or its type's name:
    how a library's error is quoted inside a one-line message."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def field(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None) -> Any:
    """A dataclass field carrying a one-line doc string."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass
class AttnConfig:
    """MPT's ``attn_config``."""

    attn_type: str = field("multihead_attention", "multihead_attention | multiquery_attention | grouped_query_attention")
    attn_impl: str = field("xla", "attention kernel: xla (default), or Foundry's torch/flash/triton, mapped to xla")
    attn_pdrop: float = field(0.0, "dropout on attention probabilities")
    clip_qkv: float | None = field(None, "clamp the fused QKV projection output to [-c, c]")
    qk_ln: bool = field(False, "LayerNorm on Q (over n_heads*head_dim) and K (over kv_n_heads*head_dim)")
    softmax_scale: float | None = field(None, "attention scale; default 1/sqrt(d_model/n_heads)")
    alibi: bool = field(False, "ALiBi position bias (no positional embedding when on); MPT's released models use it")
    alibi_bias_max: int = field(8, "ALiBi slopes are 2^(-i*alibi_bias_max/N)")
    kv_n_heads: int | None = field(None, "key/value heads for grouped_query_attention (1 for multiquery)")
    prefix_lm: bool = field(False, "Foundry key; only False is supported")
    attn_uses_sequence_id: bool = field(False, "mask attention across packed documents")
    sliding_window_size: int = field(-1, "Foundry key; only -1 (off) is supported")
    rope: bool = field(False, "Foundry key; only False is supported (MPT uses ALiBi)")


@dataclasses.dataclass
class FFNConfig:
    """MPT's ``ffn_config``."""

    ffn_type: str = field("mptmlp", "mptmlp (up, GELU, down) or mptglu (gated)")
    ffn_act_fn: dict | None = field(None, "activation for mptglu, e.g. {name: silu}; default exact GELU")


@dataclasses.dataclass
class InitConfig:
    """MPT's ``init_config`` (kaiming-normal fan-in with relu gain by default)."""

    name: str = field("kaiming_normal_", "initializer name; kaiming_normal_ is MPT's")
    fan_mode: str = field("fan_in", "fan mode for kaiming init")
    init_nonlinearity: str = field("relu", "gain nonlinearity for kaiming init")
    init_div_is_residual: bool = field(True, "divide residual output projections by sqrt(2*n_layers)")
    emb_init_std: float | None = field(None, "if set, the embedding is N(0, emb_init_std)")
    init_std: float | None = field(None, "std for name: normal_")


@dataclasses.dataclass
class PeftConfig:
    """LoRA adapters (Hugging Face PEFT's ``LoraConfig``, as LLM Foundry's ``model.peft_config``):
    the model's weights stay frozen and each targeted linear layer learns ``B·A`` of rank ``r``."""

    peft_type: str = field("LORA", "only LORA")
    task_type: str = field("CAUSAL_LM", "only CAUSAL_LM")
    r: int = field(8, "rank of the adapters")
    lora_alpha: float = field(8, "scale: outputs of B·A are multiplied by lora_alpha / r")
    lora_dropout: float = field(0.0, "dropout on the adapters' input")
    target_modules: list | str = field(factory=lambda: ["Wqkv"], doc="layers given adapters: names among Wqkv, "
                                       "out_proj, up_proj, gate_proj, down_proj (or all-linear), or a regular "
                                       "expression matched against the full module name")
    use_rslora: bool = field(False, "rank-stabilised LoRA: scale lora_alpha / sqrt(r)")
    use_dora: bool = field(False, "DoRA: each adapted layer's output columns rescaled to a learned magnitude, "
                                  "as PEFT computes it (the column norms of W + scaling·A·B held constant)")
    rank_pattern: dict = field(factory=dict, doc="ranks other than r, by layer: {pattern: rank}, each pattern a "
                               "regular expression matched against the end of a module's name (PEFT's rule)")
    alpha_pattern: dict = field(factory=dict, doc="lora_alpha values other than lora_alpha, by layer, matched as "
                                "rank_pattern is")
    init_lora_weights: bool | str = field(True, "A's initialisation: true (Kaiming-uniform) or gaussian; B is zero")
    bias: str = field("none", "only none (no bias is trained)")
    fan_in_fan_out: bool = field(False, "only false")


@dataclasses.dataclass
class ModelConfig:
    """An MPT causal language model (LLM Foundry's ``model`` section). Defaults are LLM Foundry's
    MPTConfig defaults, so a Foundry YAML builds the same model here."""

    name: str = field("mpt_causal_lm", "model family in the registry")
    d_model: int = field(2048, "hidden width")
    n_heads: int = field(16, "attention heads")
    n_layers: int = field(24, "transformer blocks")
    expansion_ratio: float = field(4, "MLP hidden = d_model * expansion_ratio")
    max_seq_len: int = field(2048, "longest sequence the model accepts")
    vocab_size: int = field(50368, "embedding rows (pad to a multiple of 128 for speed)")
    no_bias: bool = field(False, "no biases in any Linear or LayerNorm (true in MPT's released models)")
    norm_type: str = field("low_precision_layernorm", "low_precision_layernorm or layernorm")
    norm_eps: float = field(1e-5, "LayerNorm epsilon")
    learned_pos_emb: bool = field(True, "learned positional embedding (only used when ALiBi is off)")
    emb_pdrop: float = field(0.0, "dropout after the embedding")
    resid_pdrop: float = field(0.0, "dropout on each residual branch")
    logit_scale: float | str | None = field(None, "multiply logits by a float or 'inv_sqrt_d_model'")
    tie_word_embeddings: bool = field(True, "output projection is the transposed input embedding")
    attn_config: AttnConfig = field(factory=AttnConfig, doc="attention options")
    ffn_config: FFNConfig = field(factory=FFNConfig, doc="feed-forward options")
    init_config: InitConfig = field(factory=InitConfig, doc="initialisation options")
    init_device: str = field("cpu", "Foundry key (cpu/meta/mixed); jaxtrain always initialises sharded")
    loss_fn: str = field("fused_crossentropy", "Foundry key; cross-entropy either way")
    use_cache: bool = field(False, "Foundry key; KV cache is used by generation only")
    scan_layers: bool = field(True, "stack blocks and run them with a scan (flat compile time)")
    scan_unroll: int | str = field("auto", "blocks per scan iteration when scan_layers (n_layers: straight-line "
                                           "code, same stacked parameters); auto: all of them on CPU up to "
                                           "12 layers and on GPU or TPU up to 48 unless remat is full, else 1")
    remat: str = field("none", "activation recompute per block: none | dots_saveable | full | auto (the least "
                               "recompute whose train step fits device memory)")
    fused_loss: bool = field(False, "output head + cross-entropy in sequence chunks, never holding the float32 "
                                    "logits (saves batch x seq x vocab x 4 bytes; recomputes the head once)")
    z_loss: float = field(0.0, "coefficient of the z-loss (log Z)^2 added to the loss")
    peft_config: PeftConfig | None = field(None, "LoRA fine-tuning: train low-rank adapters, keep the weights frozen")
    quantize_frozen: str | None = field(None, "LoRA runs: keep the blocks' frozen linear weights in int8 (a float32 "
                                              "scale per output column; half of bf16's memory) or nf4 (QLoRA's "
                                              "4-bit NormalFloat, blocks of 64; about 28 % of bf16's), or null")


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class TokenizerConfig:
    """Which tokenizer to use."""

    name: str = field("bpe:default", "bpe:default (trained on the train split), a tokenizer.json path, or a Hub name")
    kwargs: dict = field(factory=dict, doc="options, e.g. {model_max_length: 2048, vocab_size: 8192}; bpe:default "
                         "also takes train_max_chars (train-split characters it learns from, default 64M)")


@dataclasses.dataclass
class DatasetConfig:
    """A dataset inside a loader section."""

    source: str = field("python_stdlib", "python_stdlib (embedded default), text, jsonl, mds, tfds, "
                                          "finetune_jsonl (prompt/response or chat messages)")
    local: str | None = field(None, "local path (or cache folder for a remote)")
    remote: str | None = field(None, "remote URL (s3://, gs://, ...) to stream from")
    split: str = field("train", "train or eval (held-out) split")
    shuffle: bool = field(True, "shuffle samples each epoch (deterministic in seed; extra.shuffle_algo, default py1e)")
    shuffle_seed: int | None = field(None, "seed for the shuffle; default the run seed")
    max_seq_len: int | None = field(None, "sequence length; default the run's max_seq_len")
    eos_token_id: int | None = field(None, "EOS appended between documents; default the tokenizer's. With "
                                           "model.attn_config.attn_uses_sequence_id, each one ends a document")
    bos_token_id: int | None = field(None, "with model.attn_config.attn_uses_sequence_id: each one starts a "
                                           "document instead (documents that begin with BOS)")
    holdout_fraction: float = field(0.05, "python_stdlib: fraction of files held out, by path hash")
    max_files: int | None = field(None, "python_stdlib/text: cap on files read (quick runs)")
    text_field: str = field("text", "jsonl: the field holding the document")
    streams: dict | None = field(None, "Streaming's named streams: {name: {local, remote, split, proportion, repeat, choose}}")
    target_prompts: str = field("none", "finetune_jsonl: prompts that carry loss: none | all | length>=N")
    target_responses: str = field("last", "finetune_jsonl: responses that carry loss: last | all")
    packing_ratio: float | str | None = field(None, "finetune_jsonl: examples per row on average (>= 1) or auto; "
                                                    "needs model.attn_config.attn_uses_sequence_id; unset: one per row")
    decoder_only_format: bool = field(True, "finetune_jsonl: Foundry key; only true (decoder-only) is supported")
    allow_pad_trimming: bool = field(False, "finetune_jsonl: Foundry key; rows keep max_seq_len tokens (same loss)")
    extra: dict = field(factory=dict, doc="Streaming options: shuffle_algo, num_canonical_nodes, shuffle_block_size, epoch_size, sampling_method, ...")


@dataclasses.dataclass
class LoaderConfig:
    """LLM Foundry's ``train_loader`` / ``eval_loader``."""

    name: str = field("text", "loader kind; 'text' is Foundry's causal-LM loader")
    dataset: DatasetConfig = field(factory=DatasetConfig, doc="what to read")
    drop_last: bool | None = field(None, "drop the last incomplete batch: train_loader always does (false is "
                                         "refused); eval_loader by default scores every row, the last batch "
                                         "padded, and with true leaves the incomplete one out, as Composer does")
    num_workers: int | None = field(None, "threads gathering the next training batches ahead; 0: none; default 1 "
                                          "(0 for remote streams, which predownload shards on their own)")
    prefetch_factor: int | None = field(None, "training batches each worker keeps ready; default 2")
    pin_memory: bool = field(False, "Foundry key; no meaning in JAX")
    persistent_workers: bool = field(False, "Foundry key; no meaning in JAX")
    timeout: float = field(0, "Foundry key; no meaning in JAX")


# ----------------------------------------------------------------------------- optimisation


@dataclasses.dataclass
class OptimizerConfig:
    """LLM Foundry's ``optimizer`` section."""

    name: str = field("decoupled_adamw", "decoupled_adamw | decoupled_lionw | adamw")
    lr: float = field(6.0e-4, "peak learning rate")
    betas: list = field(factory=lambda: [0.9, 0.95], doc="(beta1, beta2)")
    eps: float = field(1.0e-8, "Adam epsilon")
    weight_decay: float = field(0.0, "decoupled: scaled by lr_t/lr_0, not multiplied by lr")


@dataclasses.dataclass
class SchedulerConfig:
    """LLM Foundry's ``scheduler`` section."""

    name: str = field("cosine_with_warmup", "cosine_with_warmup | linear_decay_with_warmup | constant_with_warmup")
    t_warmup: str = field("100ba", "warmup length (time string)")
    alpha_f: float = field(0.1, "final lr multiplier")
    alpha_i: float = field(1.0, "linear_decay_with_warmup: initial multiplier after warmup")
    alpha: float = field(1.0, "constant_with_warmup: the multiplier after warmup")
    t_max: str = field("1dur", "schedule length (time string); default the whole run")
    scale_warmup: bool = field(False, "Composer key; warmup is not stretched by scale_schedule_ratio")


@dataclasses.dataclass
class GradientClippingConfig:
    """Composer's ``algorithms.gradient_clipping``."""

    clipping_type: str = field("norm", "norm (global L2 norm); 'value' clips elementwise")
    clipping_threshold: float = field(1.0, "threshold")


@dataclasses.dataclass
class EMAConfig:
    """Composer's ``algorithms.ema``: an exponential moving average of the weights, which evaluation,
    generation and export use (training goes on with the trained weights)."""

    half_life: str | None = field(None, "half life of the average's terms (ba or ep); default 1000ba "
                                        "unless smoothing is given")
    smoothing: float | None = field(None, "weight the average keeps at each update, in (0, 1); instead of half_life")
    ema_start: str = field("0.0dur", "training done before the average starts (dur, ba or ep)")
    update_interval: str | None = field(None, "period of the updates; default 1 in half_life's unit (1ba with smoothing)")


@dataclasses.dataclass
class AlgorithmsConfig:
    """Composer's ``algorithms`` section."""

    gradient_clipping: GradientClippingConfig | None = field(None, "clip gradients")
    ema: EMAConfig | None = field(None, "keep a moving average of the weights for evaluation and export")


@dataclasses.dataclass
class ParallelismConfig:
    """The device mesh: sizes of the ``data``, ``fsdp`` and ``tensor`` axes (-1: the rest)."""

    data: int = field(-1, "data-parallel axis size (-1: all remaining devices)")
    fsdp: int = field(1, "fully-sharded data-parallel axis size")
    tensor: int = field(1, "tensor-parallel axis size")
    logical_axis_rules: list | None = field(None, "[[logical_name, mesh_axis or null], ...]; default table if null")


# ----------------------------------------------------------------------------- unattended runs


@dataclasses.dataclass
class HealthConfig:
    """What to do about non-finite losses, loss spikes and hangs, without a person watching."""

    nan_policy: str = field("skip", "non-finite loss or gradient norm: skip (no update) | rollback | stop")
    spike_policy: str = field("skip", "loss spike: none | skip (no update) | rollback | stop")
    spike_window: int = field(100, "moving window of recent losses the spike rule compares against")
    spike_ratio: float = field(2.0, "a loss >= spike_ratio x the window mean is a spike")
    spike_patience: int = field(3, "consecutive spikes that trigger rollback or stop")
    spike_min_steps: int = field(20, "no spike detection before the window holds this many losses")
    rollback_lr_scale: float = field(1.0, "multiply the learning rate by this after each rollback")
    max_rollbacks: int = field(5, "give up (exit 3) after this many rollbacks")
    watchdog_timeout: float | None = field(None, "seconds without progress before a hang exit; default auto")
    watchdog_factor: float = field(20.0, "auto timeout: this x the median step time, at least watchdog_min")
    watchdog_min: float = field(300.0, "auto timeout floor in seconds")
    skip_steps: list = field(factory=list, doc="steps whose update is not applied (to reproduce a run's skips)")


@dataclasses.dataclass
class FaultsConfig:
    """Deliberate failures, to rehearse recovery (all off by default)."""

    nan_at_steps: list = field(factory=list, doc="the loss becomes NaN at these steps")
    spike_at_steps: list = field(factory=list, doc="the loss is multiplied by spike_factor at these steps")
    spike_factor: float = field(10.0, "loss multiplier for injected spikes")
    crash_at_step: int | None = field(None, "the process dies abruptly after this step (once per run folder)")
    hang_at_step: int | None = field(None, "the loop stops making progress after this step (once per run folder)")
    sigterm_at_step: int | None = field(None, "the process sends itself SIGTERM after this step (once per run folder)")
    kill_during_step: int | None = field(None, "SIGKILL while this step computes (once per run folder)")
    kill_during_eval_step: int | None = field(None, "SIGKILL midway through the held-out eval at this step (once per run folder)")
    kill_during_save_step: int | None = field(
        None, "SIGKILL after this step's checkpoint files are written, before it commits (once per run folder)")
    kill_during_upload_step: int | None = field(
        None, "remote save_folder: SIGKILL midway through uploading this step's checkpoint (once per run folder)")
    disk_full_at_save_step: int | None = field(
        None, "this step's checkpoint write fails with ENOSPC (no space left on device; once per run folder)")


# ----------------------------------------------------------------------------- run


@dataclasses.dataclass
class Config:
    """A whole training run."""

    run_name: str | None = field(None, "run name; default derived from the config file name")
    seed: int = field(17, "global seed (init, dropout, data order)")
    max_seq_len: int = field(2048, "training sequence length")
    global_train_batch_size: int = field(256, "sequences per optimizer step across all devices")
    device_train_microbatch_size: int | str | None = field(None, "per-device microbatch; default the whole per-device batch")
    device_eval_batch_size: int = field(8, "per-device eval batch")
    max_duration: str = field("100ba", "run length (time string: ba, ep, tok, sp)")
    eval_interval: str = field("500ba", "held-out eval period (time string); 0 disables")
    eval_first: bool = field(False, "evaluate before the first step")
    eval_subset_num_batches: int = field(-1, "eval batches per evaluation (-1: the whole held-out split)")
    precision: str = field(
        "amp_bf16",
        "amp_bf16 (bf16 compute, fp32 params), amp_fp8 (amp_bf16 with the blocks' linear-layer products in "
        "fp8; GPUs with compute capability >= 8.9) or fp32")
    save_folder: str | None = field(None, "checkpoint folder; {run_name} is substituted")
    save_interval: str = field("1000ba", "checkpoint period (time string)")
    save_num_checkpoints_to_keep: int = field(-1, "keep the newest N checkpoints (-1: all)")
    save_overwrite: bool = field(False, "allow a fresh run to replace checkpoints in save_folder")
    autoresume: bool = field(False, "continue from the newest checkpoint in save_folder")
    load_path: str | None = field(None, "start from these weights (fresh optimizer)")
    save_frozen_weights: bool | None = field(
        None, "LoRA runs (model.peft_config): also save the frozen weights in every checkpoint. Default: only "
              "without load_path; with it, checkpoints hold the adapters and a fingerprinted record of load_path "
              "(a local folder or one in a bucket), from which the frozen weights are read back")
    download_cache: str | None = field(
        None, "local folder keeping Hugging Face weights downloaded from a bucket (load_path, and a LoRA run's "
              "frozen weights read back on resume) under the versions of their files, for later runs and "
              "restarts (a newer version's download removes older ones idle for an hour); default none: each "
              "download is removed when the run ends")
    run_folder: str = field("runs/{run_name}", "folder for logs, the resolved config and the data cache")
    console_log_interval: str = field("1ba", "console/metrics logging period")
    progress_bar: bool = field(True, "live progress bar on the console")
    log_to_console: bool = field(True, "print a line of metrics every console_log_interval (a live progress bar "
                                       "on a terminal is progress_bar's); eval results and the summary always print")
    python_log_level: str = field("info", "Foundry key for its Python loggers; accepted, jaxtrain prints its own "
                                          "progress")
    peak_flops_per_device: float | None = field(None, "peak FLOP/s for MFU; default from the device table")
    log_shardings: bool = field(False, "print each parameter's shape, mesh spec and bytes per device at start")
    model: ModelConfig = field(factory=ModelConfig, doc="the model")
    tokenizer: TokenizerConfig = field(factory=TokenizerConfig, doc="the tokenizer")
    train_loader: LoaderConfig = field(factory=LoaderConfig, doc="training data")
    eval_loader: LoaderConfig | None = field(None, "held-out data; none disables eval")
    optimizer: OptimizerConfig = field(factory=OptimizerConfig, doc="the optimizer")
    scheduler: SchedulerConfig = field(factory=SchedulerConfig, doc="the learning-rate schedule")
    algorithms: AlgorithmsConfig = field(factory=AlgorithmsConfig, doc="training algorithms")
    parallelism: ParallelismConfig = field(factory=ParallelismConfig, doc="the device mesh")
    health: HealthConfig = field(factory=HealthConfig, doc="NaN, spike and hang handling")
    faults: FaultsConfig = field(factory=FaultsConfig, doc="deliberate failures for rehearsing recovery")
    loggers: dict = field(factory=dict, doc="{tensorboard: {}, jsonl: {}} (console is always on)")
    callbacks: dict = field(factory=dict, doc="{speed_monitor: {window_size: N}, lr_monitor: {}, ...}")
    icl_tasks: list | str | None = field(None, "in-context-learning tasks: a list of task dicts or a YAML path")
    icl_subset_num_batches: int | None = field(None, "ICL batches per task per evaluation (null: all)")
    icl_seq_len: int | None = field(None, "ICL sequence length; default max_seq_len")
    eval_gauntlet: dict | str | None = field(None, "Foundry eval gauntlet: categories of ICL tasks, or a YAML path")
    metadata: dict = field(factory=dict, doc="free-form run metadata, stored with the resolved config")
    variables: dict = field(factory=dict, doc="Foundry variables for ${variables.name} interpolation")


# Fields holding Composer-style time strings (see ``jaxtrain.config.timestr``), as dotted keys.
TIME_FIELDS = (
    "max_duration",
    "eval_interval",
    "save_interval",
    "console_log_interval",
    "scheduler.t_warmup",
    "scheduler.t_max",
)


# ----------------------------------------------------------------------------- help text


def type_name(tp: Any) -> str:
    """A short human name for a field type: ``int``, ``int | str | None``, ``ModelConfig``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " | ".join(type_name(arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def describe(cls: type | None = None, prefix: str = "") -> str:
    """Help text: every field of ``cls`` (default ``Config``), nested sections expanded, with
    its dotted key, type, default and one-line doc."""
    cls = Config if cls is None else cls
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        doc = f.metadata.get("doc", "")
        section = _section_class(tp)
        if section is not None:
            lines.append(f"{key}: {type_name(tp)}  -- {doc}")
            lines.append(describe(section, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()
        lines.append(f"{key}: {type_name(tp)} = {default!r}  -- {doc}")
    return "\n".join(lines)


def _section_class(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X`` or ``X | None``), or None."""
    candidates = typing.get_args(tp) or (tp,)
    for arg in candidates:
        if dataclasses.is_dataclass(arg):
            return arg
    return None

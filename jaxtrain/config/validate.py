"""Checks on a built Config that need no devices, and the batch-size check that does."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from jaxtrain.config import schema
from jaxtrain.parallel.shape import MeshError, mesh_shape
from jaxtrain.config.schema import Config, ConfigError
from jaxtrain.config.timestr import parse_time
from jaxtrain.config.peft import check_peft_config

Where = Callable[[str], str]

MODEL_NAMES = ("mpt_causal_lm",)  # the model registry's names (jaxtrain.models.MODEL_REGISTRY)
OPTIMIZERS = ("decoupled_adamw", "decoupled_lionw", "adamw")
LOADER_NAMES = ("text", "finetuning")  # Foundry's loaders: causal-LM text and instruction fine-tuning
# Foundry's finetuning dataset options and their defaults (any other value needs source finetune_jsonl)
FINETUNE_OPTIONS = {"target_prompts": "none", "target_responses": "last", "packing_ratio": None,
                    "decoder_only_format": True, "allow_pad_trimming": False}
SCHEDULERS = ("cosine_with_warmup", "linear_decay_with_warmup", "constant_with_warmup")
PRECISIONS = ("amp_bf16", "amp_fp8", "fp32")
ATTN_TYPES = ("multihead_attention", "multiquery_attention", "grouped_query_attention")
ATTN_IMPLS = ("xla",)
FFN_TYPES = ("mptmlp", "mptglu")
NORM_TYPES = ("low_precision_layernorm", "layernorm")
REMAT_CHOICES = ("none", "full", "dots_saveable", "auto")
CLIPPING_TYPES = ("norm", "value")


def validate(cfg: Config, where: Where) -> None:
    """Raise ConfigError for the first value that cannot be right on any machine."""
    def fail(key: str, problem: str) -> None:
        raise ConfigError(f"{where(key)}: {key}: {problem}")

    def one_of(key: str, value: str, valid: tuple[str, ...]) -> None:
        if value not in valid:
            close = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(valid)}"
            fail(key, f"unknown name {value!r}; {hint}")

    def positive(key: str, value: float) -> None:
        if value <= 0:
            fail(key, f"must be positive, got {value}")

    def probability(key: str, value: float) -> None:
        if not 0 <= value < 1:
            fail(key, f"must be in [0, 1), got {value}")

    for key in schema.TIME_FIELDS:
        value = _get(cfg, key)
        try:
            time = parse_time(value, key=key)
        except ConfigError as e:
            raise ConfigError(f"{where(key)}: {e}") from None
        if key == "max_duration" and time.unit == "dur":
            fail(key, f"{value!r} is a fraction of the run itself; give it in ba, ep, tok or sp")
        if time.unit == "tok" and cfg.train_loader.dataset.source == "finetune_jsonl":
            fail(key, f"{value!r} counts tokens, but fine-tuning batches (train_loader.dataset.source finetune_jsonl) "
                 "hold a varying number of them once padding is left out: give it in ba or ep")

    model, attn = cfg.model, cfg.model.attn_config
    one_of("model.name", model.name, MODEL_NAMES)
    for key in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size", "expansion_ratio"):
        positive(f"model.{key}", getattr(model, key))
    if model.d_model % model.n_heads:
        fail("model.d_model", f"{model.d_model} is not divisible by model.n_heads {model.n_heads}; "
             "change one so that d_model / n_heads is a whole head size")
    one_of("model.attn_config.attn_type", attn.attn_type, ATTN_TYPES)
    one_of("model.attn_config.attn_impl", attn.attn_impl, ATTN_IMPLS)
    if attn.kv_n_heads is not None:
        positive("model.attn_config.kv_n_heads", attn.kv_n_heads)
        if model.n_heads % attn.kv_n_heads:
            fail("model.attn_config.kv_n_heads", f"{attn.kv_n_heads} does not divide model.n_heads "
                 f"{model.n_heads}; use a divisor of n_heads")
        if attn.attn_type == "multiquery_attention" and attn.kv_n_heads != 1:
            fail("model.attn_config.kv_n_heads", f"multiquery_attention has 1 key/value head, got "
                 f"{attn.kv_n_heads}; remove kv_n_heads or use grouped_query_attention")
        if attn.attn_type == "multihead_attention" and attn.kv_n_heads != model.n_heads:
            fail("model.attn_config.kv_n_heads", f"multihead_attention has n_heads ({model.n_heads}) "
                 f"key/value heads, got {attn.kv_n_heads}; use grouped_query_attention")
    elif attn.attn_type == "grouped_query_attention":
        fail("model.attn_config.kv_n_heads", "grouped_query_attention needs kv_n_heads; set it to a divisor of n_heads")
    for key in ("prefix_lm", "rope"):
        if getattr(attn, key):
            fail(f"model.attn_config.{key}", "only false is supported by jaxtrain; remove the key")
    if attn.sliding_window_size != -1:
        fail("model.attn_config.sliding_window_size", "only -1 (off) is supported by jaxtrain; remove the key")
    if attn.clip_qkv is not None:
        positive("model.attn_config.clip_qkv", attn.clip_qkv)
    probability("model.attn_config.attn_pdrop", attn.attn_pdrop)
    probability("model.emb_pdrop", model.emb_pdrop)
    probability("model.resid_pdrop", model.resid_pdrop)
    one_of("model.ffn_config.ffn_type", model.ffn_config.ffn_type, FFN_TYPES)
    check_peft_config(model, fail)
    if model.quantize_frozen is not None:
        if model.quantize_frozen not in ("int8", "nf4"):
            fail("model.quantize_frozen", f"{model.quantize_frozen!r} is not supported; use int8, nf4 or null")
        widths = {model.d_model, model.d_model * model.expansion_ratio}
        if model.quantize_frozen == "nf4" and any(width % 2 for width in widths):
            fail("model.quantize_frozen", f"nf4 packs two input rows to a byte: d_model {model.d_model} and the "
                                          f"MLP width must be even; use int8")
        if model.peft_config is None:
            fail("model.quantize_frozen", "only a LoRA run (model.peft_config) has frozen weights to quantize; "
                                          "remove the key or add a peft_config")
    if cfg.save_frozen_weights is False:
        if model.peft_config is None:
            fail("save_frozen_weights", "only a LoRA run (model.peft_config) has frozen weights to leave out; "
                                        "remove the key")
        if not cfg.load_path:
            fail("save_frozen_weights", "false needs load_path (a Hugging Face folder or a jaxtrain checkpoint) to "
                                        "read the frozen weights back from; without it they are random and saved")
    one_of("model.norm_type", model.norm_type, NORM_TYPES)
    one_of("model.remat", model.remat, REMAT_CHOICES)
    if model.scan_unroll != "auto" and not (isinstance(model.scan_unroll, int) and not isinstance(model.scan_unroll, bool)
                                            and model.scan_unroll >= 1):
        fail("model.scan_unroll", f"expected 'auto' or a whole number of blocks >= 1, got {model.scan_unroll!r}")
    if isinstance(model.logit_scale, str) and model.logit_scale != "inv_sqrt_d_model":
        fail("model.logit_scale", f"expected a number or 'inv_sqrt_d_model', got {model.logit_scale!r}")

    positive("max_seq_len", cfg.max_seq_len)
    if cfg.run_name is not None and (not cfg.run_name.strip() or "/" in cfg.run_name or "\\" in cfg.run_name
                                     or cfg.run_name in (".", "..")):
        fail("run_name", f"{cfg.run_name!r} is not a name (it is put into run_folder and save_folder as "
                         f"{{run_name}}); give a name without slashes, or set run_folder to the folder wanted")
    for key, url in (("save_folder", cfg.save_folder), ("load_path", cfg.load_path)):
        if url and "://" in url:  # found before any compile, with the key to change
            from jaxtrain.data.object_store import store_url_problem  # jaxtrain.data imports this module

            problem = store_url_problem(url)
            if problem:
                fail(key, f"{url}: {problem}")
    for key, seed in (("seed", cfg.seed), ("train_loader.dataset.shuffle_seed", cfg.train_loader.dataset.shuffle_seed)):
        if seed is not None and not 0 <= seed < 2**32:  # as Composer's and Streaming's seeds
            fail(key, f"{seed} must be in [0, 2**32)")
    if cfg.max_seq_len > model.max_seq_len:
        fail("max_seq_len", f"{cfg.max_seq_len} is longer than model.max_seq_len {model.max_seq_len}; "
             "lower max_seq_len or raise model.max_seq_len")
    for name in ("train_loader", "eval_loader"):
        loader = getattr(cfg, name)
        if loader is not None and loader.dataset.max_seq_len is not None:
            if loader.dataset.max_seq_len > model.max_seq_len:
                fail(f"{name}.dataset.max_seq_len", f"{loader.dataset.max_seq_len} is longer than "
                     f"model.max_seq_len {model.max_seq_len}; lower it or raise model.max_seq_len")
        if loader is not None:
            one_of(f"{name}.name", loader.name, LOADER_NAMES)
            if loader.name == "finetuning" and loader.dataset.source != "finetune_jsonl":
                fail(f"{name}.dataset.source", f"{loader.dataset.source!r} under the finetuning loader: set it to "
                     "finetune_jsonl (or the loader's name to text)")
            probability(f"{name}.dataset.holdout_fraction", loader.dataset.holdout_fraction)
            _check_document_tokens(name, loader.dataset, model, fail)
            if loader.dataset.source != "finetune_jsonl":
                for option, default in FINETUNE_OPTIONS.items():
                    if getattr(loader.dataset, option) != default:
                        fail(f"{name}.dataset.{option}", f"applies to source finetune_jsonl only, not "
                             f"{loader.dataset.source!r}: remove it")
    train, held = cfg.train_loader, cfg.eval_loader
    if (train is not None and held is not None and train.dataset.source == held.dataset.source == "python_stdlib"
            and train.dataset.holdout_fraction != held.dataset.holdout_fraction):
        fail("eval_loader.dataset.holdout_fraction", f"{held.dataset.holdout_fraction} differs from "
             f"train_loader.dataset.holdout_fraction {train.dataset.holdout_fraction}: files between the two "
             "would be trained on and evaluated on (or neither); set both to the same value")

    positive("global_train_batch_size", cfg.global_train_batch_size)
    positive("device_eval_batch_size", cfg.device_eval_batch_size)
    micro = cfg.device_train_microbatch_size
    if not (micro is None or micro == "auto" or (isinstance(micro, int) and micro > 0)):
        fail("device_train_microbatch_size", f"expected a positive integer, 'auto' or null, got {micro!r}")
    one_of("precision", cfg.precision, PRECISIONS)

    opt = cfg.optimizer
    one_of("optimizer.name", opt.name, OPTIMIZERS)
    positive("optimizer.lr", opt.lr)
    if opt.weight_decay < 0:
        fail("optimizer.weight_decay", f"must be >= 0, got {opt.weight_decay}")
    if opt.eps < 0:
        fail("optimizer.eps", f"must be >= 0, got {opt.eps}")
    if len(opt.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in opt.betas):
        fail("optimizer.betas", f"expected two numbers [beta1, beta2], got {opt.betas!r}")
    for i, beta in enumerate(opt.betas):
        if not 0 <= beta < 1:
            fail("optimizer.betas", f"beta{i + 1} must be in [0, 1), got {beta}")
    one_of("scheduler.name", cfg.scheduler.name, SCHEDULERS)
    health = cfg.health
    one_of("health.nan_policy", health.nan_policy, ("skip", "rollback", "stop"))
    one_of("health.spike_policy", health.spike_policy, ("none", "skip", "rollback", "stop"))
    positive("health.spike_window", health.spike_window)
    positive("health.spike_patience", health.spike_patience)
    if health.spike_ratio <= 1:
        fail("health.spike_ratio", f"must be > 1, got {health.spike_ratio}")
    if not 0 < health.rollback_lr_scale <= 1:
        fail("health.rollback_lr_scale", f"must be in (0, 1], got {health.rollback_lr_scale}")
    if cfg.scheduler.alpha_f < 0:
        fail("scheduler.alpha_f", f"must be >= 0, got {cfg.scheduler.alpha_f}")
    clip = cfg.algorithms.gradient_clipping
    if clip is not None:
        one_of("algorithms.gradient_clipping.clipping_type", clip.clipping_type, CLIPPING_TYPES)
        positive("algorithms.gradient_clipping.clipping_threshold", clip.clipping_threshold)
    from jaxtrain.algorithms.ema import check_ema  # here: it reads the schema this package defines

    try:
        check_ema(cfg.algorithms.ema)
    except ConfigError as e:
        raise ConfigError(f"{where('algorithms.ema')}: {e}") from None

    par = cfg.parallelism
    for axis in ("data", "fsdp", "tensor"):
        if getattr(par, axis) != -1:
            positive(f"parallelism.{axis}", getattr(par, axis))
    if [par.data, par.fsdp, par.tensor].count(-1) > 1:
        fail("parallelism", "at most one of data/fsdp/tensor may be -1 (\"the rest of the devices\")")


def data_parallel_size(cfg: Config, num_devices: int) -> int:
    """How many ways the global batch is split: the ``data`` axis times the ``fsdp`` axis."""
    try:
        data, fsdp, _ = mesh_shape(cfg.parallelism, num_devices)
    except MeshError as err:
        raise ConfigError(str(err)) from None
    return data * fsdp


def validate_for_devices(cfg: Config, num_devices: int) -> None:
    """Raise ConfigError when the global batch cannot be split evenly over ``num_devices``."""
    if num_devices <= 0:
        raise ConfigError(f"num_devices must be positive, got {num_devices}")
    dp = data_parallel_size(cfg, num_devices)
    batch = cfg.global_train_batch_size
    micro = cfg.device_train_microbatch_size
    step = dp * micro if isinstance(micro, int) else dp
    if batch % step == 0:
        return
    lower, upper = batch // step * step, (batch // step + 1) * step
    suggestion = f"use {lower} or {upper}" if lower else f"use {upper}"
    if cfg.parallelism.tensor > 1:
        ways = f"{dp} data-parallel replicas ({num_devices} devices / tensor {cfg.parallelism.tensor})"
    else:
        ways = f"{num_devices} devices"
    if isinstance(micro, int):
        raise ConfigError(f"global_train_batch_size {batch} is not divisible by {ways} x "
                          f"device_train_microbatch_size {micro} = {step}; {suggestion}")
    raise ConfigError(f"global_train_batch_size {batch} is not divisible by {ways}; {suggestion}")


def _get(cfg: Config, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _check_document_tokens(name: str, dataset, model, fail) -> None:
    """The token ids that mark documents: valid ids, and one boundary token, as LLM Foundry's text loader asks."""
    for option in ("eos_token_id", "bos_token_id"):
        value = getattr(dataset, option)
        if value is not None and not 0 <= value < model.vocab_size:
            fail(f"{name}.dataset.{option}", f"{value} is not a token id of a vocabulary of {model.vocab_size}")
    if dataset.bos_token_id is None or not model.attn_config.attn_uses_sequence_id:
        return
    if dataset.source == "finetune_jsonl":
        fail(f"{name}.dataset.bos_token_id", "fine-tuning rows carry their examples' ids already: remove it")
    if dataset.eos_token_id is not None:
        fail(f"{name}.dataset.bos_token_id", f"and eos_token_id ({dataset.eos_token_id}) both mark document "
             "boundaries: keep eos_token_id if documents end with EOS, bos_token_id if they begin with BOS")

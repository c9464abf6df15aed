"""MosaicML MPT ``config.json`` <-> jaxtrain's ``ModelConfig``: read, typed and checked as a YAML
``model`` section is (errors name the ``config.json`` key), and written back for transformers.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from typing import Any

from jaxtrain.config import ConfigError, load_config_dict
from jaxtrain.config.schema import InitConfig, ModelConfig
from jaxtrain.convert.folders import CONFIG_FILE

_ATTN_KEYS = ("attn_type", "attn_pdrop", "clip_qkv", "qk_ln", "softmax_scale", "alibi", "alibi_bias_max",
              "prefix_lm", "attn_uses_sequence_id", "sliding_window_size", "rope")
_MODEL_KEYS = ("d_model", "n_heads", "n_layers", "expansion_ratio", "max_seq_len", "vocab_size", "no_bias",
               "norm_type", "learned_pos_emb", "emb_pdrop", "resid_pdrop", "logit_scale")
_REQUIRED = ("d_model", "n_heads", "n_layers", "vocab_size")
_JSON_WORDS = {"None": "null", "True": "true", "False": "false"}
# Foundry options that change the math and have no jaxtrain equivalent: key -> value meaning "off".
_UNSUPPORTED_OFF = {"block_overrides": (None, {}), "final_logit_softcapping": (None,)}
_UNSUPPORTED_ATTN_OFF = {"qk_gn": (False,), "attn_logit_softcapping": (None,)}


# ----------------------------------------------------------------------------- configs


def model_config_from_hf(hf: dict, *, source: str, scan_layers: bool = True, validate: bool = True) -> ModelConfig:
    """A ``ModelConfig`` from a MosaicML-format ``config.json`` (``source`` names the file in errors),
    typed and checked as a YAML ``model`` section is, its errors naming the ``config.json`` key;
    ``validate``: also check it as the model would (imports JAX; a config being read leaves that to later)."""

    model_type = hf.get("model_type")
    if model_type != "mpt":
        raise ConfigError(f"{source}: model_type is {model_type!r}, not 'mpt'; only MPT checkpoints convert")
    for key in _REQUIRED:
        if key not in hf:
            raise ConfigError(f"{source}: missing key {key!r} (not a MosaicML MPT config)")
    attn_hf, ffn_hf, init_hf = (_section(hf, key, source) for key in ("attn_config", "ffn_config", "init_config"))
    for key, off in _UNSUPPORTED_OFF.items():
        if hf.get(key, off[0]) not in off:
            raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported by jaxtrain")
    for key, off in _UNSUPPORTED_ATTN_OFF.items():
        if attn_hf.get(key, off[0]) not in off:
            raise ConfigError(f"{source}: attn_config.{key}={attn_hf[key]!r} is not supported by jaxtrain")
    if hf.get("quantization_config"):  # stored quantized (bitsandbytes, GPTQ, ...): not float weights
        method = hf["quantization_config"].get("quant_method", "?") if isinstance(hf["quantization_config"], dict) else "?"
        raise ConfigError(f"{source}: quantization_config ({method}): its weights are stored quantized and jaxtrain "
                          f"reads float ones; use the unquantized model, and model.quantize_frozen (int8 or nf4) "
                          f"to keep a LoRA run's frozen weights quantized")
    fc_type = hf.get("fc_type", "torch")
    if (fc_type.get("name") if isinstance(fc_type, dict) else fc_type) != "torch":
        raise ConfigError(f"{source}: fc_type={fc_type!r} is not supported; only torch Linear layers convert")

    # The model section as plain values, with the config.json key each value came from.
    names = {f"model.{key}": key for key in _MODEL_KEYS}
    model: dict[str, Any] = {k: hf[k] for k in _MODEL_KEYS if k in hf}
    attn = {k: attn_hf[k] for k in _ATTN_KEYS if k in attn_hf}
    if attn.get("attn_type") == "grouped_query_attention":  # Foundry ignores kv_n_heads for the other types
        attn["kv_n_heads"] = attn_hf.get("kv_n_heads")
    names.update({f"model.attn_config.{key}": f"attn_config.{key}" for key in attn})
    if "norm_eps" in hf and "layer_norm_epsilon" in hf and hf["norm_eps"] != hf["layer_norm_epsilon"]:
        raise ConfigError(f"{source}: norm_eps={hf['norm_eps']} and layer_norm_epsilon={hf['layer_norm_epsilon']} "
                          "disagree; keep the one the model was trained with")
    for key in ("norm_eps", "layer_norm_epsilon"):
        if key in hf:
            model["norm_eps"], names["model.norm_eps"] = hf[key], key
            break
    hidden = ffn_hf.get("ffn_hidden_size")
    if hidden is not None:
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise ConfigError(f"{source}: ffn_config.ffn_hidden_size must be a positive integer, got {hidden!r}; "
                              "set it to the MLP width of the model, or remove it to use expansion_ratio")
        d_model = hf["d_model"]
        if isinstance(d_model, int) and not isinstance(d_model, bool) and d_model > 0:  # else d_model is refused below
            model["expansion_ratio"], names["model.expansion_ratio"] = hidden / d_model, "ffn_config.ffn_hidden_size"
    ffn = {"ffn_type": ffn_hf.get("ffn_type", "mptmlp"), "ffn_act_fn": ffn_hf.get("ffn_act_fn")}
    names.update({f"model.ffn_config.{key}": f"ffn_config.{key}" for key in ffn})
    doc = {**model, "tie_word_embeddings": hf.get("tie_word_embeddings", True), "attn_config": attn,
           "ffn_config": ffn, "init_config": _init_config(init_hf)}
    names["model.tie_word_embeddings"] = "tie_word_embeddings"
    _check_json_values(doc, ModelConfig, "model.", names, source)
    try:  # typed and validated as the model section of a run's config, which every reader of a checkpoint does
        cfg = load_config_dict({"model": doc, "max_seq_len": doc.get("max_seq_len", ModelConfig().max_seq_len)},
                               source=source).model
    except ConfigError as error:
        raise ConfigError(_hf_message(str(error), names, source)) from None
    cfg.scan_layers = scan_layers
    if float(cfg.expansion_ratio).is_integer():
        cfg.expansion_ratio = int(cfg.expansion_ratio)
    if not validate:
        return cfg
    from jaxtrain.models.mpt_config import validate_mpt_config

    try:
        validate_mpt_config(cfg)
    except ValueError as error:
        raise ConfigError(_hf_message(f"{source}: {error}", names, source)) from None
    return cfg


def _section(hf: dict, key: str, source: str) -> dict:
    """The nested settings ``hf[key]`` (``attn_config``, ...): a JSON object, or empty when absent or null."""
    value = hf.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key} must be a JSON object of settings, got {value!r}; "
                          f"write it as {{\"key\": value, ...}} or remove it for the defaults")
    return value


def _init_config(init_hf: dict) -> dict:
    """The ``init_config`` to record: MosaicML's when jaxtrain implements it, else jaxtrain's default
    (initialisation does not matter for converted weights)."""
    init = {f: init_hf[f] for f in InitConfig.__dataclass_fields__ if f in init_hf}
    number = lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))  # noqa: E731
    typed = (all(isinstance(init.get(f, ""), str) for f in ("name", "fan_mode", "init_nonlinearity"))
             and isinstance(init.get("init_div_is_residual", True), bool)
             and number(init.get("emb_init_std")) and number(init.get("init_std")))
    if not typed or init.get("name", "kaiming_normal_") not in ("kaiming_normal_", "normal_") or (
            init.get("name") == "normal_" and init.get("init_std") is None):
        return dataclasses.asdict(InitConfig())
    return {**dataclasses.asdict(InitConfig()), **init}


def _check_json_values(doc: dict, cls: type, prefix: str, names: dict, source: str) -> None:
    """Refuse what a YAML section may hold but a JSON value does not mean: null for a key that
    needs a value, and a number written as text."""
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, value in doc.items():
        key, kinds = f"{prefix}{name}", typing.get_args(hints[name]) or (hints[name],)
        hf_key = names.get(key, key.removeprefix("model."))
        if dataclasses.is_dataclass(hints[name]):
            _check_json_values(value, hints[name], key + ".", names, source)
        elif value is None and type(None) not in kinds:
            fix = ("set it to the model's value" if hf_key in _REQUIRED
                   else f"remove the key to use the default ({json.dumps(defaults[name])})")
            raise ConfigError(f"{source}: {hf_key} is null; {fix}")
        elif isinstance(value, str) and str not in kinds and float in kinds:
            raise ConfigError(f"{source}: {hf_key} must be a number, got {value!r}; write it without quotes")


def _hf_message(message: str, names: dict, source: str) -> str:
    """An error about the model section built from the ``config.json`` ``source`` (``source: ...``)
    reworded with that file's keys (``names``: model-section key -> ``config.json`` key) and JSON's
    spelling of values."""
    head, message = (f"{source}: ", message[len(source) + 2:]) if message.startswith(f"{source}: ") else ("", message)
    message = re.sub(r"\bmodel\.[\w.]*\w", lambda m: names.get(m.group(), m.group().removeprefix("model.")), message)
    message = re.sub(r"\b(got|is) (None|True|False)\b",
                     lambda m: f"{m.group(1)} {_JSON_WORDS[m.group(2)]}", message)
    return head + (message if ";" in message else f"{message}; correct that key of {CONFIG_FILE}")


def hf_config_from_model(cfg: ModelConfig, *, torch_dtype: str = "float32") -> dict:
    """MosaicML's ``config.json`` for ``cfg`` (loadable by ``transformers`` within its MPT subset)."""
    from jaxtrain.models.mpt_config import kv_heads

    attn = cfg.attn_config
    return {
        "architectures": ["MptForCausalLM"],
        "model_type": "mpt",
        **{key: getattr(cfg, key) for key in _MODEL_KEYS},
        "layer_norm_epsilon": cfg.norm_eps,
        "norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attn_config": {
            **{key: getattr(attn, key) for key in _ATTN_KEYS},
            "attn_impl": "torch",
            "kv_n_heads": kv_heads(cfg),
        },
        "ffn_config": {"ffn_type": cfg.ffn_config.ffn_type,
                       **({"ffn_act_fn": cfg.ffn_config.ffn_act_fn} if cfg.ffn_config.ffn_act_fn else {})},
        "init_config": dict(vars(cfg.init_config)),
        "embedding_fraction": 1.0,
        "init_device": "cpu",
        "use_cache": False,
        "torch_dtype": torch_dtype,
    }


def transformers_mpt_gaps(cfg: ModelConfig) -> list[str]:
    """The options of ``cfg`` that transformers' built-in ``MptForCausalLM`` does not implement (it
    hard-codes multi-head attention, no biases, a 4x GELU MLP, no logit scale and ALiBi with
    bias max 8): it loads such a folder with a generic warning and computes other logits.
    MosaicML's own MPT code (``trust_remote_code``, LLM Foundry) implements them all."""
    attn, gaps = cfg.attn_config, []
    if attn.attn_type != "multihead_attention":
        gaps.append(f"attn_config.attn_type={attn.attn_type}")
    if attn.qk_ln:
        gaps.append("attn_config.qk_ln=true")
    if not attn.alibi:
        gaps.append("attn_config.alibi=false (learned positions)")
    elif attn.alibi_bias_max != 8:
        gaps.append(f"attn_config.alibi_bias_max={attn.alibi_bias_max}")
    if not cfg.no_bias:
        gaps.append("no_bias=false")
    if cfg.expansion_ratio != 4:
        gaps.append(f"expansion_ratio={cfg.expansion_ratio}")
    act = dict(cfg.ffn_config.ffn_act_fn or {"name": "gelu"})
    if cfg.ffn_config.ffn_type != "mptmlp" or act.get("name") != "gelu" or act.get("approximate", "none") != "none":
        gaps.append(f"ffn_config={{ffn_type: {cfg.ffn_config.ffn_type}, ffn_act_fn: {act}}}")
    if cfg.logit_scale is not None:
        gaps.append(f"logit_scale={cfg.logit_scale}")
    return gaps

"""Load a Config: YAML file -> ``--set`` overrides -> ``${...}`` interpolation -> Foundry
mapping -> typed dataclasses -> validation.

Overrides are merged into the document before interpolation, as LLM Foundry does (OmegaConf
merge, then resolve): ``--set variables.max_seq_len=512`` reaches every ``${variables.max_seq_len}``,
and an override value may itself be a reference (``--set optimizer.lr=${variables.peak_lr}``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml
from absl import logging

from jaxtrain.config import foundry, interpolate, validate
from jaxtrain.config.schema import TIME_FIELDS, Config, ConfigError, type_name

# Names from other stacks that mean one of ours (checked before the fuzzy match).
_ALIASES = {
    "learning_rate": "lr", "lr_scheduler": "scheduler", "hidden_size": "d_model", "n_embd": "d_model",
    "num_heads": "n_heads", "num_attention_heads": "n_heads", "n_head": "n_heads",
    "num_layers": "n_layers", "num_hidden_layers": "n_layers", "n_layer": "n_layers",
    "seq_len": "max_seq_len", "max_length": "max_seq_len", "batch_size": "global_train_batch_size",
    "microbatch_size": "device_train_microbatch_size", "wd": "weight_decay", "epsilon": "eps",
    "warmup": "t_warmup", "warmup_steps": "t_warmup", "max_steps": "max_duration",
    "train_steps": "max_duration", "steps": "max_duration", "vocab": "vocab_size", "dropout": "resid_pdrop",
}


class _Origin:
    """Names where a key came from: the ``--set`` flags or the config file."""

    def __init__(self, path: str | None, overridden: set[str]):
        self.path = path
        self.overridden = overridden

    def __call__(self, key: str) -> str:
        for set_key in self.overridden:
            if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
                return "--set"
        return self.path or ("--set" if self.overridden else "config")


def load_config(path: str | None, overrides: Sequence[str] = (), *, notices: list[str] | None = None,
                secrets: list[str] | None = None) -> Config:
    """Read, override, interpolate, map, type and validate a config. ``path`` None: defaults.
    Notices (accepted Foundry keys with no meaning here) go to ``notices`` if given, else to the
    log at WARNING. ``secrets`` collects the values of credential-named environment variables the
    config reads (``${oc.env:HF_TOKEN}``), to ``interpolate.mask`` wherever the config is shown."""
    doc = _read(path)
    overridden = apply_overrides(doc, overrides)
    where = _Origin(path, overridden)
    config_keys = {f.name for f in dataclasses.fields(Config)}
    foundry.hoist_legacy_variables(doc, config_keys, interpolate.references(doc), overridden)
    doc = interpolate.interpolate(doc, where, secrets)
    note = notices.append if notices is not None else logging.warning
    foundry.map_foundry(doc, note, where)
    cfg = _build(Config, doc, "", where)
    validate.validate(cfg, where)
    return cfg


def load_config_dict(doc: dict, *, source: str = "checkpoint") -> Config:
    """Type and validate an already-resolved config mapping (e.g. one saved in a checkpoint)."""
    where = _Origin(source, set())
    cfg = _build(Config, copy.deepcopy(doc), "", where)
    validate.validate(cfg, where)
    return cfg


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently; OmegaConf, and so LLM Foundry, refuses it). Keys brought in by a ``<<`` merge may be
    overridden, as YAML allows."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        problem=f"the key {key_node.value!r} is given twice in one mapping (remove one)",
                        problem_mark=key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _read(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; check the path passed to --config") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.__class__.__name__}: {e}); "
                          "pass a readable UTF-8 YAML file") from None
    try:
        doc = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(malformed_yaml(path, e)) from None
    if doc is None:  # nothing but comments or blanks: the defaults alone would train a 1.3B model
        raise ConfigError(f"{path}: the config file is empty; write the run's settings into it (configs/ has "
                          f"examples, configs/quickstart.yaml trains a small model on this machine)")
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, "
                          f"got a {type(doc).__name__}; start the file with 'key: value' lines")
    return doc


def apply_overrides(doc: dict, overrides: Sequence[str]) -> set[str]:
    """Apply ``dotted.key=value`` strings to ``doc`` in place (values parsed as YAML); returns
    the keys set."""
    keys = set()
    for text in overrides:
        key, eq, raw = text.partition("=")
        key = key.strip()
        if not eq or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. --set optimizer.lr=1e-3")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            problem = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ConfigError(f"--set {text!r}: the value is not valid YAML ({problem}); quote it") from None
        *parents, leaf = key.split(".")
        node: Any = doc
        for i, part in enumerate(parents):
            child = _child(node, part)
            following = (parents + [leaf])[i + 1]
            if child is None and following.isdigit():
                section = ".".join(parents[: i + 1])
                raise ConfigError(f"--set {text!r}: '{section}' is not a list in the config file; "
                                  f"set the whole list instead, e.g. --set {section}=[a, b]")
            if child is None:
                child = {}
                _assign(node, part, child, text)
            elif not isinstance(child, (dict, list)):
                section = ".".join(parents[: i + 1])
                raise ConfigError(f"--set {text!r}: '{section}' holds {child!r}, not a section; "
                                  f"set '{section}' itself instead")
            node = child
        _assign(node, leaf, value, text)
        keys.add(key)
    return keys


def _child(node: Any, part: str) -> Any:
    if isinstance(node, list):
        return node[int(part)] if part.isdigit() and int(part) < len(node) else None
    return node.get(part)


def _assign(node: Any, part: str, value: Any, text: str) -> None:
    if isinstance(node, list):
        if not (part.isdigit() and int(part) < len(node)):
            raise ConfigError(f"--set {text!r}: {part!r} is not an index of a {len(node)}-item list; "
                              "set the whole list instead, e.g. key=[a, b]")
        node[int(part)] = value
    else:
        node[part] = value


# ----------------------------------------------------------------------------- typing


def _build(cls: type, data: Any, prefix: str, where: _Origin) -> Any:
    """Build dataclass ``cls`` from mapping ``data``, checking every key and type."""
    section = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where(section)}: {section}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise ConfigError(_unknown_key(key, str(name), names, prefix, where))
        kwargs[name] = _convert(hints[name], value, key, where)
    return cls(**kwargs)


def _unknown_key(key: str, name: str, names: list[str], prefix: str, where: _Origin) -> str:
    guess = _ALIASES.get(name) if _ALIASES.get(name) in names else None
    if guess is None:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        guess = close[0] if close else None
    if guess is not None:
        hint = f"did you mean '{prefix}{guess}'?"
    else:
        elsewhere = [k for k in _all_keys(Config) if k.rsplit(".", 1)[-1] in (name, _ALIASES.get(name))]
        if elsewhere:
            hint = f"did you mean '{elsewhere[0]}'?"
        elif not prefix:
            hint = "put your own variables under 'variables:'; see 'jaxtrain train --help-config'"
        else:
            hint = f"valid keys here: {', '.join(names)}"
    return f"unknown key '{key}' in {where(key)}; {hint}"


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        inner = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        if inner:
            keys += _all_keys(inner[0], f"{prefix}{name}.")
    return keys


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
         list: "a list", dict: "a mapping", type(None): "null"}


def _convert(tp: Any, value: Any, key: str, where: _Origin) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        # Prefer the member the value already is (16 -> int, 'auto' -> str), then conversions.
        ordered = sorted((a for a in args if a is not type(None)), key=lambda a: not _is_exactly(a, value))
        for arg in ordered:
            try:
                return _convert(arg, value, key, where)
            except ConfigError:
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    raise
        kinds = " or ".join(_KIND.get(a, getattr(a, "__name__", str(a))) for a in args)
        raise ConfigError(f"{where(key)}: {key}: expected {kinds}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return tp() if value is None else _build(tp, value, key + ".", where)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= 2**63:  # no count, size or seed is this large; JAX and NumPy take 64 bits at most
            raise ConfigError(f"{where(key)}: {key}: {value} is out of range (at most {2**63 - 1})")
        return value
    if tp is float and not isinstance(value, bool):
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.replace("_", ""))  # YAML reads 1e-3 (no dot) as text
            except ValueError:
                pass
        if number is not None and not math.isfinite(number):  # .nan, .inf: no setting means them
            raise ConfigError(f"{where(key)}: {key}: expected a finite number, got {value!r}")
        if number is not None:
            return number
    if tp is str:
        if isinstance(value, str):
            return value
        if key in TIME_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            return f"{value}ba"
    if tp is list and isinstance(value, (list, tuple)):
        return list(value)
    if tp is dict and (value is None or isinstance(value, dict)):
        return dict(value or {})
    if tp is Any:
        return value
    hint = "; quote it to make it text" if tp is str else ""
    raise ConfigError(f"{where(key)}: {key}: expected {_KIND.get(tp, type_name(tp))}, got {value!r}{hint}")


def _is_exactly(tp: Any, value: Any) -> bool:
    if tp is float:
        return isinstance(value, float)
    if tp in (int, str, list, dict):
        return type(value) is tp
    return dataclasses.is_dataclass(tp) and isinstance(value, dict)


# ----------------------------------------------------------------------------- output


def config_to_dict(cfg: Any) -> dict:
    """The fully resolved config as plain dicts, lists and scalars."""
    return dataclasses.asdict(cfg)


def malformed_yaml(path: str, error: Exception) -> str:
    """One line for a YAML parse error: ``path:line: malformed YAML (problem[, context at line N]); ...``."""
    mark = getattr(error, "problem_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = " ".join(str(getattr(error, "problem", None) or error).split())
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None and mark is not None and context_mark.line != mark.line:
        problem += f", {context} at line {context_mark.line + 1}"
    return f"{path}{line}: malformed YAML ({problem}); fix the file at that line"


def dump_yaml(cfg: Any) -> str:
    """The fully resolved config as YAML; ``load_config`` of it gives an equal Config."""
    return yaml.safe_dump(_escape(config_to_dict(cfg)), sort_keys=False, default_flow_style=False)


def _escape(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _escape(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape(v) for v in node]
    return interpolate.escape(node) if isinstance(node, str) else node

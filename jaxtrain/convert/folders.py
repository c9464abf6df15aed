"""What conversion reads and writes in folders: a new output folder, JSON settings files, and
whether a folder is a Hugging Face model's."""

from __future__ import annotations

import json
import os
from typing import Any

from jaxtrain.config import ConfigError

CONFIG_FILE = "config.json"


def check_new_folder(folder: str) -> None:
    """Refuse an output ``folder`` that is an existing file, a non-empty folder, or under a file."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"{folder}: output exists and is not a folder; choose a new folder")
    if os.path.isdir(folder) and os.listdir(folder):
        raise ConfigError(f"{folder}: output folder is not empty; choose a new folder")
    parent = os.path.dirname(os.path.abspath(folder))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{folder}: {parent} is a file, not a folder; choose an output folder elsewhere")


def read_json(path: str) -> Any:
    """The JSON in ``path``; ``ConfigError`` naming the file, line and column when it is not JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
                          "fix or download the file again") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; fix or download the file again") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from None


def read_json_object(folder: str, name: str, *, expected: str, what: str) -> dict:
    """The JSON object in ``folder/name``; ``ConfigError`` when the file is missing (``folder`` was
    to be ``expected``), is not JSON, or holds no object (of ``what``)."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise ConfigError(f"{folder}: no {name}; expected {expected}")
    value = read_json(path)
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: holds a JSON {type(value).__name__}, not an object of {what}")
    return value


def is_hf_folder(path: str) -> bool:
    """Whether ``path`` is a local Hugging Face model folder (a ``config.json`` beside safetensors)."""
    return ("://" not in str(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))
            and any(name.endswith(".safetensors") or name == "model.safetensors.index.json" for name in os.listdir(path)))

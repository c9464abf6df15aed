"""Foundry-style ``${...}`` interpolation over a raw YAML document (plain dicts and lists).

- ``${variables.name}`` (or ``${variables.a.b}``) reads the ``variables:`` section.
- ``${name}`` / ``${a.b}`` (Foundry's older form) reads ``variables`` first, then the document
  root, so ``${max_seq_len}`` may point at the top-level ``max_seq_len`` key.
- ``${oc.env:NAME}`` / ``${oc.env:NAME,default}`` reads an environment variable (as text).
- A string that is exactly one reference takes the referenced value with its type (an int stays
  an int, a mapping stays a mapping); a reference inside a longer string is substituted as text.
- References inside referenced values are resolved too; a cycle is an error.
- ``\\${`` is a literal ``${``.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Callable
from typing import Any

from jaxtrain.config.schema import ConfigError

_REF_RE = re.compile(r"(?<!\\)\$\{([^${}]*)\}")


def references(doc: Any) -> set[str]:
    """Every reference expression (the text inside ``${...}``) used anywhere in ``doc``."""
    found: set[str] = set()
    if isinstance(doc, dict):
        for value in doc.values():
            found |= references(value)
    elif isinstance(doc, list):
        for value in doc:
            found |= references(value)
    elif isinstance(doc, str):
        found.update(m.strip() for m in _REF_RE.findall(doc))
    return found


def escape(text: str) -> str:
    """Make ``text`` survive interpolation unchanged."""
    return text.replace("${", "\\${")


# Environment variables whose values are kept out of printed configs (``mask``).
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|PRIVATE", re.IGNORECASE)
MASK = "<hidden>"  # a plain YAML scalar, so a masked config still parses


def interpolate(doc: dict, where: Callable[[str], str], secrets: list[str] | None = None) -> dict:
    """A copy of ``doc`` with every reference resolved. ``where(key)`` names the source of a key.
    ``secrets``: collects the values read from environment variables named like credentials
    (``SECRET_NAME``: ``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ...)."""
    return _Resolver(doc, where, secrets).resolve(doc, "", ())


def mask(text: str, secrets: list[str]) -> str:
    """``text`` with every one of ``secrets`` (at least 4 characters long) replaced by ``MASK``."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, MASK)
    return text


class _Resolver:
    def __init__(self, root: dict, where: Callable[[str], str], secrets: list[str] | None = None):
        self.root = root
        self.where = where
        self.secrets = secrets

    def resolve(self, node: Any, key: str, stack: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: self.resolve(v, _join(key, k), stack) for k, v in node.items()}
        if isinstance(node, list):
            return [self.resolve(v, _join(key, str(i)), stack) for i, v in enumerate(node)]
        if not isinstance(node, str):
            return node
        whole = _REF_RE.fullmatch(node)
        if whole:
            return self.lookup(whole.group(1).strip(), key, stack)
        text = _REF_RE.sub(lambda m: self.as_text(m.group(1).strip(), key, stack), node)
        return text.replace("\\${", "${")

    def as_text(self, expr: str, key: str, stack: tuple[str, ...]) -> str:
        value = self.lookup(expr, key, stack)
        if value is None or isinstance(value, (dict, list)):
            kind = "null" if value is None else "a mapping or list"
            raise ConfigError(
                f"{self.where(key)}: {key}: '${{{expr}}}' is {kind} and cannot be embedded in text; "
                "give the variable a value or use the reference as the whole value"
            )
        return str(value)

    def lookup(self, expr: str, key: str, stack: tuple[str, ...]) -> Any:
        if expr.startswith("oc.env:"):
            name, _, default = expr[len("oc.env:"):].partition(",")
            value = os.environ.get(name.strip())
            if value is None and not default:
                raise ConfigError(
                    f"{self.where(key)}: {key}: environment variable {name.strip()!r} is not set; "
                    "set it or give a default as ${oc.env:NAME,default}"
                )
            if value is not None and self.secrets is not None and SECRET_NAME.search(name):
                self.secrets.append(value)
            return value if value is not None else default.strip()
        if ":" in expr:
            raise ConfigError(
                f"{self.where(key)}: {key}: resolver '${{{expr}}}' is not supported; "
                "only ${variables.name} and ${oc.env:NAME} are"
            )
        if expr.startswith("variables."):
            candidates = [expr]
        else:
            candidates = [f"variables.{expr}", expr]
        for path in candidates:
            found, value = _get(self.root, path)
            if found:
                if path in stack:
                    cycle = " -> ".join((*stack, path))
                    raise ConfigError(f"{self.where(key)}: {key}: circular reference {cycle}; break the cycle")
                return copy.deepcopy(self.resolve(value, path, (*stack, path)))
        raise ConfigError(f"{self.where(key)}: {key}: undefined variable '${{{expr}}}'; {self.hint(expr)}")

    def hint(self, expr: str) -> str:
        names = [f"variables.{n}" for n in (self.root.get("variables") or {})]
        names += list(self.root)
        wanted = expr if expr.startswith("variables.") else f"variables.{expr}"
        close = difflib.get_close_matches(wanted, names, n=1, cutoff=0.7)
        if close:
            return f"did you mean '${{{close[0]}}}'?"
        return f"define '{expr.removeprefix('variables.')}' under 'variables:'"


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _get(root: Any, path: str) -> tuple[bool, Any]:
    node = root
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node

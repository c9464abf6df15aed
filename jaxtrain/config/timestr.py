"""Composer-style time strings: "100ba", "2ep", "50000tok", "2Btok", "1_000sp", "0.1dur".

A bare integer (``100`` or ``"100"``) means batches here; in a config, the run's durations and
intervals (``max_duration``, ``eval_interval``, ``save_interval``, ``console_log_interval``) given
as bare integers count epochs, as Composer reads them (``jaxtrain.config.foundry``). Underscores between digits are allowed, and
``k``/``M``/``B``/``T`` before the unit multiply by 1e3/1e6/1e9/1e12 ("2Btok" is two billion
tokens). ``dur`` is a fraction of the whole run; every other unit counts whole things.
"""

from __future__ import annotations

import dataclasses
import math
import re

from jaxtrain.config.schema import ConfigError

UNITS = ("ba", "ep", "tok", "sp", "dur")
EXAMPLES = "'100ba', '2ep', '50000tok', '2Btok', '1_000sp' or '0.1dur'"
_MULTIPLIERS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_TIME_RE = re.compile(r"^(?P<num>\d+(?:\.\d*)?|\.\d+)(?:[eE](?P<exp>[+-]?\d+))?(?P<mult>[kKMBGT]?)(?P<unit>[a-z]*)$")


@dataclasses.dataclass(frozen=True)
class Time:
    """An amount of training time: ``value`` in ``unit`` (one of ``UNITS``)."""

    value: float
    unit: str

    def __str__(self) -> str:
        value = int(self.value) if self.value == int(self.value) else self.value
        return f"{value}{self.unit}"


def _invalid(key: str, text: object, why: str) -> ConfigError:
    where = f"{key}: " if key else ""
    return ConfigError(f"{where}invalid time {text!r} ({why}); use e.g. {EXAMPLES}")


def parse_time(s: str | int, *, key: str = "") -> Time:
    """Parse a time string; ``key`` names the config key in error messages."""
    if isinstance(s, bool) or not isinstance(s, (str, int)):
        raise _invalid(key, s, "expected a time string or an integer number of batches")
    if isinstance(s, int):
        if s < 0:
            raise _invalid(key, s, "negative")
        return Time(float(s), "ba")
    text = s.strip()
    if text.startswith("-"):
        raise _invalid(key, s, "negative")
    if "__" in text or text.startswith("_") or re.search(r"_(?!\d)|(?<!\d)_", text):
        raise _invalid(key, s, "underscores may only separate digits")
    match = _TIME_RE.match(text.replace("_", ""))
    if match is None:
        raise _invalid(key, s, "not a number followed by a unit")
    unit = match["unit"] or "ba"
    if unit not in UNITS:
        raise _invalid(key, s, f"unknown unit {unit!r}; units are {', '.join(UNITS)}")
    value = float(match["num"]) * 10 ** int(match["exp"] or 0) * _MULTIPLIERS[match["mult"]]
    if unit != "dur" and not _is_whole(value):
        raise _invalid(key, s, f"'{unit}' counts whole {_NOUNS[unit]}")
    return Time(float(round(value)) if unit != "dur" else value, unit)


_NOUNS = {"ba": "batches", "ep": "epochs", "tok": "tokens", "sp": "samples"}


def _is_whole(x: float) -> bool:
    return abs(x - round(x)) <= 1e-9 * max(1.0, abs(x))


def _ceil(x: float) -> int:
    """Ceiling that forgives float noise (0.1 * 30 is 3, not 4)."""
    return int(round(x)) if _is_whole(x) else math.ceil(x)


def to_batches(
    t: Time,
    *,
    batches_per_epoch: int | None,
    tokens_per_batch: int,
    samples_per_batch: int,
    total_batches: int | None,
    key: str = "",
) -> int:
    """``t`` as a whole number of batches (rounded up for tokens, samples and fractions)."""
    where = f"{key}: " if key else ""
    if t.unit == "ba":
        return int(t.value)
    if t.unit == "tok":
        return -(-int(t.value) // tokens_per_batch)
    if t.unit == "sp":
        return -(-int(t.value) // samples_per_batch)
    if t.unit == "ep":
        if batches_per_epoch is None:
            raise ConfigError(
                f"{where}'{t}' is in epochs but the dataset's length is unknown; give it in batches or tokens instead"
            )
        return _ceil(t.value * batches_per_epoch)
    if t.unit == "dur":
        if total_batches is None:
            raise ConfigError(f"{where}'{t}' is a fraction of the run, which has no length here; give it in batches")
        return _ceil(t.value * total_batches)
    raise ConfigError(f"{where}unknown time unit {t.unit!r}; units are {', '.join(UNITS)}")

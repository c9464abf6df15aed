"""The embedded default data: the running interpreter's standard-library ``.py`` files.

Every machine with Python has this small code corpus and no network is needed. The corpus is
the stdlib's own modules and packages, with these left out:

- ``site-packages``/``dist-packages`` (installed packages differ from machine to machine);
- the ``test`` tree (~20 MB of CPython's regression tests, often deliberately odd files) and
  ``idle_test``/``tests`` folders;
- generated or non-code files: ``encodings`` (charmap tables), ``pydoc_data`` (a help-text
  dump), ``lib2to3``, ``idlelib``, ``turtledemo``, ``ensurepip``, ``config-*``.

On CPython 3.12 this is ~400 files and ~8 MB (~2M tokens with the default tokenizer); training
the tokenizer and packing it take a few seconds on two cores. ``DEFAULT_MAX_BYTES`` caps the
corpus for other distributions; ``max_files`` caps it for quick runs.

Files are listed by relative POSIX path and ordered by a salted sha1 of that path, so a cap takes
a spread sample of the stdlib rather than its alphabetical head, and the order (hence the data)
is the same on every machine with the same Python version. A file is held out for evaluation
when a differently salted sha1 of its path falls below ``holdout_fraction``: stable, disjoint,
independent of the cap and of the file order.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator

from jaxtrain.config.schema import ConfigError
from jaxtrain.data.sources import Documents, fingerprint_files

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "pydoc_data",
    "encodings", "lib2to3", "turtledemo", "ensurepip", "__pycache__", "__phello__",
})
HELD_OUT_SPLITS = frozenset({"eval", "val", "validation", "test", "heldout", "held_out"})


def stdlib_root() -> str:
    """The folder holding this interpreter's pure-Python standard library."""
    return sysconfig.get_paths()["stdlib"]


def _path_fraction(rel_path: str, salt: str) -> float:
    """A number in [0, 1) fixed by the path and salt alone (sha1, not Python's salted ``hash``)."""
    digest = hashlib.sha1(f"{salt}:{rel_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_held_out(rel_path: str, holdout_fraction: float) -> bool:
    """Whether the file at ``rel_path`` (relative POSIX path) belongs to the held-out split."""
    return _path_fraction(rel_path, "split") < holdout_fraction


def list_stdlib_files(root: str | None = None, *, max_files: int | None = None,
                      max_bytes: int | None = DEFAULT_MAX_BYTES) -> list[str]:
    """Relative POSIX paths of the corpus files in corpus order, within the caps."""
    root = root or stdlib_root()
    candidates = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in EXCLUDED_DIRS and not d.startswith("config-")]
        rel_folder = os.path.relpath(folder, root)
        for name in names:
            if name.endswith(".py"):
                rel_path = name if rel_folder == "." else os.path.join(rel_folder, name)
                candidates.append(rel_path.replace(os.sep, "/"))
    candidates.sort(key=lambda rel_path: (_path_fraction(rel_path, "order"), rel_path))
    chosen, total_bytes = [], 0
    for rel_path in candidates:
        if max_files is not None and len(chosen) >= max_files:
            break
        size = os.path.getsize(os.path.join(root, rel_path))
        if max_bytes is not None and total_bytes + size > max_bytes:
            continue
        chosen.append(rel_path)
        total_bytes += size
    return chosen


def split_files(rel_paths: list[str], holdout_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held_out) partition of ``rel_paths``, each in the given order."""
    held_out = [p for p in rel_paths if is_held_out(p, holdout_fraction)]
    held_out_set = set(held_out)
    return [p for p in rel_paths if p not in held_out_set], held_out


def stdlib_documents(split: str = "train", *, holdout_fraction: float = 0.05, max_files: int | None = None,
                     max_bytes: int | None = DEFAULT_MAX_BYTES, root: str | None = None,
                     key: str = "train_loader.dataset") -> Documents:
    """The train or held-out split of the stdlib corpus; undecodable files are skipped."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ConfigError(f"{key}.holdout_fraction={holdout_fraction} must be in [0, 1)")
    held_out_wanted = split in HELD_OUT_SPLITS
    if split != "train" and not held_out_wanted:
        raise ConfigError(f"{key}.split={split!r} is unknown for python_stdlib: use 'train' or 'eval'")
    root = root or stdlib_root()
    train, held_out = split_files(list_stdlib_files(root, max_files=max_files, max_bytes=max_bytes), holdout_fraction)
    rel_paths = held_out if held_out_wanted else train
    if not rel_paths:
        raise ConfigError(
            f"{key}: the python_stdlib {split} split is empty ({len(train)} train, {len(held_out)} held-out files): "
            "raise max_files or holdout_fraction"
        )
    abs_paths = [os.path.join(root, p) for p in rel_paths]

    def texts() -> Iterator[str]:
        for path in abs_paths:
            try:
                with open(path, encoding="utf-8") as handle:
                    yield handle.read()
            except UnicodeDecodeError:
                continue

    version = f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}"
    fingerprint = fingerprint_files(abs_paths, "python_stdlib", version, held_out_wanted)
    return Documents(f"python_stdlib:{split}", fingerprint, texts, len(rel_paths))

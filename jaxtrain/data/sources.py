"""Document sources: plain text files (paths, folders, globs), JSONL files and MDS text columns.

A source is read into a ``Documents``: a fingerprint that changes whenever the inputs change
(used to key the tokenizer and packed-data caches) and a function that yields the documents'
texts in a fixed order. Nothing is read until ``texts()`` is called, so a run whose caches are
warm only stats the files.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator

from jaxtrain.config.schema import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclasses.dataclass(frozen=True)
class Documents:
    """A named, fingerprinted, re-iterable sequence of documents."""

    name: str
    fingerprint: str
    texts: Callable[[], Iterator[str]]
    num_files: int


def fingerprint_files(paths: list[str], *extra: object) -> str:
    """A hex digest of the paths, sizes and modification times (plus ``extra``), in order."""
    digest = hashlib.sha1()
    for item in extra:
        digest.update(repr(item).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def resolve_files(local: str | None, split: str, suffixes: tuple[str, ...], key: str) -> list[str]:
    """The sorted files named by ``local``: a file, a glob, or a folder (read recursively).

    A folder that holds a sub-folder named ``split`` is read from that sub-folder, as in LLM
    Foundry's ``local``/``split`` layout. A folder whose top-level JSON files are named by split,
    as Hugging Face saves them (``train.jsonl``, ``test-00000-of-00002.jsonl``), gives the files
    of ``split`` only. Otherwise the folder is read as given.
    """
    if not local:
        raise ConfigError(f"{key}.local is not set: give a file, folder or glob of input files")
    local = os.path.expanduser(local)
    if os.path.isdir(local):
        root = os.path.join(local, split) if os.path.isdir(os.path.join(local, split)) else local
        found = [
            os.path.join(folder, name)
            for folder, _, names in os.walk(root)
            for name in names
            if name.endswith(suffixes)
        ]
        if root == local and suffixes == JSONL_SUFFIXES:
            found = _split_files(local, split, found, key)
    elif os.path.isfile(local):
        found = [local]
    else:
        found = [path for path in glob.glob(local, recursive=True) if os.path.isfile(path)]
    if not found:
        raise ConfigError(
            f"{key}.local={local!r} matches no input files (looked for {', '.join(suffixes)} in folders)"
        )
    return sorted(found)


SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "eval", "dev")
_SPLIT_FILE = re.compile(r"^(%s)(?:[.\-_]|$)" % "|".join(SPLIT_NAMES), re.IGNORECASE)


def _split_files(folder: str, split: str, found: list[str], key: str) -> list[str]:
    """Of the files under ``folder``, those of ``split`` when its top-level files are named by split."""
    top = [path for path in found if os.path.dirname(path) == folder]
    named = {path: match.group(1).lower() for path in top if (match := _SPLIT_FILE.match(os.path.basename(path)))}
    if not named:
        return found
    mine = [path for path, name in named.items() if name == split.lower()]
    if not mine:
        splits = ", ".join(sorted(set(named.values())))
        raise ConfigError(f"{key}.local={folder!r} holds files of the splits {splits} but none of split "
                          f"{split!r}: set {key}.split to one of them, or point {key}.local at the files")
    return mine


def text_documents(local: str | None, split: str, *, max_files: int | None = None,
                   key: str = "train_loader.dataset") -> Documents:
    """Each text file is one document. Files that are not valid UTF-8 are an error."""
    paths = resolve_files(local, split, TEXT_SUFFIXES, key)[:max_files]

    def texts() -> Iterator[str]:
        for path in paths:
            try:
                with open(path, encoding="utf-8-sig") as handle:
                    yield handle.read()
            except UnicodeDecodeError as error:
                raise ConfigError(f"{path} is not UTF-8 text ({error.reason}): convert it or remove it from {key}.local") from None

    return Documents(f"text:{local}", fingerprint_files(paths, "text"), texts, len(paths))


def jsonl_documents(local: str | None, split: str, *, text_field: str = "text", max_files: int | None = None,
                    key: str = "train_loader.dataset", field_key: str | None = None) -> Documents:
    """Each line of each JSONL file is one JSON object; its ``text_field`` is one document.
    ``field_key`` names the setting of ``text_field`` in errors (default ``{key}.text_field``)."""
    paths = resolve_files(local, split, JSONL_SUFFIXES, key)[:max_files]

    def texts() -> Iterator[str]:
        for path in paths:
            with open(path, encoding="utf-8-sig") as handle:
                for line_number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    yield _jsonl_text(path, line_number, line, text_field, field_key or f"{key}.text_field")

    return Documents(f"jsonl:{local}", fingerprint_files(paths, "jsonl", text_field), texts, len(paths))


def mds_documents(datasets, *, text_field: str = "text", key: str = "train_loader.dataset") -> Documents:
    """Each sample's ``text_field`` column of MDS datasets (``MDSDataset``s) is one document."""
    digest = hashlib.sha1(f"mds\0{text_field}".encode())
    for dataset in datasets:
        digest.update(dataset.fingerprint.encode())

    def texts() -> Iterator[str]:
        for dataset in datasets:
            yield from dataset.texts(text_field)

    roots = ",".join(dataset.root for dataset in datasets)
    return Documents(f"mds:{roots}", digest.hexdigest(), texts, sum(dataset.num_shards for dataset in datasets))


def _jsonl_text(path: str, line_number: int, line: str, text_field: str, field_key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{line_number} is not valid JSON ({error.msg}): fix or remove that line") from None
    if not isinstance(record, dict) or text_field not in record:
        raise ConfigError(
            f"{path}:{line_number} has no field {text_field!r}: set {field_key} to the field holding the text"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise ConfigError(f"{path}:{line_number} field {text_field!r} is {type(text).__name__}, not a string")
    return text

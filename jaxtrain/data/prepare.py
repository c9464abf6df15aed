"""``jaxtrain data prepare``: text, JSONL, TFDS or MDS text in; tokenized, concatenated MDS shards out.

LLM Foundry's ``convert_dataset_hf --concat_tokens N`` layout: every document's tokens are
followed by EOS, the stream is cut into rows of exactly N tokens (the last partial row is
dropped) and each row is one sample, ``{"tokens": ndarray:int32}``. With ``tokenize=False``
each document is one ``{"text": str}`` sample, tokenized on the fly at training time. The
dataset goes to ``out/split`` and the tokenizer to ``out/tokenizer.json``, so a config of
``{source: mds, local: out, split: train}`` with ``tokenizer.name: out/tokenizer.json`` trains on it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import json
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from jaxtrain.config.schema import ConfigError, TokenizerConfig
from jaxtrain.data.mds.reader import MDSDataset, dataset_root
from jaxtrain.data.mds.writer import DEFAULT_SIZE_LIMIT, INDEX_BASENAME, MDSWriter, is_remote, upload_file
from jaxtrain.data.sources import JSONL_SUFFIXES, TEXT_SUFFIXES
from jaxtrain.data.tfds_source import tfds_input
from jaxtrain.data.tokenizer import Tokenizer, batch_ids, bpe_train_max_chars, capped_texts, load_tokenizer

_DOCS_PER_TASK = 256


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """What ``prepare`` wrote."""

    out: str
    num_documents: int
    num_samples: int
    num_tokens: int | None
    tokenizer_path: str | None


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxtrain")


# ----------------------------------------------------------------------------- inputs


def input_texts(inputs: list[str], *, text_field: str = "text", input_split: str = "train",
                tfds_data_dir: str | None = None) -> Callable[[], Iterator[str]]:
    """A re-iterable source of the documents ``inputs`` name, in order.

    Each input is ``tfds:NAME[/CONFIG][:VERSION][:SPLIT]`` (a TFDS dataset prepared in
    ``tfds_data_dir``, see ``jaxtrain.data.tfds_source``), ``mds:PATH`` or a folder holding an
    MDS ``index.json`` (its ``text_field`` column), or files: a path, folder or glob of text
    files (one document each) or JSONL files (``.jsonl``/``.json``/``.ndjson``, one document per
    line, its ``text_field``).
    """
    readers = [_reader(spec, text_field, input_split, tfds_data_dir) for spec in inputs]
    if not readers:
        raise ConfigError("no inputs: give text/JSONL files, folders or globs, mds:PATH or tfds:NAME")

    def texts() -> Iterator[str]:
        for reader in readers:
            yield from reader()

    return texts


def _reader(spec: str, text_field: str, input_split: str, tfds_data_dir: str | None) -> Callable[[], Iterator[str]]:
    if spec.startswith("tfds:"):
        return tfds_input(spec[5:], data_dir=tfds_data_dir, split=input_split, text_field=text_field)
    path = spec[4:] if spec.startswith("mds:") else spec
    if spec.startswith("mds:") or os.path.isfile(os.path.join(dataset_root(path, input_split), INDEX_BASENAME)):
        dataset = MDSDataset(path, input_split)
        return lambda: dataset.texts(text_field)
    files = _input_files(spec)
    return lambda: _file_texts(files, text_field)


def _input_files(spec: str) -> list[str]:
    local = os.path.expanduser(spec)
    if os.path.isdir(local):
        found = [os.path.join(folder, name) for folder, _, names in os.walk(local) for name in names
                 if name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)]
    elif os.path.isfile(local):
        found = [local]
    else:
        found = [path for path in glob.glob(local, recursive=True) if os.path.isfile(path)]
    if not found:
        raise ConfigError(f"input {spec!r} matches no files (folders are searched for "
                          f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)})")
    return sorted(found)


def _file_texts(files: list[str], text_field: str) -> Iterator[str]:
    for path in files:
        try:
            with open(path, encoding="utf-8-sig") as handle:
                if not path.endswith(JSONL_SUFFIXES):
                    yield handle.read()
                    continue
                for line_number, line in enumerate(handle, start=1):
                    if line.strip():
                        yield _jsonl_field(path, line_number, line, text_field)
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path} is not UTF-8 text ({error.reason}): convert it or leave it out") from None


def _jsonl_field(path: str, line_number: int, line: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{line_number} is not valid JSON ({error.msg}): fix or remove that line") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise ConfigError(f"{path}:{line_number} has no string field {text_field!r}: choose the field with --text-field")
    return record[text_field]


# ----------------------------------------------------------------------------- tokenizing


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_WORKER_TOKENIZER = None


def _start_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker process
    import tokenizers
    _WORKER_TOKENIZER = tokenizers.Tokenizer.from_str(tokenizer_json)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in batch_ids(_WORKER_TOKENIZER, texts)]


def encoded_documents(tokenizer: Tokenizer, texts: Iterable[str], workers: int = 1) -> Iterator[np.ndarray]:
    """int32 token ids of each text, in order; ``workers`` > 1 tokenizes in that many processes."""
    if workers <= 1:
        for chunk in _chunks(texts, _DOCS_PER_TASK):
            yield from (np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(chunk))
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                                initargs=(tokenizer.backend.to_str(),)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in _chunks(texts, _DOCS_PER_TASK):
            pending.append(pool.submit(_encode_in_worker, chunk))
            if len(pending) >= 2 * workers:  # bounded read-ahead keeps memory flat
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def concatenated_rows(token_arrays: Iterable[np.ndarray], *, seq_len: int, eos_token_id: int) -> Iterator[np.ndarray]:
    """int32[seq_len] rows of the documents' tokens, each document followed by EOS; the last partial row is dropped."""
    eos = np.array([eos_token_id], np.int32)
    pending: list[np.ndarray] = []
    pending_len = 0
    for ids in token_arrays:
        pending += [ids, eos]
        pending_len += len(ids) + 1
        if pending_len >= seq_len:
            stream = np.concatenate(pending)
            full = len(stream) // seq_len * seq_len
            yield from stream[:full].reshape(-1, seq_len)
            pending, pending_len = [stream[full:]], len(stream) - full


# ----------------------------------------------------------------------------- prepare


def prepare(inputs: list[str], out: str, *, tokenizer: str = "bpe:default", vocab_size: int | None = None,
            eos_text: str | None = None, concat_tokens: int | None = 2048, tokenize: bool = True,
            split: str = "train", text_field: str = "text", input_split: str = "train",
            size_limit: int | str | None = DEFAULT_SIZE_LIMIT, compression: str | None = None,
            hashes: list[str] | None = None, workers: int = 1, cache_dir: str | None = None,
            tfds_data_dir: str | None = None, overwrite: bool = False, progress: bool = True) -> PrepareResult:
    """Write ``inputs`` as an MDS dataset in ``out/split`` (see the module doc); returns what was written."""
    texts = input_texts(inputs, text_field=text_field, input_split=input_split, tfds_data_dir=tfds_data_dir)
    target = f"{out.rstrip('/')}/{split}" if is_remote(out) else os.path.join(os.path.expanduser(out), split)
    if tokenize and (concat_tokens is None or concat_tokens < 1):
        raise ConfigError(f"--concat-tokens must be a positive row length, got {concat_tokens}")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    options = dict(compression=compression, hashes=sorted(hashes or []), size_limit=size_limit, exist_ok=overwrite)
    if not tokenize:
        with MDSWriter(target, {"text": "str"}, **options) as writer:
            for document in _progress(texts(), progress, "documents"):
                writer.write({"text": document})
        if writer.num_samples == 0:
            raise ConfigError(f"the inputs {inputs} hold no documents")
        return PrepareResult(target, writer.num_samples, writer.num_samples, None, None)
    loaded = _load_tokenizer(tokenizer, vocab_size, eos_text, texts, cache_dir or default_cache_dir())
    if loaded.eos_token_id is None:
        raise ConfigError(f"tokenizer {tokenizer} has no EOS token: name the one to put between documents with --eos-text")
    counter = {"documents": 0}

    def counted() -> Iterator[str]:
        for document in _progress(texts(), progress, "documents"):
            counter["documents"] += 1
            yield document

    rows = concatenated_rows(encoded_documents(loaded, counted(), workers), seq_len=concat_tokens,
                             eos_token_id=loaded.eos_token_id)
    with MDSWriter(target, {"tokens": "ndarray:int32"}, **options) as writer:
        for row in rows:
            writer.write({"tokens": row})
        if writer.num_samples == 0:
            raise ConfigError(f"the inputs hold fewer tokens than one row of {concat_tokens}: add data or lower "
                              f"--concat-tokens")
    tokenizer_path = _save_tokenizer(loaded, out)
    return PrepareResult(target, counter["documents"], writer.num_samples, writer.num_samples * concat_tokens,
                         tokenizer_path)


def _load_tokenizer(name: str, vocab_size: int | None, eos_text: str | None, texts: Callable[[], Iterator[str]],
                    cache_dir: str) -> Tokenizer:
    kwargs = {"eos_token": eos_text} if eos_text else {}
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    if name == "bpe:default" and eos_text:
        raise ConfigError("--eos-text applies to a tokenizer.json; bpe:default always uses <|endoftext|>")

    try:
        return load_tokenizer(TokenizerConfig(name=name, kwargs=kwargs), cache_dir=cache_dir,
                              train_texts=capped_texts(texts, bpe_train_max_chars(kwargs)) if name == "bpe:default"
                              else None)
    except ConfigError as err:  # the loader names the config keys; this command's user wrote flags
        message = str(err)
        for key, flag in (("tokenizer.name=", "--tokenizer "), ("tokenizer.kwargs.eos_token=", "--eos-text "),
                          ("tokenizer.kwargs.vocab_size=", "--vocab-size ")):
            message = message.replace(key, flag)
        raise ConfigError(message) from None


def _save_tokenizer(tokenizer: Tokenizer, out: str) -> str:
    if not is_remote(out):
        path = os.path.join(os.path.expanduser(out), "tokenizer.json")
        tokenizer.save(path)
        return path
    url = f"{out.rstrip('/')}/tokenizer.json"
    with tempfile.TemporaryDirectory(prefix="jaxtrain-tokenizer-") as folder:
        path = os.path.join(folder, "tokenizer.json")
        tokenizer.save(path)
        upload_file(path, url)
    return url


def _progress(items: Iterable, enabled: bool, unit: str) -> Iterable:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, unit=f" {unit}", desc="prepare", dynamic_ncols=True)

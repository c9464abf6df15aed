"""Packing: tokenised documents joined by EOS and cut into fixed-length rows.

LLM Foundry's ``--concat_tokens`` convention: each document's tokens are followed by one EOS,
the stream of all documents is concatenated in order and cut into rows of ``max_seq_len``
tokens; the last incomplete row is dropped. The result is cached as an int32 ``.npy`` keyed by
the documents, the tokenizer, the EOS id and the row length, so a second run skips tokenising.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator

import numpy as np

from jaxtrain.data.sources import Documents
from jaxtrain.data.tokenizer import Tokenizer
from jaxtrain.tempfiles import temp_path

_DOCS_PER_ENCODE = 64


def pack_token_lists(token_lists: Iterable[list[int]], *, max_seq_len: int, eos_token_id: int) -> np.ndarray:
    """int32[num_rows, max_seq_len]: the documents' tokens, each followed by EOS, cut into rows."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    pieces = []
    for ids in token_lists:
        pieces.append(np.asarray(ids, dtype=np.int32))
        pieces.append(np.asarray([eos_token_id], dtype=np.int32))
    stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
    num_rows = stream.size // max_seq_len
    return stream[: num_rows * max_seq_len].reshape(num_rows, max_seq_len)


def pack_documents(tokenizer: Tokenizer, texts: Iterable[str], *, max_seq_len: int, eos_token_id: int) -> np.ndarray:
    """int32[num_rows, max_seq_len] from raw texts, tokenised in parallel chunks."""
    return pack_token_lists(_encoded(tokenizer, texts), max_seq_len=max_seq_len, eos_token_id=eos_token_id)


def _encoded(tokenizer: Tokenizer, texts: Iterable[str]) -> Iterator[list[int]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == _DOCS_PER_ENCODE:
            yield from tokenizer.encode_batch(chunk)
            chunk = []
    if chunk:
        yield from tokenizer.encode_batch(chunk)


def packed_cache_path(cache_dir: str, documents: Documents, tokenizer: Tokenizer, *, max_seq_len: int,
                      eos_token_id: int) -> str:
    """Where the packed rows of ``documents`` live in ``cache_dir``."""
    key = hashlib.sha1(
        f"packed-v1\0{documents.fingerprint}\0{tokenizer.fingerprint}\0{eos_token_id}\0{max_seq_len}".encode()
    ).hexdigest()[:16]
    label = "".join(c if c.isalnum() else "_" for c in documents.name)[:48]
    return os.path.join(cache_dir, "packed", f"{label}-L{max_seq_len}-{key}.npy")


def load_or_pack(documents: Documents, tokenizer: Tokenizer, *, cache_dir: str, max_seq_len: int,
                 eos_token_id: int) -> np.ndarray:
    """The packed rows of ``documents`` (int32[num_rows, max_seq_len]), from the cache when present.

    The array is memory-mapped read-only from the cache file. A cache file that cannot be read
    back as such rows (damaged on disk) is packed again.
    """
    path = packed_cache_path(cache_dir, documents, tokenizer, max_seq_len=max_seq_len, eos_token_id=eos_token_id)
    if os.path.isfile(path):
        try:
            rows = np.load(path, mmap_mode="r", allow_pickle=False)
            if rows.ndim == 2 and rows.shape[1] == max_seq_len and rows.dtype == np.int32:
                return rows
            problem = f"it holds {rows.dtype} rows of shape {rows.shape}"
        except (OSError, ValueError, EOFError) as err:
            problem = str(err)
        logging.warning("the data cache file %s cannot be read (%s); packing the data again", path, problem)
    rows = pack_documents(tokenizer, documents.texts(), max_seq_len=max_seq_len, eos_token_id=eos_token_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temp_path(path, ".npy")
    np.save(tmp, rows, allow_pickle=False)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r", allow_pickle=False)

"""Deterministic, resumable batch loaders over packed token rows.

A training epoch visits the rows in an order that is a pure function of (seed, epoch): a
splitmix64 hash of each row index, argsorted, so it is the same on every machine and NumPy
version. Each global batch is the next ``global_batch_size`` rows of that order; process ``p``
of ``P`` takes rows ``[p * G/P, (p+1) * G/P)`` of it. The position is (epoch, sample_in_epoch),
so resuming from a saved state yields exactly the batches an uninterrupted run would have.
Rows live in a memory-mapped array, so a batch is one gather and needs no prefetch thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from jaxtrain.config.schema import ConfigError
from jaxtrain.data.finetune import finetune_documents, finetune_rows
from jaxtrain.data.mds.reader import TokenRows
from jaxtrain.data.remote import open_mds_datasets, token_rows
from jaxtrain.data.packing import load_or_pack
from jaxtrain.data.sources import Documents, jsonl_documents, mds_documents, text_documents
from jaxtrain.data.stdlib_corpus import stdlib_documents
from jaxtrain.data.tokenizer import Tokenizer, load_tokenizer

SOURCES = ("python_stdlib", "text", "jsonl", "mds", "finetune_jsonl")
# bpe:default trains on at most this many characters of the train split (the stdlib corpus fits).
TOKENIZER_TRAIN_MAX_CHARS = 64 * 1024 * 1024
# Label of padding rows in eval batches: LLM Foundry's (and PyTorch's) ignored target.
IGNORE_INDEX = -100
_MASK64 = (1 << 64) - 1


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64[...] (wrapping arithmetic)."""
    values = values + np.uint64(0x9E3779B97F4A7C15)
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """int64[num_rows]: the permutation of row indices for ``epoch``, a pure function of its inputs."""
    key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64(epoch & _MASK64))
    scores = _splitmix64(np.arange(num_rows, dtype=np.uint64) ^ key)
    return np.argsort(scores, kind="stable")


class BatchLoader:
    """Batches of packed rows for one process: an endless shuffled stream, or one ordered pass.

    Iterating (``next(loader)``) yields ``{"input_ids": int32[local_batch, max_seq_len]}`` forever,
    epoch after epoch, dropping each epoch's last incomplete global batch. ``batches(n)`` is one
    in-order pass over every row for evaluation (see its doc). Given ``labels`` and
    ``sequence_id`` (same shape as ``rows``), batches carry the matching rows of them too.
    """

    def __init__(self, rows: np.ndarray, *, global_batch_size: int | None, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, pad_token_id: int = 0, name: str = "train_loader",
                 labels: np.ndarray | None = None, sequence_id: np.ndarray | None = None):
        if rows.ndim != 2:
            raise ValueError(f"{name}: rows must be [num_rows, max_seq_len], got shape {rows.shape}")
        for extra, extra_name in ((labels, "labels"), (sequence_id, "sequence_id")):
            if extra is not None and extra.shape != rows.shape:
                raise ValueError(f"{name}: {extra_name} shape {extra.shape} differs from rows shape {rows.shape}")
        self.labels = labels
        self.sequence_id = sequence_id
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
        self.rows = rows
        self.name = name
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.pad_token_id = pad_token_id
        self.global_batch_size = global_batch_size
        if global_batch_size is not None:
            self._check_batch_size(global_batch_size, "global_train_batch_size")
            if global_batch_size > self.num_sequences:
                raise ConfigError(
                    f"{name}: the dataset has {self.num_sequences} sequences of {self.max_seq_len} tokens, fewer than "
                    f"one global batch of {global_batch_size}: lower global_train_batch_size or max_seq_len, or add data"
                )
        self._epoch = 0
        self._sample_in_epoch = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _check_batch_size(self, batch_size: int, key: str) -> None:
        if batch_size < 1 or batch_size % self.process_count:
            raise ConfigError(f"{key}={batch_size} must be a positive multiple of the process count ({self.process_count})")

    @property
    def num_sequences(self) -> int:
        return int(self.rows.shape[0])

    @property
    def max_seq_len(self) -> int:
        return int(self.rows.shape[1])

    @property
    def num_tokens(self) -> int:
        """Tokens in the whole split."""
        return self.num_sequences * self.max_seq_len

    @property
    def local_batch_size(self) -> int:
        return self._global() // self.process_count

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches per epoch (the last incomplete one is dropped)."""
        return self.num_sequences // self._global()

    @property
    def num_tokens_per_batch(self) -> int:
        """Tokens in one global batch (all processes together)."""
        return self._global() * self.max_seq_len

    def _global(self) -> int:
        if self.global_batch_size is None:
            raise ValueError(f"{self.name} has no global batch size: iterate it with batches(batch_size)")
        return self.global_batch_size

    def order(self, epoch: int) -> np.ndarray:
        """int64[num_sequences]: the row order of ``epoch`` (identity when shuffle is off)."""
        if not self.shuffle:
            return np.arange(self.num_sequences)
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_order(self.num_sequences, self.seed, epoch))
        return self._order_cache[1]

    def _roll_over(self) -> None:
        if self._sample_in_epoch + self._global() > self.num_sequences:
            self._epoch += 1
            self._sample_in_epoch = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        global_batch = self._global()
        self._roll_over()
        start = self._sample_in_epoch + self.process_index * self.local_batch_size
        indices = self.order(self._epoch)[start : start + self.local_batch_size]
        self._sample_in_epoch += global_batch
        self._roll_over()
        prefetch = getattr(self.rows, "prefetch", None)
        if prefetch is not None:  # streamed rows: fetch the next batches' shards while this one trains
            ahead = self._sample_in_epoch + self.process_index * self.local_batch_size
            prefetch(self.order(self._epoch)[ahead : ahead + self.rows.predownload])
        batch = {"input_ids": np.asarray(self.rows[indices], dtype=np.int32)}
        if self.labels is not None:
            batch["labels"] = np.asarray(self.labels[indices], dtype=np.int32)
        if self.sequence_id is not None:
            batch["sequence_id"] = np.asarray(self.sequence_id[indices], dtype=np.int32)
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch: {"epoch", "sample_in_epoch"} (global samples)."""
        return {"epoch": self._epoch, "sample_in_epoch": self._sample_in_epoch}

    def close(self) -> None:
        """Release what the rows hold (a streamed dataset's local cache, unless kept)."""
        close = getattr(self.rows, "close", None)
        if close is not None:
            close()

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from ``state_dict``): the next batch is the one that was next then."""
        try:
            epoch, sample_in_epoch = int(state["epoch"]), int(state["sample_in_epoch"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{self.name}: loader state {state!r} needs integer 'epoch' and 'sample_in_epoch'") from None
        if epoch < 0 or not 0 <= sample_in_epoch <= self.num_sequences:
            raise ValueError(
                f"{self.name}: loader state epoch={epoch}, sample_in_epoch={sample_in_epoch} does not fit a dataset of "
                f"{self.num_sequences} sequences; the data changed since the checkpoint was written"
            )
        self._epoch, self._sample_in_epoch = epoch, sample_in_epoch
        self._roll_over()

    def num_batches(self, batch_size: int) -> int:
        """How many batches ``batches(batch_size)`` yields (the last one may be padded)."""
        return -(-self.num_sequences // batch_size)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """One in-order pass over every row, ``batch_size`` rows per global batch, this process's slice.

        Yields ``{"input_ids": int32[local, max_seq_len], "labels": int32[local, max_seq_len]}``
        with ``local = batch_size / process_count``. ``labels`` are the input ids (shifted by the
        loss, as in LLM Foundry); the last global batch is filled up with rows of ``pad_token_id``
        whose labels are all ``IGNORE_INDEX`` (-100), so they add nothing to the loss or the token
        count. Every batch has the same shape, so one compiled step serves all.
        """
        self._check_batch_size(batch_size, f"{self.name} eval batch size")
        local = batch_size // self.process_count
        for global_start in range(0, self.num_sequences, batch_size):
            start = global_start + self.process_index * local
            real = self.rows[start : min(start + local, self.num_sequences)]
            input_ids = np.full((local, self.max_seq_len), self.pad_token_id, dtype=np.int32)
            labels = np.full((local, self.max_seq_len), IGNORE_INDEX, dtype=np.int32)
            input_ids[: len(real)] = real
            labels[: len(real)] = real if self.labels is None else self.labels[start : start + len(real)]
            batch = {"input_ids": input_ids, "labels": labels}
            if self.sequence_id is not None:
                batch["sequence_id"] = np.zeros((local, self.max_seq_len), dtype=np.int32)
                batch["sequence_id"][: len(real)] = self.sequence_id[start : start + len(real)]
            yield batch


def documents_for(dataset, *, key: str) -> Documents:
    """The documents a ``DatasetConfig`` names."""
    source = dataset.source
    if source == "mds":
        return mds_documents(open_mds_datasets(dataset, key=key), text_field=dataset.text_field, key=key)
    if source not in SOURCES:
        raise ConfigError(f"{key}.source={source!r} is unknown: use one of {', '.join(SOURCES)}")
    if dataset.remote:
        raise ConfigError(f"{key}.remote is set, but {source} sources read local files only: unset it or use mds")
    if source == "python_stdlib":
        return stdlib_documents(dataset.split, holdout_fraction=dataset.holdout_fraction,
                                max_files=dataset.max_files, key=key)
    if source == "text":
        return text_documents(dataset.local, dataset.split, max_files=dataset.max_files, key=key)
    if source == "finetune_jsonl":
        return finetune_documents(dataset.local, dataset.split, key=key)[0]
    return jsonl_documents(dataset.local, dataset.split, text_field=getattr(dataset, "text_field", "text"),
                           max_files=dataset.max_files, key=key)


def _capped_texts(documents: Documents, max_chars: int):
    def texts() -> Iterator[str]:
        total = 0
        for text in documents.texts():
            if total >= max_chars:
                return
            total += len(text)
            yield text
    return texts


def _pad_id(tokenizer: Tokenizer) -> int:
    # Padding rows are never trained on (labels are IGNORE_INDEX), so any valid id will do.
    return 0 if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def _packed_rows(cfg, dataset, documents: Documents, tokenizer: Tokenizer, cache_dir: str, key: str) -> np.ndarray:
    max_seq_len = dataset.max_seq_len or cfg.max_seq_len
    eos_token_id = dataset.eos_token_id if dataset.eos_token_id is not None else tokenizer.eos_token_id
    if eos_token_id is None:
        raise ConfigError(f"{key}.eos_token_id is unset and the tokenizer has no EOS token: set one of them")
    return load_or_pack(documents, tokenizer, cache_dir=cache_dir, max_seq_len=max_seq_len, eos_token_id=eos_token_id)


def _rows_for(cfg, dataset, documents: Documents, tokenizer: Tokenizer, cache_dir: str, key: str):
    """Packed token rows, or ``FinetuneRows`` (inputs, labels, sequence ids) for ``finetune_jsonl``."""
    if dataset.source == "finetune_jsonl":
        return finetune_rows(cfg, dataset, tokenizer, key=key)
    return _packed_rows(cfg, dataset, documents, tokenizer, cache_dir, key)


def _split_rows(rows) -> tuple[np.ndarray, dict]:
    """(input rows, BatchLoader keyword arguments for labels and sequence ids)."""
    labels = getattr(rows, "labels", None)
    if labels is None:
        return rows, {}
    return rows.input_ids, {"labels": labels, "sequence_id": rows.sequence_id}


def _mds_token_rows(cfg, dataset, key: str) -> TokenRows | None:
    """The rows of a pre-tokenized MDS dataset (a ``tokens`` column), or None for any other dataset."""
    if dataset.source != "mds":
        return None
    datasets = open_mds_datasets(dataset, key=key)
    if not all("tokens" in mds.columns for mds in datasets if len(mds)):
        return None
    bytes_dtype = str((dataset.extra or {}).get("token_encoding_type", "int64"))
    if dataset.remote:
        return token_rows(datasets, dataset, seq_len=dataset.max_seq_len or cfg.max_seq_len, bytes_dtype=bytes_dtype,
                          key=key)
    return TokenRows(datasets, seq_len=dataset.max_seq_len or cfg.max_seq_len, bytes_dtype=bytes_dtype, key=key)


def _pretokenized_tokenizer(cfg, dataset, cache_dir: str) -> Tokenizer:
    if cfg.tokenizer.name == "bpe:default":
        written = os.path.join(os.path.expanduser(dataset.local or "."), "tokenizer.json")
        hint = f" ({written} is the one `jaxtrain data prepare` wrote)" if os.path.isfile(written) else ""
        raise ConfigError(f"train_loader.dataset is pre-tokenized MDS, so tokenizer.name=bpe:default has no text to train "
                          f"on: set tokenizer.name to the tokenizer.json the dataset was tokenized with{hint}")
    return load_tokenizer(cfg.tokenizer, cache_dir=cache_dir)


def build_loaders(cfg, *, cache_dir: str, process_index: int = 0,
                  process_count: int = 1) -> tuple[BatchLoader, BatchLoader | None, Tokenizer]:
    """(train loader, eval loader or None, tokenizer) for a ``Config``.

    The tokenizer and the packed rows are cached under ``cache_dir``; a second call with the
    same inputs reads them back without training or tokenising. The eval loader has no global
    batch size: iterate it with ``batches(batch_size)``.
    """
    train_dataset = cfg.train_loader.dataset
    if not cfg.train_loader.drop_last:
        raise ConfigError("train_loader.drop_last=false is not supported: training batches have a fixed shape; set it to true")
    train_rows = _mds_token_rows(cfg, train_dataset, "train_loader.dataset")
    if train_rows is not None:
        tokenizer = _pretokenized_tokenizer(cfg, train_dataset, cache_dir)
    else:
        train_documents = documents_for(train_dataset, key="train_loader.dataset")
        tokenizer = load_tokenizer(
            cfg.tokenizer,
            cache_dir=cache_dir,
            train_texts=_capped_texts(train_documents, TOKENIZER_TRAIN_MAX_CHARS),
            train_fingerprint=f"{train_documents.fingerprint}:{TOKENIZER_TRAIN_MAX_CHARS}",
        )
        train_rows = _rows_for(cfg, train_dataset, train_documents, tokenizer, cache_dir, "train_loader.dataset")
    seed = cfg.seed if train_dataset.shuffle_seed is None else train_dataset.shuffle_seed
    train_rows, train_extra = _split_rows(train_rows)
    train_loader = BatchLoader(train_rows, global_batch_size=cfg.global_train_batch_size, seed=seed,
                               shuffle=train_dataset.shuffle, process_index=process_index,
                               process_count=process_count, pad_token_id=_pad_id(tokenizer), **train_extra)
    if cfg.eval_loader is None:
        return train_loader, None, tokenizer
    eval_dataset = cfg.eval_loader.dataset
    if eval_dataset.source == "python_stdlib" and eval_dataset.split == "train":
        raise ConfigError("eval_loader.dataset.split=train would evaluate on training data: set it to eval")
    eval_rows = _mds_token_rows(cfg, eval_dataset, "eval_loader.dataset")
    eval_name = f"mds:{eval_dataset.local}"
    if eval_rows is None:
        eval_documents = documents_for(eval_dataset, key="eval_loader.dataset")
        eval_rows, eval_name = _rows_for(cfg, eval_dataset, eval_documents, tokenizer, cache_dir,
                                         "eval_loader.dataset"), eval_documents.name
    eval_rows, eval_extra = _split_rows(eval_rows)
    if eval_rows.shape[0] == 0:
        raise ConfigError(f"eval_loader.dataset: {eval_name} has too few tokens for one sequence: add data")
    eval_loader = BatchLoader(eval_rows, global_batch_size=None, shuffle=False, process_index=process_index,
                              process_count=process_count, pad_token_id=_pad_id(tokenizer),
                              name="eval_loader", **eval_extra)
    return train_loader, eval_loader, tokenizer

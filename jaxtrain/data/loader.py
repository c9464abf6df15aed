"""Deterministic, resumable batch loaders over packed token rows.

A training epoch visits the rows in the order ``jaxtrain.data.order.SampleOrder`` gives: MosaicML
Streaming's stream mixing (proportion / repeat / choose) and shard-local shuffle (``py1e`` by
default), a pure function of (seed, epoch, shuffle algorithm, canonical nodes, block size,
streams). MDS rows keep their shards; packed rows from other sources are cut into pseudo-shards
of ``PSEUDO_SHARD_ROWS`` rows. Each global batch is the next ``global_batch_size`` rows of that
order, and process ``p`` of ``P`` takes rows ``[p * G/P, (p+1) * G/P)`` of it, so the order does
not depend on the process or device count. The position is (epoch, sample_in_epoch), stored with
the order parameters, so resuming from a saved state yields exactly the batches an uninterrupted
run would have, on any process count.

With ``num_workers`` > 0, background threads gather the next ``num_workers * prefetch_factor``
batches (from the memory-mapped or streamed shards) while the current one trains; the batches
are the same as without them, and ``state_dict`` still describes the next batch ``next()``
returns.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from jaxtrain.config.schema import ConfigError
from jaxtrain.data.finetune import IGNORE_INDEX
from jaxtrain.data.order import OrderParams, SampleOrder

# Each of train_loader.num_workers threads keeps prefetch_factor batches ready (PyTorch's
# default, 2, when unset).
DEFAULT_PREFETCH_FACTOR = 2
_MASK64 = (1 << 64) - 1


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64[...] (wrapping arithmetic)."""
    values = values + np.uint64(0x9E3779B97F4A7C15)
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """int64[num_rows]: a splitmix64 permutation of row indices, a pure function of its inputs.

    A shard-oblivious shuffle, independent of NumPy's generators; the loaders use ``SampleOrder``.
    """
    key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64(epoch & _MASK64))
    scores = _splitmix64(np.arange(num_rows, dtype=np.uint64) ^ key)
    return np.argsort(scores, kind="stable")


def document_ids(input_ids: np.ndarray, separator: int, *, starts_documents: bool) -> np.ndarray:
    """int32 document ids of packed rows ``[batch, length]``, as LLM Foundry's text loader derives them.

    Ids count the ``separator`` tokens seen along each row: a separator that ends a document (EOS,
    ``starts_documents`` false) still belongs to the document before it; one that starts a
    document (BOS) belongs to the new one. Attention is then kept within equal ids.
    """
    count = np.cumsum(input_ids == separator, axis=1, dtype=np.int32)
    if starts_documents:
        return count
    ids = np.zeros_like(count)
    ids[:, 1:] = count[:, :-1]
    return ids


class BatchLoader:
    """Batches of packed rows for one process: an endless shuffled stream, or one ordered pass.

    Iterating (``next(loader)``) yields ``{"input_ids": int32[local_batch, max_seq_len]}`` forever,
    epoch after epoch, dropping each epoch's last incomplete global batch. ``batches(n)`` is one
    in-order pass over every row for evaluation (see its doc). Given ``labels`` and
    ``sequence_id`` (same shape as ``rows``), batches carry the matching rows of them too. Given
    ``separator`` instead, ``(token id, starts_documents)``, batches carry the ``sequence_id``
    ``document_ids`` derives from each row's tokens (documents packed into text rows).

    ``order`` is the epoch order (a ``SampleOrder`` over the rows' shards and streams); without
    it the rows form one stream of pseudo-shards shuffled with ``py1e`` under ``seed`` (or kept in
    order when ``shuffle`` is false). ``num_workers`` background threads prefetch
    ``prefetch_factor`` batches each; 0 gathers each batch when it is asked for.
    """

    def __init__(self, rows: np.ndarray, *, global_batch_size: int | None, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, pad_token_id: int = 0, name: str = "train_loader",
                 labels: np.ndarray | None = None, sequence_id: np.ndarray | None = None,
                 separator: tuple[int, bool] | None = None, order: SampleOrder | None = None,
                 num_workers: int = 0, prefetch_factor: int | None = None):
        if rows.ndim != 2:
            raise ValueError(f"{name}: rows must be [num_rows, max_seq_len], got shape {rows.shape}")
        for extra, extra_name in ((labels, "labels"), (sequence_id, "sequence_id")):
            if extra is not None and extra.shape != rows.shape:
                raise ValueError(f"{name}: {extra_name} shape {extra.shape} differs from rows shape {rows.shape}")
        if separator is not None and sequence_id is not None:
            raise ValueError(f"{name}: rows with sequence ids take no document separator")
        self.labels = labels
        self.sequence_id = sequence_id
        self.separator = separator
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
        self.rows = rows
        self.name = name
        self.process_index = process_index
        self.process_count = process_count
        self.pad_token_id = pad_token_id
        self.global_batch_size = global_batch_size
        if order is None:
            order = SampleOrder.over_rows(int(rows.shape[0]), seed=seed, shuffle_algo="py1e" if shuffle else "none")
        if order.num_rows != int(rows.shape[0]):
            raise ValueError(f"{name}: the sample order covers {order.num_rows} rows but there are {rows.shape[0]}")
        self._order = order
        if num_workers < 0 or (prefetch_factor is not None and prefetch_factor < 1):
            raise ConfigError(f"{name}.num_workers={num_workers} / prefetch_factor={prefetch_factor}: num_workers must "
                              f"be >= 0 and prefetch_factor >= 1 (or unset)")
        self.num_workers = int(num_workers)
        self.prefetch_factor = int(prefetch_factor or DEFAULT_PREFETCH_FACTOR)
        # Set by the trainer to the model's vocabulary: a token id outside it (pre-tokenized data
        # from another tokenizer) is an error naming the row, not an embedding of NaN.
        self.vocab_size: int | None = None
        if global_batch_size is not None:
            self._check_batch_size(global_batch_size, "global_train_batch_size")
            if global_batch_size > self.epoch_size:
                what = "the dataset has" if self.epoch_size == self.num_sequences else "an epoch of the stream mix has"
                # fine-tuning rows hold one example each (or a packed few): a shorter max_seq_len makes no more
                shorter = "" if labels is not None else " or max_seq_len"
                raise ConfigError(
                    f"{name}: {what} {self.epoch_size} sequences of {self.max_seq_len} tokens, fewer than "
                    f"one global batch of {global_batch_size}: lower global_train_batch_size{shorter}, or add data"
                )
        self._epoch = 0
        self._sample_in_epoch = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending: collections.deque[tuple[tuple[int, int], Future]] = collections.deque()
        self._produced: tuple[int, int] = (0, 0)

    def _check_batch_size(self, batch_size: int, key: str) -> None:
        if batch_size < 1 or batch_size % self.process_count:
            raise ConfigError(f"{key}={batch_size} must be a positive multiple of the process count ({self.process_count})")

    @property
    def seed(self) -> int:
        return self._order.params.shuffle_seed

    @property
    def shuffle(self) -> bool:
        return self._order.params.shuffle_algo != "none"

    @property
    def order_params(self) -> OrderParams:
        """The shuffle algorithm, canonical nodes, block size and seed in use."""
        return self._order.params

    @property
    def num_sequences(self) -> int:
        return int(self.rows.shape[0])

    @property
    def epoch_size(self) -> int:
        """Rows per epoch: every row once, or what the streams' proportion/repeat/choose make of them."""
        return self._order.epoch_size

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
        return self.epoch_size // self._global()

    @property
    def num_tokens_per_batch(self) -> int:
        """Tokens in one global batch (all processes together)."""
        return self._global() * self.max_seq_len

    def _global(self) -> int:
        if self.global_batch_size is None:
            raise ValueError(f"{self.name} has no global batch size: iterate it with batches(batch_size)")
        return self.global_batch_size

    def order(self, epoch: int) -> np.ndarray:
        """int64[epoch_size]: the rows of ``epoch`` in order (cached; all rows in order when shuffle is off)."""
        return self._order(epoch)

    def _rolled(self, epoch: int, sample_in_epoch: int) -> tuple[int, int]:
        if sample_in_epoch + self._global() > self.epoch_size:
            return epoch + 1, 0
        return epoch, sample_in_epoch

    def _after(self, position: tuple[int, int]) -> tuple[int, int]:
        """The position of the batch after the one at ``position``."""
        return self._rolled(position[0], position[1] + self._global())

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        position = self._rolled(self._epoch, self._sample_in_epoch)
        if self.num_workers == 0:
            batch = self._batch_at(position)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix=f"{self.name}-prefetch")
            if not self._pending:
                self._produced = position
            while len(self._pending) < self.num_workers * self.prefetch_factor:
                self._pending.append((self._produced, self._pool.submit(self._batch_at, self._produced)))
                self._produced = self._after(self._produced)
            produced_at, future = self._pending.popleft()
            try:
                batch = future.result()
            except BaseException:
                self._drop_pending()  # the next call starts again from this same position
                raise
            assert produced_at == position, (produced_at, position)
        self._epoch, self._sample_in_epoch = self._after(position)
        return batch

    def global_batch_rows(self, position: tuple[int, int]) -> np.ndarray:
        """The row indices of the whole global batch drawn at ``position`` ((epoch, sample_in_epoch),
        as ``state_dict`` gives it; an epoch's incomplete last batch is skipped, as drawing does)."""
        epoch, sample_in_epoch = self._rolled(*position)
        return self.order(epoch)[sample_in_epoch : sample_in_epoch + self._global()]

    def _batch_at(self, position: tuple[int, int]) -> dict[str, np.ndarray]:
        """This process's slice of the global batch at ``position`` (runs on a worker when prefetching)."""
        start = self.process_index * self.local_batch_size
        indices = self.global_batch_rows(position)[start : start + self.local_batch_size]
        prefetch = getattr(self.rows, "prefetch", None)
        if prefetch is not None:  # streamed rows: fetch the next batches' shards while this one trains
            ahead_epoch, ahead_sample = self._after(position)
            ahead = ahead_sample + self.process_index * self.local_batch_size
            prefetch(self.order(ahead_epoch)[ahead : ahead + self.rows.predownload])
        batch = {"input_ids": np.asarray(self.rows[indices], dtype=np.int32)}
        self._check_ids(batch["input_ids"], indices)
        if self.labels is not None:
            batch["labels"] = np.asarray(self.labels[indices], dtype=np.int32)
        if self.sequence_id is not None:
            batch["sequence_id"] = np.asarray(self.sequence_id[indices], dtype=np.int32)
        self._add_document_ids(batch)
        return batch

    def _add_document_ids(self, batch: dict[str, np.ndarray]) -> None:
        if self.separator is not None:
            token_id, starts_documents = self.separator
            batch["sequence_id"] = document_ids(batch["input_ids"], token_id, starts_documents=starts_documents)

    def _check_ids(self, ids: np.ndarray, rows: np.ndarray) -> None:
        if self.vocab_size is None or not ids.size:
            return
        if ids.min() >= 0 and ids.max() < self.vocab_size:
            return
        bad = np.argwhere((ids < 0) | (ids >= self.vocab_size))[0]
        row = int(rows[bad[0]])
        where = getattr(self.rows, "where", None)
        at = f"row {row} ({where(row)})" if where is not None else f"row {row}"
        raise ConfigError(f"{self.name}: {at} holds token id {int(ids[tuple(bad)])}, outside "
                          f"model.vocab_size {self.vocab_size}: the data was tokenized with another tokenizer; set "
                          f"tokenizer.name to the one it was made with and model.vocab_size to at least its size")

    def _drop_pending(self) -> None:
        for _, future in self._pending:
            future.cancel()
        for _, future in self._pending:
            if not future.cancelled():
                try:
                    future.result()
                except BaseException:
                    pass
        self._pending.clear()

    def state_dict(self) -> dict:
        """The position of the next batch ``next()`` returns, and the order it is a position in.

        ``{"epoch", "sample_in_epoch"}`` (global samples), then ``shuffle_algo``,
        ``num_canonical_nodes``, ``shuffle_block_size`` and ``shuffle_seed``.
        """
        return {"epoch": self._epoch, "sample_in_epoch": self._sample_in_epoch, **self._order.params.as_dict()}

    def close(self) -> None:
        """Stop the prefetch threads and release what the rows hold (a streamed dataset's local cache)."""
        if self._pool is not None:
            self._drop_pending()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        close = getattr(self.rows, "close", None)
        if close is not None:
            close()

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from ``state_dict``): the next batch is the one that was next then.

        The order parameters stored in ``state`` win over the configured ones (a resume keeps its
        order, e.g. when the default or the config changed); a note says so when they differ.
        States without them (written before they were stored) keep the configured order.
        """
        try:
            epoch, sample_in_epoch = int(state["epoch"]), int(state["sample_in_epoch"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{self.name}: loader state {state!r} needs integer 'epoch' and 'sample_in_epoch'") from None
        current = self._order.params.as_dict()
        stored = {key: state[key] for key in current if key in state}
        if stored and stored != {key: current[key] for key in stored}:
            params = OrderParams(**{**current, **stored})
            changed = ", ".join(f"{key}={stored[key]!r} (configured {current[key]!r})" for key in stored
                                if stored[key] != current[key])
            self._order = self._order.with_params(params)
            if self.process_index == 0:
                print(f"{self.name}: resuming in the checkpoint's data order: {changed}", file=sys.stderr, flush=True)
        if epoch < 0 or not 0 <= sample_in_epoch <= self.epoch_size:
            raise ValueError(
                f"{self.name}: loader state epoch={epoch}, sample_in_epoch={sample_in_epoch} does not fit an epoch of "
                f"{self.epoch_size} sequences; the data changed since the checkpoint was written"
            )
        self._drop_pending()
        self._epoch, self._sample_in_epoch = self._rolled(epoch, sample_in_epoch)

    def num_batches(self, batch_size: int, *, drop_last: bool = False) -> int:
        """How many batches ``batches(batch_size, drop_last=...)`` yields (the last one may be padded)."""
        return self.num_sequences // batch_size if drop_last else -(-self.num_sequences // batch_size)

    def batches(self, batch_size: int, *, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """One in-order pass over every row, ``batch_size`` rows per global batch, this process's slice.

        Yields ``{"input_ids": int32[local, max_seq_len], "labels": int32[local, max_seq_len]}``
        with ``local = batch_size / process_count``. ``labels`` are the input ids (shifted by the
        loss, as in LLM Foundry); the last global batch is filled up with rows of ``pad_token_id``
        whose labels are all ``IGNORE_INDEX`` (-100), so they add nothing to the loss or the token
        count. Every batch has the same shape, so one compiled step serves all. ``drop_last``: the
        last global batch is left out instead when it would be incomplete.
        """
        self._check_batch_size(batch_size, f"{self.name} eval batch size")
        local = batch_size // self.process_count
        for global_start in range(0, self.num_batches(batch_size, drop_last=drop_last) * batch_size, batch_size):
            start = global_start + self.process_index * local
            real = self.rows[start : min(start + local, self.num_sequences)]
            self._check_ids(np.asarray(real), np.arange(start, start + len(real)))
            input_ids = np.full((local, self.max_seq_len), self.pad_token_id, dtype=np.int32)
            labels = np.full((local, self.max_seq_len), IGNORE_INDEX, dtype=np.int32)
            input_ids[: len(real)] = real
            labels[: len(real)] = real if self.labels is None else self.labels[start : start + len(real)]
            batch = {"input_ids": input_ids, "labels": labels}
            if self.sequence_id is not None:
                batch["sequence_id"] = np.zeros((local, self.max_seq_len), dtype=np.int32)
                batch["sequence_id"][: len(real)] = self.sequence_id[start : start + len(real)]
            self._add_document_ids(batch)
            yield batch

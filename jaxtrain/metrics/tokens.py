"""Tokens of a training batch as LLM Foundry counts them: every token but padding.

Foundry's ``get_num_tokens_in_batch`` sums the attention mask, and Composer's token timestamp and
its SpeedMonitor's ``throughput/tokens_per_sec`` use that count (FLOPs and MFU still take the
padded length). Packed text rows have no padding: each counts ``max_seq_len``. Fine-tuning rows
(``jaxtrain.data.finetune.build_rows``) carry ``labels`` and ``sequence_id``: their examples start
at position 0 with sequence ids 0, 1, ..., and the padding after them has one more id. Every
placed example keeps a trained label (an example without one within ``max_seq_len`` is dropped;
a packed example loses only its first label, and its last token, the response's end, is trained),
so the last segment of a row is padding exactly when none of its labels is trained; a row whose
last segment is an example has no padding. Eval batches filled up with padding rows (all labels
ignored) count nothing for those rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxtrain.data.finetune import IGNORE_INDEX

_CHUNK_ROWS = 8192  # rows counted at once, bounding the masks' memory on a whole dataset


def row_tokens(labels: np.ndarray, sequence_id: np.ndarray) -> np.ndarray:
    """int64[rows]: the non-padding tokens of each fine-tuning row (see the module doc)."""
    labels, sequence_id = np.asarray(labels), np.asarray(sequence_id)
    if labels.shape != sequence_id.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and sequence_id {sequence_id.shape} must be the same [rows, seq_len]")
    counts = np.empty(labels.shape[0], np.int64)
    for start in range(0, labels.shape[0], _CHUNK_ROWS):
        ids, targets = sequence_id[start : start + _CHUNK_ROWS], labels[start : start + _CHUNK_ROWS]
        last = ids == ids[:, -1:]  # the row's last segment (ids only grow along a row)
        padding = ~((targets != IGNORE_INDEX) & last).any(axis=1)
        counts[start : start + len(ids)] = ids.shape[1] - np.where(padding, last.sum(axis=1), 0)
    return counts


def batch_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Non-padding tokens of a host batch (``input_ids``, with ``labels`` and ``sequence_id`` for
    fine-tuning rows); a batch without both holds packed rows, all of whose tokens count."""
    if "labels" in batch and "sequence_id" in batch:
        return int(row_tokens(batch["labels"], batch["sequence_id"]).sum())
    return int(np.asarray(batch["input_ids"]).size)


def data_position(loader_state: Mapping) -> tuple[int, int]:
    """(epoch, sample in epoch) of a loader's ``state_dict()``: where its next batch is in the data
    order (the order's parameters are fixed per run); what ``TrainTokens.count`` takes."""
    return int(loader_state["epoch"]), int(loader_state["sample_in_epoch"])


class TrainTokens:
    """The non-padding tokens of each global training batch of a ``BatchLoader``, counted on the host.

    ``count(local_batch, position)``: ``local_batch`` is this process's numpy batch and
    ``position`` the loader's ``(epoch, sample_in_epoch)`` before it was drawn. Batches of packed
    rows (no ``labels`` and ``sequence_id``) count ``tokens_per_batch``. One process counts its
    batch. With several, each holds every row, so each counts the whole global batch from the
    loader's arrays at that position (the rows all processes draw there), with no communication.
    """

    def __init__(self, loader, tokens_per_batch: int):
        self.loader = loader
        self.tokens_per_batch = int(tokens_per_batch)
        self.padded = getattr(loader, "labels", None) is not None and getattr(loader, "sequence_id", None) is not None
        self._rows: np.ndarray | None = None  # each row's count, for several processes

    def count(self, local_batch: Mapping[str, np.ndarray], position: tuple[int, int]) -> int:
        loader = self.loader
        if not self.padded:
            return self.tokens_per_batch
        if loader.process_count == 1:
            return batch_tokens(local_batch)
        if self._rows is None:
            self._rows = row_tokens(loader.labels, loader.sequence_id)
        return int(self._rows[loader.global_batch_rows(position)].sum())

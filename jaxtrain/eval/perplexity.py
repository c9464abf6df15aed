"""Scoring text under a model: the perplexity of a dataset, and the loss of token spans.

Both run one compiled forward per (batch, length) shape. Rows are right-padded to a length
bucket (a power of two, at least 16, at most the model's ``max_seq_len``) and batches are
filled up to a fixed size with fully ignored rows, so a whole evaluation compiles a handful of
programs at most.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain.data.loader import document_ids
from jaxtrain.layers.lm_loss import fused_for_evaluation
from jaxtrain.train.loss import IGNORE_INDEX, shift_labels

MIN_BUCKET = 16


def length_bucket(length: int, limit: int) -> int:
    """The padded length for a row of ``length`` tokens: the next power of two (>= 16), capped at ``limit``."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, limit)


@dataclasses.dataclass(frozen=True)
class SpanScore:
    """A continuation's summed cross-entropy (nats), its token count, and whether every token was the argmax."""

    loss_sum: float
    num_tokens: int
    all_argmax: bool

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.num_tokens, 1)


# Module-level programs with the model's structure as a static argument: a model of the same
# structure (the next evaluation during training, another task) reuses the compiled program
# for each (batch, length) shape instead of compiling it again.
@functools.partial(jax.jit, static_argnames=("graphdef", "compute_dtype"))
def _span_scores(params, input_ids, targets, *, graphdef, compute_dtype):
    """Per row: summed cross-entropy of the target tokens, their count, and whether each was the argmax."""
    logits = nnx.merge(graphdef, params)(input_ids, compute_dtype=compute_dtype)
    valid = targets != IGNORE_INDEX
    safe_targets = jnp.where(valid, targets, 0)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
    token_loss = jnp.where(valid, log_z - target_logit, 0.0)
    hit = (jnp.argmax(logits, axis=-1) == safe_targets) | ~valid
    return token_loss.sum(axis=1), valid.sum(axis=1), hit.all(axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "compute_dtype"))
def _loss_sums(params, input_ids, labels, sequence_id, *, graphdef, compute_dtype):
    """Summed cross-entropy of a batch's labels and their count (the model's loss, in sequence
    chunks on the CPU: ``lm_loss.fused_for_evaluation``)."""
    model = nnx.merge(graphdef, params)
    loss_sum, _, count = model.lm_loss(input_ids, shift_labels(labels), compute_dtype=compute_dtype,
                                       sequence_id=sequence_id, fused=fused_for_evaluation(compute_dtype))
    return loss_sum, count


def program_signature(model: nnx.Module) -> tuple:
    """What, besides the input shapes, decides which compiled program a model's forward reuses:
    its structure and its parameters' shapes and dtypes."""
    graphdef, params = nnx.split(model)
    return graphdef, tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in jax.tree.leaves(params))


_scored_shapes: set = set()  # (program signature, compute dtype, batch, length) run in this process


class SpanScorer:
    """Scores the last tokens of token sequences: ``score([(tokens, span_start), ...])``.

    ``tokens[span_start:]`` is the span (a continuation or a choice); every span token is predicted
    from the tokens before it, exactly as in a plain forward pass over ``tokens``.
    """

    def __init__(self, model: nnx.Module, *, batch_size: int = 8, compute_dtype=jnp.float32,
                 max_len: int | None = None, pad_token_id: int = 0):
        self.batch_size = batch_size
        self.max_len = min(max_len or model.max_seq_len, model.max_seq_len)
        self.pad_token_id = pad_token_id
        self.graphdef, self.params = nnx.split(model)
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.signature = (program_signature(model), self.compute_dtype, batch_size)

    def score(self, requests: Sequence[tuple[Sequence[int], int]], *, on_batch: Callable[[], None] | None = None,
              on_compile: Callable[[], None] | None = None) -> list[SpanScore]:
        """One ``SpanScore`` per ``(tokens, span_start)``; ``0 < span_start < len(tokens) <= max_len``.

        One batch runs while the next is prepared. ``on_batch()`` is called once per batch, after
        it has finished computing; ``on_compile()`` before a batch of a (batch, length) shape this
        process has not run yet, whose program compiles first (the batch before it has finished)."""
        results: list[SpanScore] = []
        pending = None  # (device outputs, rows) of the batch in flight

        def finish():
            loss_sum, count, all_argmax = jax.device_get(pending[0])
            results.extend(SpanScore(float(loss_sum[row]), int(count[row]), bool(all_argmax[row]))
                           for row in range(pending[1]))
            if on_batch is not None:
                on_batch()

        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            length = length_bucket(max(len(tokens) for tokens, _ in chunk), self.max_len)
            input_ids = np.full((self.batch_size, length), self.pad_token_id, np.int32)
            targets = np.full((self.batch_size, length), IGNORE_INDEX, np.int32)
            for row, (tokens, span_start) in enumerate(chunk):
                if not 0 < span_start < len(tokens) <= length:
                    raise ValueError(f"span [{span_start}, {len(tokens)}) does not fit a row of {length} tokens")
                input_ids[row, : len(tokens)] = tokens
                # position t predicts token t + 1: the span's tokens are targets at span_start-1 .. len-2
                targets[row, span_start - 1 : len(tokens) - 1] = tokens[span_start:]
            shape = (self.signature, length)
            if shape not in _scored_shapes and on_compile is not None:
                if pending is not None:
                    finish()
                    pending = None
                on_compile()
            outputs = _span_scores(self.params, input_ids, targets, graphdef=self.graphdef,
                                   compute_dtype=self.compute_dtype)
            _scored_shapes.add(shape)
            if pending is not None:
                finish()
            pending = (outputs, len(chunk))
        if pending is not None:
            finish()
        return results


def text_batches(token_lists: Iterable[Sequence[int]], *, seq_len: int, batch_size: int, eos_token_id: int | None,
                 pad_token_id: int = 0, separate_documents: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Documents joined (each followed by ``eos_token_id``) and cut into rows of ``seq_len``.

    Yields ``{"input_ids", "labels"}`` int32 ``[batch_size, seq_len]``; the last row and the last
    batch are padded with labels ``IGNORE_INDEX``. Labels are unshifted (the loss shifts them).
    ``separate_documents`` (a model trained with ``attn_uses_sequence_id``) adds each row's
    ``sequence_id``, split after each EOS as the training loader splits it.
    """
    stream: list[int] = []
    for tokens in token_lists:
        stream.extend(tokens)
        if eos_token_id is not None:
            stream.append(eos_token_id)
    rows = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    rows = [row for row in rows if len(row) > 1]  # a one-token row predicts nothing
    for start in range(0, len(rows), batch_size):
        input_ids = np.full((batch_size, seq_len), pad_token_id, np.int32)
        labels = np.full((batch_size, seq_len), IGNORE_INDEX, np.int32)
        for index, row in enumerate(rows[start : start + batch_size]):
            input_ids[index, : len(row)] = row
            labels[index, : len(row)] = row
        batch = {"input_ids": input_ids, "labels": labels}
        if separate_documents and eos_token_id is not None:
            batch["sequence_id"] = document_ids(input_ids, eos_token_id, starts_documents=False)
        yield batch


def perplexity(model: nnx.Module, batches: Iterable[dict[str, np.ndarray]], *, compute_dtype=jnp.float32) -> dict:
    """Token-mean cross-entropy over ``batches`` (``input_ids`` and unshifted ``labels``, -100 ignored).

    Returns ``{"cross_entropy": nats per token, "perplexity": exp of it, "tokens": count}``.
    """
    graphdef, params = nnx.split(model)
    total_loss, total_tokens = 0.0, 0.0
    for batch in batches:
        loss_sum, count = jax.device_get(_loss_sums(params, batch["input_ids"], batch["labels"], batch.get("sequence_id"),
                                                    graphdef=graphdef, compute_dtype=jnp.dtype(compute_dtype)))
        total_loss += float(loss_sum)
        total_tokens += float(count)
    if total_tokens == 0:
        raise ValueError("the perplexity data has no tokens to predict (each row needs at least two tokens)")
    cross_entropy = total_loss / total_tokens
    return {"cross_entropy": cross_entropy, "perplexity": math.exp(min(cross_entropy, 700.0)),
            "tokens": int(total_tokens)}

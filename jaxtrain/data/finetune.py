"""Instruction fine-tuning data: JSONL lines ``{"prompt": ..., "response": ...}``.

Each example is ``prompt tokens + response tokens + EOS``; the loss counts the response and its
EOS only: ``labels`` are -100 on prompt tokens and padding (labels are unshifted; the train step
predicts ``labels[t + 1]`` at ``t``, so the last prompt token learns the first response token).

Rows are packed when that cannot leak between examples: the model masks attention by
``sequence_id`` (``attn_config.attn_uses_sequence_id: true``) and positions are relative (ALiBi,
or no learned positions). Then examples are placed in order, a new row started whenever the next
one does not fit, and each example in a row gets its own ``sequence_id`` (padding gets one more).
Otherwise every example gets a row of its own, padded. An example longer than a row keeps its
prompt and loses the end of its response; one whose prompt alone fills the row is skipped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import numpy as np

from jaxtrain.config.schema import ConfigError
from jaxtrain.data.sources import JSONL_SUFFIXES, Documents, fingerprint_files, resolve_files

# The label of tokens never trained on (prompts, padding rows): LLM Foundry's and PyTorch's ignored target.
IGNORE_INDEX = -100
SOURCE = "finetune_jsonl"


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    where: str  # "path:line"


@dataclasses.dataclass
class FinetuneRows:
    """int32 ``[num_rows, max_seq_len]`` arrays, and how many examples were placed and skipped."""

    input_ids: np.ndarray
    labels: np.ndarray
    sequence_id: np.ndarray
    num_examples: int
    num_skipped: int
    packed: bool


def read_examples(paths: list[str], *, prompt_field: str = "prompt", response_field: str = "response") -> list[Example]:
    """Every line of every file, in order; a bad line names ``path:line`` and the field."""
    examples = []
    for path in paths:
        with open(path, "rb") as handle:  # decoded line by line, so a non-UTF-8 line is named too
            for line_number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ConfigError(f"{path}:{line_number} is not UTF-8 text ({error.reason}): fix or remove "
                                      f"that line") from None
                if line.strip():
                    examples.append(_example(path, line_number, line, prompt_field, response_field))
    return examples


def _example(path: str, line_number: int, line: str, prompt_field: str, response_field: str) -> Example:
    """One JSONL line as an ``Example``; a bad line is a one-line error naming ``path:line``."""
    where = f"{path}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where} is not valid JSON ({error.msg}): fix or remove that line") from None
    for field in (prompt_field, response_field):
        if not isinstance(record, dict) or field not in record:
            raise ConfigError(f"{where} has no field {field!r} (fine-tuning lines are "
                              f'{{"{prompt_field}": ..., "{response_field}": ...}}): fix or remove that line')
        if not isinstance(record[field], str):
            raise ConfigError(f"{where} field {field!r} is {type(record[field]).__name__}, not a string: "
                              f"fix or remove that line")
    return Example(record[prompt_field], record[response_field], where)


def finetune_documents(local: str | None, split: str, *, key: str) -> tuple[Documents, list[str]]:
    """The files of a fine-tuning dataset, as ``Documents`` of prompt + response texts (to train a tokenizer)."""
    paths = resolve_files(local, split, JSONL_SUFFIXES, key)

    def texts() -> Iterator[str]:
        for example in read_examples(paths):
            yield example.prompt + example.response

    return Documents(f"{SOURCE}:{local}", fingerprint_files(paths, SOURCE), texts, len(paths)), paths


def example_tokens(tokenizer, example: Example, eos_token_id: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example: labels are IGNORE_INDEX on the prompt."""
    prompt = tokenizer.encode(example.prompt)
    if not prompt:
        raise ConfigError(f"{example.where}: the prompt is empty; each example needs a prompt "
                          "(its tokens keep examples apart in the loss)")
    response = tokenizer.encode(example.response) + [eos_token_id]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def build_rows(tokenized: list[tuple[list[int], list[int]]], *, max_seq_len: int, pad_token_id: int,
               pack: bool) -> FinetuneRows:
    """Place tokenized examples ``(ids, labels)`` into rows (see the module doc)."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = max_seq_len  # tokens in the current row; start with "full" so the first example opens a row
    skipped = 0
    for ids, labels in tokenized:
        if labels[:max_seq_len].count(IGNORE_INDEX) == min(len(ids), max_seq_len):
            skipped += 1  # nothing of the response fits
            continue
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if not pack or used + len(ids) > max_seq_len:
            rows.append([])
            used = 0
        rows[-1].append((ids, labels))
        used += len(ids)
    if not rows:
        raise ConfigError(f"no fine-tuning example has a response token within max_seq_len={max_seq_len}")
    input_ids = np.full((len(rows), max_seq_len), pad_token_id, np.int32)
    label_array = np.full((len(rows), max_seq_len), IGNORE_INDEX, np.int32)
    sequence_id = np.zeros((len(rows), max_seq_len), np.int32)
    for row, examples in enumerate(rows):
        start = 0
        for index, (ids, labels) in enumerate(examples):
            input_ids[row, start : start + len(ids)] = ids
            label_array[row, start : start + len(ids)] = labels
            sequence_id[row, start : start + len(ids)] = index
            start += len(ids)
        sequence_id[row, start:] = len(examples)  # padding is a segment of its own
    return FinetuneRows(input_ids, label_array, sequence_id, len(tokenized) - skipped, skipped, pack)


def can_pack(model_cfg) -> bool:
    """Whether packed examples stay apart in this model: sequence-id masking and relative positions."""
    attn = model_cfg.attn_config
    return bool(attn.attn_uses_sequence_id and (attn.alibi or not model_cfg.learned_pos_emb))


def finetune_rows(cfg, dataset, tokenizer, *, key: str) -> FinetuneRows:
    """The rows of a ``source: finetune_jsonl`` dataset for the run ``cfg``."""
    if dataset.remote:
        raise ConfigError(f"{key}.remote is set, but {SOURCE} reads local files only: unset it")
    eos_token_id = dataset.eos_token_id if dataset.eos_token_id is not None else tokenizer.eos_token_id
    if eos_token_id is None:
        raise ConfigError(f"{key}.eos_token_id is unset and the tokenizer has no EOS token: set one of them")
    paths = resolve_files(dataset.local, dataset.split, JSONL_SUFFIXES, key)[: dataset.max_files]
    examples = read_examples(paths)
    if not examples:
        raise ConfigError(f"{key}.local={dataset.local!r} holds no fine-tuning examples")
    tokenized = [example_tokens(tokenizer, example, eos_token_id) for example in examples]
    pad_token_id = 0 if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    return build_rows(tokenized, max_seq_len=dataset.max_seq_len or cfg.max_seq_len, pad_token_id=pad_token_id,
                      pack=can_pack(cfg.model))

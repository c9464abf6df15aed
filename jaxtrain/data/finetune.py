"""Instruction fine-tuning data in LLM Foundry's two formats, one JSON object per line (a ``.json``
file may instead hold one JSON array of them):

- ``{"prompt": ..., "response": ...}`` (``"completion"`` may name the response). Prompt and
  response are tokenized separately, each with the tokenizer's own special tokens (a tokenizer
  that adds a BOS adds it to the prompt; the response's is removed).
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation, cut by a chat template
  into one (prompt, response) turn per assistant message (``jaxtrain.data.chat``).

Other keys on a line are ignored. An example is its turns laid end to end, and EOS is appended
to the last response unless it already ends with one. ``labels`` are the input ids where the
loss counts and -100 elsewhere (unshifted: the train step predicts ``labels[t + 1]`` at ``t``).
Which tokens count follows Foundry's ``target_responses`` (``last``, the default: the last
response only; ``all``) and ``target_prompts`` (``none``, the default; ``all``; ``length>=N``:
the prompts of at least N tokens).

An example longer than ``max_seq_len`` loses its end. One with an empty prompt or response, or
with no counted token left within ``max_seq_len``, is dropped, with a notice of how many.

Each example gets a row of its own, padded, unless ``packing_ratio`` is set (a number >= 1 or
``auto``, as in Foundry). Then examples are placed in order, and a new row is started whenever
the next one does not fit or, for a number, when the rows so far already hold ``packing_ratio``
examples each on average (``auto``: as many as fit). Each example in a row gets its own
``sequence_id`` (padding one more), which the model's attention keeps apart
(``attn_config.attn_uses_sequence_id: true`` is required). The first label of every example
after the first in a row is -100, so no example learns from the one before it. Positions are not
restarted within a row, as in Foundry's MPT (ALiBi is relative, so packed examples see the same
biases as alone). ``allow_pad_trimming`` and ``pad_to_longest`` change no result: rows always have
``max_seq_len`` tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterator

import numpy as np

from jaxtrain.config.schema import ConfigError
from jaxtrain.config.validate import FINETUNE_OPTIONS
from jaxtrain.data.chat import ChatTemplate, Messages, chat_template, chat_turns, validate_messages
from jaxtrain.data.sources import JSONL_SUFFIXES, Documents, fingerprint_files, resolve_files

# The label of tokens never trained on (prompts, padding rows): LLM Foundry's and PyTorch's ignored target.
IGNORE_INDEX = -100
SOURCE = "finetune_jsonl"
RESPONSE_KEYS = ("response", "completion")
_LINES = ('fine-tuning lines are {"prompt": ..., "response": ...} or '
          '{"messages": [{"role": ..., "content": ...}, ...]}')

Turns = list[tuple[list[int], list[int]]]  # (prompt ids, response ids) of each turn


@dataclasses.dataclass(frozen=True)
class Example:
    """One line: a prompt and a response, or a conversation's (role, content) messages."""

    where: str  # "path:line"
    prompt: str | None = None
    response: str | None = None
    messages: Messages | None = None


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """Foundry's finetuning dataset options that change the data."""

    target_prompts: str = "none"
    target_responses: str = "last"
    packing_ratio: float | None = None  # None: no packing; math.inf: auto


@dataclasses.dataclass
class FinetuneRows:
    """int32 ``[num_rows, max_seq_len]`` arrays, and how many examples were placed, dropped and truncated."""

    input_ids: np.ndarray
    labels: np.ndarray
    sequence_id: np.ndarray
    num_examples: int
    num_skipped: int
    packed: bool
    num_truncated: int = 0


def read_examples(paths: list[str]) -> list[Example]:
    """Every example of every file, in order; a bad line is a one-line error naming ``path:line``.
    Empty files hold no examples; they are an error only when no file holds one."""
    examples, empty = [], []
    for path in paths:
        with open(path, "rb") as handle:
            data = handle.read()
        data = data.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark (some editors write one) is not text
        if not data.strip():
            empty.append(path)
            continue
        if data.lstrip()[:1] == b"[":
            examples += [_example(f"{path}:{line}", record) for line, record in _json_array(path, data)]
            continue
        for line_number, raw in enumerate(data.splitlines(), start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ConfigError(f"{where} is not UTF-8 text ({error.reason}): fix or remove that line") from None
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{where} is not valid JSON ({error.msg}): fix or remove that line") from None
                examples.append(_example(where, record))
    if empty and not examples:
        others = f" (and so are {len(empty) - 1} more files)" if len(empty) > 1 else ""
        raise ConfigError(f"{empty[0]} is empty{others}: write one example per line ({_LINES})")
    return examples


def _json_array(path: str, data: bytes) -> Iterator[tuple[int, object]]:
    """(line number, item) of a file holding one JSON array, as Hugging Face's json loader reads it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text ({error.reason}): convert it") from None
    decoder, position = json.JSONDecoder(), text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position < len(text) and text[position] == "]":
            return
        line = text.count("\n", 0, position) + 1
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{error.lineno} is not valid JSON ({error.msg}): fix that line") from None
        yield line, item


def _example(where: str, record) -> Example:
    """One JSON object as an ``Example``; a bad one is a one-line error naming ``where``."""
    if not isinstance(record, dict):
        kind = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(record), "null")
        raise ConfigError(f"{where} is a JSON {kind}, not an object ({_LINES}): fix or remove that line")
    has_prompt = "prompt" in record or any(key in record for key in RESPONSE_KEYS)
    if "messages" in record:
        if has_prompt:
            raise ConfigError(f"{where} has both 'messages' and prompt/response fields; an example is one or the "
                              f"other: fix or remove that line")
        return Example(where, messages=validate_messages(record["messages"], where))
    if not has_prompt:
        found = ", ".join(repr(key) for key in record) or "no keys"
        hint = " ('turns' holds Foundry's pre-tokenized turns; give the conversation as 'messages')" \
            if "turns" in record else ""
        raise ConfigError(f"{where} has neither 'prompt'/'response' nor 'messages' ({found}){hint}; {_LINES}: "
                          f"fix or remove that line")
    responses = [key for key in RESPONSE_KEYS if key in record]
    if len(responses) > 1:
        raise ConfigError(f"{where} has both 'response' and 'completion'; keep one: fix or remove that line")
    for field in ("prompt", responses[0] if responses else "response"):
        if field not in record:
            raise ConfigError(f"{where} has no field {field!r} ({_LINES}): fix or remove that line")
        if not isinstance(record[field], str):
            raise ConfigError(f"{where} field {field!r} is {type(record[field]).__name__}, not a string: "
                              f"fix or remove that line")
    return Example(where, prompt=record["prompt"], response=record[responses[0]])


def finetune_documents(local: str | None, split: str, *, key: str) -> tuple[Documents, list[str]]:
    """The files of a fine-tuning dataset, as ``Documents`` of each example's text (to train a tokenizer);
    conversations are rendered with the default chat template."""
    paths = resolve_files(local, split, JSONL_SUFFIXES, key)
    template = ChatTemplate.default()

    def texts() -> Iterator[str]:
        for example in read_examples(paths):
            if example.messages is None:
                yield example.prompt + example.response
            else:
                yield template.render(example.messages)

    return Documents(f"{SOURCE}:{local}", fingerprint_files(paths, SOURCE), texts, len(paths)), paths


def tokenize_examples(tokenizer, examples: list[Example], template: ChatTemplate | None = None) -> list[Turns]:
    """The (prompt ids, response ids) turns of each example, tokenized as Foundry tokenizes them."""
    template = template or ChatTemplate.default()
    pair_texts, chat_texts, plan = [], [], []
    for example in examples:
        if example.messages is None:
            plan.append(("pair", len(pair_texts), 1))
            pair_texts += [example.prompt, example.response]
        else:
            turns = chat_turns(example.messages, template, example.where)
            plan.append(("chat", len(chat_texts), len(turns)))
            chat_texts += [text for turn in turns for text in turn]
    pairs = _encode(tokenizer, pair_texts, special_tokens=True)
    chats = [encoding.ids for encoding in _encode(tokenizer, chat_texts, special_tokens=False)]
    tokenized = []
    for kind, start, count in plan:
        if kind == "chat":
            tokenized.append([(chats[start + 2 * i], chats[start + 2 * i + 1]) for i in range(count)])
            continue
        prompt, response = pairs[start], pairs[start + 1]
        response_ids = response.ids
        # The tokenizer's BOS, added to both texts, starts the example once: drop the response's.
        if (prompt.ids and response_ids and prompt.special_tokens_mask[0] and response.special_tokens_mask[0]
                and prompt.ids[0] == response_ids[0]):
            response_ids = response_ids[1:]
        tokenized.append([(prompt.ids, response_ids)])
    return tokenized


def _encode(tokenizer, texts: list[str], *, special_tokens: bool) -> list:
    if not texts:
        return []
    backend = tokenizer.backend
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return encode(texts, add_special_tokens=special_tokens)


def stitch_turns(turns: Turns, eos_token_id: int | None,
                 options: FinetuneOptions = FinetuneOptions()) -> tuple[list[int], list[int]] | None:
    """(input ids, labels) of an example's turns laid end to end; None when a turn's prompt or response is empty."""
    if not turns or any(not prompt or not response for prompt, response in turns):
        return None
    ids, labels = [], []
    cutoff = int(options.target_prompts[len("length>="):]) if options.target_prompts.startswith("length>=") else None
    for index, (prompt, response) in enumerate(turns):
        last = index == len(turns) - 1
        if last and eos_token_id is not None and response[-1] != eos_token_id:
            response = response + [eos_token_id]
        prompt_counts = options.target_prompts == "all" or (cutoff is not None and len(prompt) >= cutoff)
        response_counts = last or options.target_responses == "all"
        ids += prompt + response
        labels += (prompt if prompt_counts else [IGNORE_INDEX] * len(prompt))
        labels += (response if response_counts else [IGNORE_INDEX] * len(response))
    return ids, labels


def build_rows(tokenized: list[tuple[list[int], list[int]] | None], *, max_seq_len: int, pad_token_id: int,
               pack: bool, packing_ratio: float | None = None) -> FinetuneRows:
    """Place stitched examples ``(ids, labels)`` (None: dropped) into rows (see the module doc)."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = 0  # tokens in the current row
    placed = skipped = truncated = 0
    ratio = (packing_ratio or math.inf) if pack else 1
    for example in tokenized:
        if example is None or all(label == IGNORE_INDEX for label in example[1][:max_seq_len]):
            skipped += 1  # an empty turn, or nothing counted within max_seq_len
            continue
        ids, labels = example[0][:max_seq_len], example[1][:max_seq_len]
        truncated += len(example[0]) > max_seq_len
        if not rows or used + len(ids) > max_seq_len or placed >= ratio * len(rows):
            rows.append([])
            used = 0
        rows[-1].append((ids, labels))
        used += len(ids)
        placed += 1
    if not rows:
        raise ConfigError(f"no fine-tuning example has a trained token within max_seq_len={max_seq_len} (or every "
                          f"prompt or response is empty): raise max_seq_len or shorten the prompts")
    input_ids = np.full((len(rows), max_seq_len), pad_token_id, np.int32)
    label_array = np.full((len(rows), max_seq_len), IGNORE_INDEX, np.int32)
    sequence_id = np.zeros((len(rows), max_seq_len), np.int32)
    for row, examples in enumerate(rows):
        start = 0
        for index, (ids, labels) in enumerate(examples):
            input_ids[row, start : start + len(ids)] = ids
            label_array[row, start : start + len(ids)] = labels
            if index:
                label_array[row, start] = IGNORE_INDEX  # not predicted from the example before it
            sequence_id[row, start : start + len(ids)] = index
            start += len(ids)
        sequence_id[row, start:] = len(examples)  # padding is a segment of its own
    return FinetuneRows(input_ids, label_array, sequence_id, placed, skipped, pack, truncated)


def _dataset_option(dataset, name: str):
    """A Foundry option of the dataset config (its default when the object has no such field)."""
    return getattr(dataset, name, FINETUNE_OPTIONS[name])


def finetune_options(dataset, *, key: str) -> FinetuneOptions:
    """The ``FinetuneOptions`` of a dataset config, each checked as Foundry checks it."""
    if _dataset_option(dataset, "decoder_only_format") is False:
        raise ConfigError(f"{key}.decoder_only_format=false asks for encoder-decoder examples, but jaxtrain's models "
                          f"are decoder-only: set it to true")
    prompts = str(_dataset_option(dataset, "target_prompts") or "none").lower()
    responses = str(_dataset_option(dataset, "target_responses") or "last").lower()
    if responses not in ("last", "all"):
        raise ConfigError(f"{key}.target_responses={responses!r} is unknown: use last or all")
    cutoff = prompts[len("length>="):] if prompts.startswith("length>=") else None
    if prompts not in ("none", "all") and not (cutoff and cutoff.isdigit() and int(cutoff) > 0):
        raise ConfigError(f"{key}.target_prompts={prompts!r} is unknown: use none, all, or length>=N "
                          f"(N a positive number of tokens)")
    ratio = _dataset_option(dataset, "packing_ratio")
    if isinstance(ratio, str) and ratio.lower() == "auto":
        ratio = math.inf
    elif ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 1:
            raise ConfigError(f"{key}.packing_ratio={ratio!r} must be a number >= 1 or auto (or unset: no packing)")
        ratio = None if ratio == 1 else float(ratio)
    return FinetuneOptions(prompts, responses, ratio)


def finetune_rows(cfg, dataset, tokenizer, *, key: str) -> FinetuneRows:
    """The rows of a ``source: finetune_jsonl`` dataset for the run ``cfg``."""
    if dataset.remote:
        raise ConfigError(f"{key}.remote is set, but {SOURCE} reads local files only: unset it")
    options = finetune_options(dataset, key=key)
    pack = options.packing_ratio is not None
    if pack and not cfg.model.attn_config.attn_uses_sequence_id:  # as Foundry allows (it saves memory)
        print(f"notice: {key}.packing_ratio is set and model.attn_config.attn_uses_sequence_id is false: packed "
              f"examples attend to the ones before them in their row (set it to true to keep them apart)",
              file=sys.stderr, flush=True)
    eos_token_id = dataset.eos_token_id if dataset.eos_token_id is not None else tokenizer.eos_token_id
    if eos_token_id is None:
        raise ConfigError(f"{key}.eos_token_id is unset and the tokenizer has no EOS token: set one of them")
    paths = resolve_files(dataset.local, dataset.split, JSONL_SUFFIXES, key)[: dataset.max_files]
    examples = read_examples(paths)
    if not examples:
        raise ConfigError(f"{key}.local={dataset.local!r} holds no fine-tuning examples: {_LINES}")
    template = None
    if any(example.messages for example in examples):
        template = chat_template(cfg.tokenizer, tokenizer)
        name = cfg.tokenizer.name
        if template.origin == ChatTemplate.default().origin and name != "bpe:default":
            print(f"{key}: tokenizer {name} has no chat template (in tokenizer_config.json or chat_template.jinja): "
                  f"chat examples use the default ChatML template; set tokenizer.kwargs.chat_template for another",
                  file=sys.stderr, flush=True)
    tokenized = tokenize_examples(tokenizer, examples, template)
    stitched = [stitch_turns(turns, eos_token_id, options) for turns in tokenized]
    max_seq_len = dataset.max_seq_len or cfg.max_seq_len
    pad_token_id = 0 if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    rows = build_rows(stitched, max_seq_len=max_seq_len, pad_token_id=pad_token_id, pack=pack,
                      packing_ratio=options.packing_ratio)
    notes = [f"{rows.num_skipped} dropped (an empty prompt or response, or no trained token within the first "
             f"{max_seq_len})"] if rows.num_skipped else []
    notes += [f"{rows.num_truncated} cut to max_seq_len={max_seq_len}"] if rows.num_truncated else []
    if notes:
        print(f"{key}: of {len(examples)} fine-tuning examples, {' and '.join(notes)}", file=sys.stderr, flush=True)
    if pack and options.packing_ratio == math.inf and len(rows.input_ids):  # auto: say what it came to
        print(f"{key}.packing_ratio=auto: {rows.num_examples} examples packed into {len(rows.input_ids)} rows "
              f"({rows.num_examples / len(rows.input_ids):.2f} per row)", file=sys.stderr, flush=True)
    return rows

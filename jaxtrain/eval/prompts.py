"""Prompts and token spans of LLM Foundry's in-context-learning tasks, built as Foundry builds them.

- With ``strip_dataset`` (on by default) every string field of an example is stripped of
  surrounding whitespace; list fields (choices, context options, aliases) are kept as written.
- The preamble is ``prompt_string`` followed by ``num_fewshot`` solved demonstrations of other
  examples, drawn with one ``random.Random(fewshot_random_seed)`` per task pass (see
  ``fewshot_indices``). A demonstration is ``example_delimiter`` (unless it starts the preamble),
  ``prelimiter``, its context, ``continuation_delimiter`` and its answer.
- The scored context is built the same way, without an answer; with ``strip_dataset`` its
  trailing whitespace (that of ``continuation_delimiter``, usually) is removed.
- A continuation (a ``language_modeling`` continuation, a choice, a schema continuation) gets one
  leading space when the tokenizer encodes " a" as a single token (GPT-2-style BPE) and it does
  not already start with one; a tokenizer that spells the space separately (SentencePiece, a
  character vocabulary) gets the continuation as written.
- The preamble is tokenized on its own with the tokenizer's special tokens (a BOS for tokenizers
  that add one; a final EOS dropped), the context and the continuation each without; the token
  lists are concatenated. A context too long for the sequence loses tokens from its left.
- ``schema``: a context option is ``prelimiter + option`` alone when there is no preamble, and
  ``prelimiter + example_delimiter + option + continuation_delimiter`` after one (with
  ``strip_dataset``, the delimiter's trailing whitespace removed); a demonstration is
  ``prelimiter + example_delimiter + gold option + continuation_delimiter + continuation``.
- ``generation_task_with_answers``: a demonstration's answer is ``chain_of_thought +
  cot_delimiter + answer`` when any example has a ``chain_of_thought``; generation runs for as
  many tokens as the longest answer or alias encodes to (special tokens included), plus 10 when
  ``cot_delimiter`` is set, and the prompt keeps its last ``max_len`` minus that many tokens.
"""

from __future__ import annotations

import random

from jaxtrain.config import ConfigError

ANSWER_BUFFER_TOKENS = 10  # extra generated tokens for a chain of thought longer than any in the file


def fewshot_indices(num_examples: int, num_fewshot: int, example_index: int, rng: random.Random) -> list[int]:
    """The demonstrations of example ``example_index``, in the order they are written.

    ``min(num_fewshot, num_examples - 1)`` indices are sampled without replacement; if the example
    itself is among them it is swapped for one more draw (``rng.choice``) that is neither it nor
    already chosen. The order is the iteration order of the Python set holding them."""
    if num_fewshot <= 0:
        return []
    num_fewshot = min(num_examples - 1, num_fewshot)
    chosen = set(rng.sample(range(0, num_examples), num_fewshot))
    if example_index in chosen:
        chosen.remove(example_index)
        if len(chosen) < num_examples - 1:
            replacement = rng.choice(range(0, num_examples))
            while replacement in chosen or replacement == example_index:
                replacement = rng.choice(range(0, num_examples))
            chosen.add(replacement)
    return list(chosen)


def stripped(example: dict) -> dict:
    """The example with surrounding whitespace removed from its string fields."""
    return {key: value.strip() if isinstance(value, str) else value for key, value in example.items()}


def has_chain_of_thought(examples: list[dict]) -> bool:
    return any("chain_of_thought" in example for example in examples)


def _answer(task, example: dict, has_cot: bool) -> str:
    kind = task.icl_task_type
    if kind == "language_modeling":
        return example["continuation"]
    if kind == "multiple_choice":
        return example["choices"][example["gold"]]
    if has_cot:
        return f"{example.get('chain_of_thought') or ''}{task.cot_delimiter}{example['answer']}"
    return example["answer"]


def demonstration(task, example: dict, preceding: str, *, has_cot: bool = False) -> str:
    """One solved example as it follows ``preceding`` text in a preamble."""
    delimiter = task.example_delimiter if preceding else ""
    if task.icl_task_type == "schema":
        option = example["context_options"][example["gold"]]
        return task.prelimiter + delimiter + option + task.continuation_delimiter + example["continuation"]
    context = example["query" if task.icl_task_type == "multiple_choice" else "context"]
    return delimiter + task.prelimiter + context + task.continuation_delimiter + _answer(task, example, has_cot)


def preamble(task, examples: list[dict], index: int, num_fewshot: int, rng: random.Random, *,
             has_cot: bool = False) -> str:
    """``prompt_string`` and the demonstrations placed before example ``index`` (examples as stripped)."""
    text = task.prompt_string
    for shot in fewshot_indices(len(examples), num_fewshot, index, rng):
        text += demonstration(task, examples[shot], text, has_cot=has_cot)
    return text


def scored_contexts(task, example: dict, preamble_text: str) -> list[str]:
    """The context text(s) that follow the preamble: one per option for ``schema``, else one."""
    delimiter = task.example_delimiter if preamble_text else ""
    if task.icl_task_type == "schema":
        if not preamble_text:
            return [task.prelimiter + option for option in example["context_options"]]
        after = task.continuation_delimiter.rstrip() if task.strip_dataset else task.continuation_delimiter
        return [task.prelimiter + delimiter + option + after for option in example["context_options"]]
    field = "query" if task.icl_task_type == "multiple_choice" else "context"
    context = delimiter + task.prelimiter + example[field] + task.continuation_delimiter
    return [context.rstrip() if task.strip_dataset else context]


def scored_continuations(task, example: dict, prefix_space: bool) -> list[str]:
    """The continuation text(s) scored after the context: one per choice for ``multiple_choice``."""
    kind = task.icl_task_type
    texts = list(example["choices"]) if kind == "multiple_choice" else [example["continuation"]]
    return [" " + text if prefix_space and not text.startswith(" ") else text for text in texts]


def needs_prefix_space(tokenizer) -> bool:
    """Whether " a" is one token: a continuation then carries the space that separates it."""
    return len(tokenizer.encode(" a")) == 1


def encode_with_special_tokens(tokenizer, text: str) -> list[int]:
    """``text`` as the tokenizer encodes a whole input (its BOS or other added tokens included)."""
    backend = getattr(tokenizer, "backend", None)
    return list(backend.encode(text, add_special_tokens=True).ids) if backend is not None else tokenizer.encode(text)


def encode_preamble(tokenizer, text: str) -> list[int]:
    """The preamble's tokens, special tokens included, without a final EOS (the example follows it)."""
    ids = encode_with_special_tokens(tokenizer, text)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and len(ids) > 1 and ids[-1] == eos:
        ids = ids[:-1]
    return ids


def fit(context: list[int], continuation: list[int], max_len: int, where: str) -> tuple[list[int], int]:
    """Context trimmed from the left so context + continuation fit ``max_len``: (tokens, span start)."""
    if not continuation:
        raise ConfigError(f"{where}: the continuation encodes to no tokens; give it some text")
    if len(continuation) >= max_len:
        raise ConfigError(f"{where}: the continuation has {len(continuation)} tokens, too many for a sequence of "
                          f"{max_len}; shorten it or raise max_seq_len (icl_seq_len)")
    if len(context) + len(continuation) > max_len:
        context = context[-(max_len - len(continuation)):]
    if not context:
        raise ConfigError(f"{where}: the context encodes to no tokens; a first token is needed to predict from "
                          f"(give it some text, a prompt_string, or few-shot examples)")
    return context + continuation, len(context)


def span_requests(task, examples: list[dict], preambles: list[str], tokenizer, max_len: int):
    """Scoring requests of the first ``len(preambles)`` examples (stripped as the task says).

    Returns ``(requests, groups)``: ``requests`` are ``(tokens, span_start)`` for ``SpanScorer``;
    ``groups`` are ``(first request, request count, gold)`` per example."""
    prefix_space = needs_prefix_space(tokenizer)
    requests, groups = [], []
    for index, (example, before) in enumerate(zip(examples, preambles)):
        where = f"{task.dataset_uri} example {index + 1}"
        head = encode_preamble(tokenizer, before)
        contexts = [head + tokenizer.encode(context) for context in scored_contexts(task, example, before)]
        continuations = [tokenizer.encode(text) for text in scored_continuations(task, example, prefix_space)]
        if len(contexts) == 1:
            contexts = contexts * len(continuations)
        else:
            continuations = continuations * len(contexts)
        groups.append((len(requests), len(contexts), example.get("gold", 0)))
        requests += [fit(context, continuation, max_len, where)
                     for context, continuation in zip(contexts, continuations)]
    return requests, groups


def answer_budget(tokenizer, examples: list[dict], cot_delimiter: str) -> int:
    """Tokens to generate: the longest answer or alias (with its chain of thought when the file has
    them), special tokens included, plus ``ANSWER_BUFFER_TOKENS`` when ``cot_delimiter`` is set."""
    has_cot = has_chain_of_thought(examples)
    longest = 0
    for example in examples:
        for answer in [example["answer"], *example.get("aliases", [])]:
            response = f"{example.get('chain_of_thought') or ''}{cot_delimiter}{answer}" if has_cot else answer
            longest = max(longest, len(encode_with_special_tokens(tokenizer, response)))
    return max(longest + (ANSWER_BUFFER_TOKENS if cot_delimiter else 0), 1)


def generation_prompts(task, examples: list[dict], preambles: list[str], tokenizer, max_prompt: int) -> list[list[int]]:
    """The prompt tokens of the first ``len(preambles)`` examples, each its last ``max_prompt`` tokens."""
    prompts = []
    for index, (example, before) in enumerate(zip(examples, preambles)):
        tokens = encode_preamble(tokenizer, before) + tokenizer.encode(scored_contexts(task, example, before)[0])
        tokens = tokens[-max_prompt:]
        if not tokens:
            raise ConfigError(f"{task.dataset_uri} example {index + 1}: the context encodes to no tokens; "
                              f"give it some text")
        prompts.append(tokens)
    return prompts

"""In-context-learning tasks in LLM Foundry's JSONL formats, scored in batches.

Task types and their metric (accuracy):

- ``language_modeling`` (``context``, ``continuation``): correct iff every continuation token is the argmax.
- ``multiple_choice`` (``query``, ``choices``, ``gold``): the choice with the lowest mean per-token loss.
- ``schema`` (``context_options``, ``continuation``, ``gold``): the context under which the
  continuation has the lowest mean per-token loss.
- ``generation_task_with_answers`` (``context``, ``answer``, ``aliases``): the greedy generation,
  cut at the stopping criteria and normalised, starts with a normalised answer or alias.

Prompts follow Foundry: ``prompt_string``, then ``num_fewshot`` solved examples drawn from the same
file (never the example itself) with ``random.Random(fewshot_random_seed)``, each joined by
``example_delimiter``; an example is ``context + continuation_delimiter + answer``. Whitespace that
ends the context moves to the start of the continuation, so a BPE tokenizer sees " Paris" as one
word, as Foundry's prefix-space handling intends.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import random
import re
import string
from collections.abc import Sequence

import jax.numpy as jnp
import yaml

from jaxtrain.config import ConfigError
from jaxtrain.config.loader import malformed_yaml
from jaxtrain.eval.perplexity import SpanScorer, length_bucket

TASK_FIELDS = {
    "language_modeling": ("context", "continuation"),
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "generation_task_with_answers": ("context", "answer"),
}
# Foundry keys accepted and ignored here (its metric names, categories, code-eval options, ...).
_IGNORED_KEYS = {"metric_names", "has_categories", "pass_at_k", "generations_per_sample", "cot_delimiter",
                 "hf_loading_vars", "hf_parsing_map", "destination_path", "icl_subset_num_batches"}
ANSWER_BUFFER_TOKENS = 10  # Foundry lets a generation run this many tokens past the longest answer


class _LineLoader(yaml.SafeLoader):
    """A safe YAML loader whose mappings remember the line they start on (``mapping.line``)."""


class LineDict(dict):
    line: int = 0


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    mapping = LineDict(loader.construct_mapping(node, deep=True))
    mapping.line = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str):
    """The YAML document at ``path`` (safe loader); every mapping is a ``LineDict`` with its line number."""
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.load(handle, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise ConfigError(malformed_yaml(path, error)) from None


def where(path: str | None, mapping) -> str:
    """``path:line`` of a mapping read by ``read_yaml`` (or the bare path)."""
    line = getattr(mapping, "line", 0)
    return f"{path}:{line}" if path and line else (path or "<config>")


@dataclasses.dataclass
class ICLTask:
    """One Foundry ``icl_tasks`` entry."""

    label: str
    dataset_uri: str
    icl_task_type: str
    num_fewshot: list[int] = dataclasses.field(default_factory=lambda: [0])
    prompt_string: str = ""
    example_delimiter: str = "\n"
    continuation_delimiter: str = " "
    fewshot_random_seed: int = 1234
    early_stopping_criteria: list[str] | None = None
    do_normalization: bool = True
    max_seq_len: int | None = None
    batch_size: int | None = None


_TASK_KEYS = {field.name for field in dataclasses.fields(ICLTask)}


def task_from_dict(entry, *, source: str | None = None, base_dir: str = ".") -> ICLTask:
    """An ``ICLTask`` from one ``icl_tasks`` mapping; errors name ``source:line`` and the key."""
    at = where(source, entry)
    if not isinstance(entry, dict):
        raise ConfigError(f"{at}: an icl_tasks entry must be a mapping, got {type(entry).__name__}")
    for key in entry:
        if key not in _TASK_KEYS and key not in _IGNORED_KEYS:
            near = difflib.get_close_matches(str(key), sorted(_TASK_KEYS), n=1)
            raise ConfigError(f"{at}: unknown icl_tasks key {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
    for key in ("label", "dataset_uri", "icl_task_type"):
        if key not in entry:
            raise ConfigError(f"{at}: icl_tasks entry is missing the field {key!r}")
    if entry["icl_task_type"] not in TASK_FIELDS:
        raise ConfigError(f"{at}: icl_task_type={entry['icl_task_type']!r} is not one of {', '.join(TASK_FIELDS)}")
    values = {key: value for key, value in entry.items() if key in _TASK_KEYS}
    shots = values.get("num_fewshot", [0])
    values["num_fewshot"] = [int(k) for k in (shots if isinstance(shots, list) else [shots])]
    uri = os.path.expanduser(str(values["dataset_uri"]))
    if not os.path.isabs(uri) and not os.path.exists(uri) and os.path.exists(os.path.join(base_dir, uri)):
        uri = os.path.join(base_dir, uri)  # relative to the tasks file when not relative to the working folder
    values["dataset_uri"] = uri
    return ICLTask(**values)


def load_tasks(path: str) -> tuple[list[ICLTask], dict | None]:
    """The tasks of a YAML file (a list, or a mapping with ``icl_tasks``) and its ``eval_gauntlet`` if any."""
    document = read_yaml(path)
    gauntlet = None
    if isinstance(document, dict):
        gauntlet = document.get("eval_gauntlet")
        if "icl_tasks" not in document:
            raise ConfigError(f"{where(path, document)}: no 'icl_tasks' list in {path}")
        document = document["icl_tasks"]
    if not isinstance(document, list) or not document:
        raise ConfigError(f"{path}: icl_tasks must be a non-empty list of task mappings")
    base_dir = os.path.dirname(os.path.abspath(path))
    return [task_from_dict(entry, source=path, base_dir=base_dir) for entry in document], gauntlet


def read_examples(path: str, task_type: str) -> list[dict]:
    """The examples of a JSONL task file; a bad line or a missing field names ``path:line``."""
    required = TASK_FIELDS[task_type]
    examples = []
    try:
        handle = open(path, encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the task file ({error.strerror})") from None
    with handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}:{line_number} is not valid JSON ({error.msg})") from None
            if not isinstance(example, dict):
                raise ConfigError(f"{path}:{line_number} is not a JSON object")
            for field in required:
                if field not in example:
                    raise ConfigError(f"{path}:{line_number} has no field {field!r} ({task_type} needs "
                                      f"{', '.join(required)})")
            if "gold" in example:
                options = example["choices" if task_type == "multiple_choice" else "context_options"]
                if not isinstance(example["gold"], int) or not 0 <= example["gold"] < len(options):
                    raise ConfigError(f"{path}:{line_number} field 'gold'={example['gold']!r} is not an index "
                                      f"into its {len(options)} options")
            examples.append(example)
    if not examples:
        raise ConfigError(f"{path}: the task file has no examples")
    return examples


def fewshot_indices(num_examples: int, num_fewshot: int, example_index: int, rng: random.Random) -> list[int]:
    """``num_fewshot`` distinct example indices other than ``example_index`` (capped at the others available)."""
    num_fewshot = min(num_fewshot, num_examples - 1)
    if num_fewshot <= 0:
        return []
    chosen = set(rng.sample(range(num_examples), num_fewshot))
    while example_index in chosen:
        chosen = set(rng.sample(range(num_examples), num_fewshot))
    return sorted(chosen)


def _context_and_answer(task_type: str, example: dict) -> tuple[str, str]:
    """The solved form of an example used as a few-shot demonstration."""
    if task_type == "language_modeling":
        return example["context"], example["continuation"]
    if task_type == "multiple_choice":
        return example["query"], example["choices"][example["gold"]]
    if task_type == "schema":
        return example["context_options"][example["gold"]], example["continuation"]
    return example["context"], example["answer"]


def fewshot_prefix(task: ICLTask, examples: list[dict], index: int, num_fewshot: int, rng: random.Random) -> str:
    """``prompt_string`` and the solved demonstrations, ready for the example's own context."""
    text = task.prompt_string
    for shot in fewshot_indices(len(examples), num_fewshot, index, rng):
        context, answer = _context_and_answer(task.icl_task_type, examples[shot])
        text += (task.example_delimiter if text else "") + context + task.continuation_delimiter + answer
    return text


def split_span(prefix: str, context: str, task: ICLTask, continuation: str) -> tuple[str, str]:
    """(context text, continuation text): the context's trailing whitespace moves onto the continuation."""
    full = prefix + (task.example_delimiter if prefix else "") + context + task.continuation_delimiter
    stripped = full.rstrip()
    return stripped, full[len(stripped):] + continuation


def normalize_answer(text: str) -> str:
    """Foundry's (TriviaQA's) answer normalisation: underscores and punctuation to spaces, lowercase,
    articles removed, whitespace collapsed."""
    text = text.replace("_", " ").lower()
    punctuation = set(string.punctuation + "\u2018\u2019\u00b4`")
    text = "".join(" " if ch in punctuation else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def generation_correct(output: str, answers: Sequence[str], *, stopping_criteria: Sequence[str] = (),
                       do_normalization: bool = True) -> bool:
    """Whether ``output``, cut at the first stopping string, starts with one of ``answers`` (normalised)."""
    criteria = [re.escape(stop) for stop in stopping_criteria if stop]
    if criteria:
        output = re.split("|".join(criteria), output)[0]
    clean = normalize_answer if do_normalization else str.strip
    return any(clean(output).startswith(clean(answer)) for answer in answers)


@dataclasses.dataclass
class TaskResult:
    label: str
    icl_task_type: str
    num_fewshot: int
    accuracy: float
    num_examples: int

    @property
    def key(self) -> str:
        return f"{self.label}/{self.num_fewshot}-shot"


def _fit(context: list[int], continuation: list[int], max_len: int, where_: str) -> tuple[list[int], int]:
    """Context trimmed from the left so context + continuation fit ``max_len``: (tokens, span start)."""
    if not continuation:
        raise ConfigError(f"{where_}: the continuation encodes to no tokens")
    if len(continuation) >= max_len:
        raise ConfigError(f"{where_}: the continuation has {len(continuation)} tokens, too many for a "
                          f"sequence of {max_len}")
    context = context[-(max_len - len(continuation)):] if len(context) + len(continuation) > max_len else context
    if not context:
        raise ConfigError(f"{where_}: the context encodes to no tokens; a first token is needed to predict from")
    return context + continuation, len(context)


def evaluate_task(model, tokenizer, task: ICLTask, num_fewshot: int, *, examples: list[dict] | None = None,
                  batch_size: int = 8, max_len: int | None = None, compute_dtype=jnp.float32,
                  scorer: SpanScorer | None = None, max_examples: int | None = None) -> TaskResult:
    """Accuracy of ``model`` on ``task`` with ``num_fewshot`` demonstrations per example.

    ``max_examples``: score only the task's first examples (Foundry's ``icl_subset_num_batches``
    times the batch size); their demonstrations still come from all of them, as in a full pass."""
    examples = read_examples(task.dataset_uri, task.icl_task_type) if examples is None else examples
    max_len = min(task.max_seq_len or max_len or model.max_seq_len, model.max_seq_len)
    pad_token_id = tokenizer.pad_token_id or 0
    rng = random.Random(task.fewshot_random_seed)
    scored = len(examples) if max_examples is None else min(max_examples, len(examples))
    # one prefix per scored example; the loops below zip the examples with them
    prefixes = [fewshot_prefix(task, examples, index, num_fewshot, rng) for index in range(scored)]
    kind = task.icl_task_type
    if kind == "generation_task_with_answers":
        correct = _generation_correct(model, tokenizer, task, examples, prefixes, batch_size=batch_size,
                                      max_len=max_len, compute_dtype=compute_dtype)
    else:
        if scorer is None:
            scorer = SpanScorer(model, batch_size=batch_size, compute_dtype=compute_dtype, max_len=max_len,
                                pad_token_id=pad_token_id)
        requests, groups = [], []  # groups: (first request, request count, gold) per example
        for index, (example, prefix) in enumerate(zip(examples, prefixes)):
            if kind == "language_modeling":
                spans = [(example["context"], example["continuation"])]
            elif kind == "multiple_choice":
                spans = [(example["query"], choice) for choice in example["choices"]]
            else:
                spans = [(option, example["continuation"]) for option in example["context_options"]]
            groups.append((len(requests), len(spans), example.get("gold", 0)))
            for context, continuation in spans:
                context_text, continuation_text = split_span(prefix, context, task, continuation)
                requests.append(_fit(tokenizer.encode(context_text), tokenizer.encode(continuation_text),
                                     max_len, f"{task.dataset_uri} example {index + 1}"))
        scores = scorer.score(requests)
        correct = []
        for first, count, gold in groups:
            group = scores[first : first + count]
            if kind == "language_modeling":
                correct.append(group[0].all_argmax)
            else:
                losses = [score.mean_loss for score in group]
                correct.append(losses.index(min(losses)) == gold)
    return TaskResult(task.label, kind, num_fewshot, sum(correct) / len(correct), len(correct))


def _generation_correct(model, tokenizer, task: ICLTask, examples, prefixes, *, batch_size: int, max_len: int,
                        compute_dtype) -> list[bool]:
    from jaxtrain.inference.generate import generate

    answers = [[example["answer"], *example.get("aliases", [])] for example in examples]
    longest_answer = max(len(tokenizer.encode(" " + text)) for options in answers for text in options)
    max_new_tokens = min(longest_answer + ANSWER_BUFFER_TOKENS, max_len - 1)
    prompts = []
    for index, (example, prefix) in enumerate(zip(examples, prefixes)):
        context_text, _ = split_span(prefix, example["context"], task, "")
        tokens = tokenizer.encode(context_text)[-(max_len - max_new_tokens):]
        if not tokens:
            raise ConfigError(f"{task.dataset_uri} example {index + 1}: the context encodes to no tokens")
        prompts.append(tokens)
    stopping = task.early_stopping_criteria
    if stopping is None:
        stopping = [task.example_delimiter] if task.example_delimiter else []
    correct = []
    for start in range(0, len(prompts), batch_size):
        # one compiled decode program per length bucket: prompts padded to the bucket, and the last
        # batch filled up with copies of its first prompt (their answers are not read)
        batch = prompts[start : start + batch_size]
        width = length_bucket(max(len(tokens) for tokens in batch), max_len - max_new_tokens)
        result = generate(model, batch + [batch[0]] * (batch_size - len(batch)), max_new_tokens=max_new_tokens,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0,
                          compute_dtype=compute_dtype, pad_to=width)
        for offset, tokens in enumerate(result.tokens[: len(batch)]):
            output = tokenizer.decode(tokens, skip_special_tokens=True)
            correct.append(generation_correct(output, answers[start + offset], stopping_criteria=stopping,
                                              do_normalization=task.do_normalization))
    return correct

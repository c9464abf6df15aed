"""In-context-learning tasks in LLM Foundry's JSONL formats, scored in batches.

Task types and their metric (accuracy):

- ``language_modeling`` (``context``, ``continuation``): correct iff every continuation token is the argmax.
- ``multiple_choice`` (``query``, ``choices``, ``gold``): the choice with the lowest mean per-token loss
  (Foundry's lowest perplexity; ties go to the first).
- ``schema`` (``context_options``, ``continuation``, ``gold``): the context under which the
  continuation has the lowest mean per-token loss.
- ``generation_task_with_answers`` (``context``, ``answer``, optional ``aliases`` and
  ``chain_of_thought``): the greedy generation, cut before the first match of the
  ``early_stopping_criteria`` (none by default), then after the last ``cot_delimiter``, and
  normalised, starts with the normalised answer or an alias. As in Foundry, the criteria are
  joined with ``|`` into one regular expression, so their special characters are regex syntax
  (``"."`` matches any character: escape it as ``"\\."`` to cut at a full stop).

Prompts are built as Foundry builds them (``jaxtrain.eval.prompts``). A task with
``has_categories`` is scored per value of its examples' ``category`` field, each category on its
own (its own demonstrations); the gauntlet takes the mean of the category accuracies.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import random
import re
import string
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import yaml

from jaxtrain.config import ConfigError
from jaxtrain.config.loader import UniqueKeyLoader, malformed_yaml
from jaxtrain.eval import prompts
from jaxtrain.eval.perplexity import SpanScorer, length_bucket, program_signature
from jaxtrain.eval.prompts import fewshot_indices as fewshot_indices  # re-exported

TASK_FIELDS = {
    "language_modeling": ("context", "continuation"),
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "generation_task_with_answers": ("context", "answer"),
}
# Foundry keys accepted and ignored here (its metric names, code-eval options, ...).
_IGNORED_KEYS = {"metric_names", "pass_at_k", "generations_per_sample", "hf_loading_vars", "hf_parsing_map",
                 "destination_path", "icl_subset_num_batches"}
_TEXT_KEYS = ("prompt_string", "example_delimiter", "continuation_delimiter", "prelimiter", "cot_delimiter")


class _LineLoader(UniqueKeyLoader):
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
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}): save it as UTF-8 YAML") from None
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
    prelimiter: str = ""
    cot_delimiter: str = ""
    early_stopping_criteria: list[str] | None = None
    do_normalization: bool = True
    strip_dataset: bool = True
    has_categories: bool = False
    max_seq_len: int | None = None
    batch_size: int | None = None


_TASK_KEYS = {field.name for field in dataclasses.fields(ICLTask)}


def task_from_dict(entry, *, source: str | None = None, base_dir: str = ".") -> ICLTask:
    """An ``ICLTask`` from one ``icl_tasks`` mapping; errors name ``source:line`` and the key."""
    at = where(source, entry)
    if not isinstance(entry, dict):
        raise ConfigError(f"{at}: an icl_tasks entry must be a mapping, got {type(entry).__name__}")
    entry = dict(entry)
    if "question_prelimiter" in entry:  # Foundry's older name for prelimiter
        if "prelimiter" in entry:
            raise ConfigError(f"{at}: give prelimiter or question_prelimiter, not both (they are one setting)")
        entry["prelimiter"] = entry.pop("question_prelimiter")
    for key in entry:
        if key not in _TASK_KEYS and key not in _IGNORED_KEYS:
            near = difflib.get_close_matches(str(key), sorted(_TASK_KEYS), n=1)
            raise ConfigError(f"{at}: unknown icl_tasks key {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
    for key in ("label", "dataset_uri", "icl_task_type"):
        if key not in entry:
            raise ConfigError(f"{at}: icl_tasks entry is missing the field {key!r}")
    if entry["icl_task_type"] not in TASK_FIELDS:
        renamed = {"question_answering": "generation_task_with_answers"}.get(entry["icl_task_type"])
        raise ConfigError(f"{at}: icl_task_type={entry['icl_task_type']!r} is not one of {', '.join(TASK_FIELDS)}"
                          + (f" (LLM Foundry renamed it {renamed}: use that)" if renamed else ""))
    values = {key: value for key, value in entry.items() if key in _TASK_KEYS}
    shots = values.get("num_fewshot", [0])
    shots = shots if isinstance(shots, list) else [shots]
    if not shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in shots):
        raise ConfigError(f"{at}: num_fewshot={values.get('num_fewshot')!r} must be a whole number >= 0 or a "
                          f"non-empty list of them, e.g. [0, 5]")
    values["num_fewshot"] = shots
    rows = values.get("batch_size")
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ConfigError(f"{at}: batch_size={rows!r} must be a whole number >= 1 (rows per forward), or left out")
    for key in _TEXT_KEYS:
        if key in values and not isinstance(values[key], str):
            raise ConfigError(f"{at}: {key}={values[key]!r} must be a string (quote it in the YAML)")
    stops = values.get("early_stopping_criteria")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops)):
        raise ConfigError(f"{at}: early_stopping_criteria={stops!r} must be a list of strings, e.g. ['Question:']")
    stopping_pattern(stops, where=f"{at}: task {entry['label']!r}")
    if not isinstance(values["dataset_uri"], str) or not values["dataset_uri"].strip():
        raise ConfigError(f"{at}: task {entry['label']!r}: dataset_uri is empty; set it to the task's JSONL file")
    uri = os.path.expanduser(values["dataset_uri"])
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
        if isinstance(document, str):  # a path to a tasks file, as Foundry's eval configs give it
            tasks_path = _beside(document, path)
            tasks, inner = load_tasks(tasks_path)
            if isinstance(gauntlet, str):
                gauntlet = _beside(gauntlet, path)
            return tasks, inner if gauntlet is None else gauntlet
    if not isinstance(document, list) or not document:
        raise ConfigError(f"{path}: icl_tasks must be a non-empty list of task mappings (or a tasks file's path)")
    base_dir = os.path.dirname(os.path.abspath(path))
    if isinstance(gauntlet, str):
        gauntlet = _beside(gauntlet, path)
    tasks = [task_from_dict(entry, source=path, base_dir=base_dir) for entry in document]
    check_labels(tasks, path)
    return tasks, gauntlet


def check_labels(tasks: Sequence[ICLTask], source: str) -> None:
    """Refuse two tasks of one label: their scores would be logged under one name."""
    seen: set[str] = set()
    for task in tasks:
        if task.label in seen:
            raise ConfigError(f"{source}: two tasks are labelled {task.label!r}; give each task its own label")
        seen.add(task.label)


def _beside(name: str, source: str) -> str:
    """``name`` as given if it exists (relative to the working folder), else relative to ``source``'s folder."""
    name = os.path.expanduser(name)
    if os.path.isabs(name) or os.path.exists(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(source)), name)


def _check_example(example, path: str, line: int, task_type: str, *, require_category: bool,
                   kind_fix: str = "check icl_task_type") -> None:
    """Refuse an example the task cannot score: a missing field, a field of the wrong kind, a bad ``gold``."""
    at = f"{path}:{line}"
    required = TASK_FIELDS[task_type]
    if not isinstance(example, dict):
        raise ConfigError(f"{at}: a line must be one JSON object with {', '.join(required)} "
                          f"({task_type}), got a JSON {type(example).__name__}")
    for field in required:
        if field not in example:
            raise ConfigError(f"{at} has no field {field!r} ({task_type} needs {', '.join(required)}); add it, "
                              f"or {kind_fix}")
    if require_category and "category" not in example:
        raise ConfigError(f"{at} has no field 'category' (has_categories is set); add it to every line, "
                          f"or drop has_categories")
    texts = [field for field in ("context", "continuation", "query", "answer") if field in required]
    if task_type == "generation_task_with_answers" and "chain_of_thought" in example:
        texts.append("chain_of_thought")
    for field in texts:
        if not isinstance(example[field], str):
            raise ConfigError(f"{at}: field {field!r} must be a string, got {json.dumps(example[field])[:60]}")
    if task_type == "generation_task_with_answers":
        empty = [answer for answer in [example["answer"], *(example.get("aliases") or [])]
                 if isinstance(answer, str) and not answer.strip()]
        if empty:
            raise ConfigError(f"{at}: an empty answer (in 'answer' or 'aliases') would count every generation as "
                              f"correct; give the answer's text or drop the line")
    lists = {"multiple_choice": "choices", "schema": "context_options"}.get(task_type)
    if task_type == "generation_task_with_answers" and "aliases" in example:
        lists = "aliases"
    if lists is not None:
        options = example[lists]
        if (not isinstance(options, list) or not all(isinstance(option, str) for option in options)
                or (not options and lists != "aliases")):
            raise ConfigError(f"{at}: field {lists!r} must be a{' non-empty' if lists != 'aliases' else ''} list of "
                              f"strings, got {json.dumps(options)[:60]}")
    scored = {"multiple_choice": "choices", "schema": "continuation", "language_modeling": "continuation"}.get(task_type)
    values = example.get(scored) if scored else None
    if any(not text.strip() for text in ([values] if isinstance(values, str) else values or [])):
        raise ConfigError(f"{at}: an empty text in field {scored!r} is scored as nothing (choices that tie, or a "
                          f"continuation with no tokens); give its text or drop the line")
    if "gold" in required:
        gold, options = example["gold"], example[lists]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
            raise ConfigError(f"{at} field 'gold'={json.dumps(gold)} is not an index into its {len(options)} {lists} "
                              f"(0 to {len(options) - 1}; gold counts from 0)")
    if require_category and (isinstance(example["category"], bool) or not isinstance(example["category"], (str, int))):
        raise ConfigError(f"{at}: field 'category' must be a string, got {json.dumps(example['category'])[:60]}")


def read_examples(path: str, task_type: str, *, require_category: bool = False,
                  kind_fix: str = "check icl_task_type") -> list[dict]:
    """The examples of a JSONL task file; a bad line or a missing field names ``path:line``."""
    examples = []
    try:
        handle = open(path, encoding="utf-8-sig")  # a byte-order mark (some editors write one) is not text
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the task file ({error.strerror})") from None
    with handle:
        try:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    example = json.loads(line.rstrip("\r\n"))  # columns counted on the line itself
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{path}:{line_number} is not valid JSON ({error.msg} at column {error.colno}); "
                                      f"each line must be one JSON object") from None
                _check_example(example, path, line_number, task_type, require_category=require_category,
                               kind_fix=kind_fix)
                examples.append(example)
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); "
                              f"save it as UTF-8") from None
    if not examples:
        raise ConfigError(f"{path}: the task file has no examples; write one JSON object per line with "
                          f"{', '.join(TASK_FIELDS[task_type])} ({task_type})")
    return examples


def by_category(examples: list[dict]) -> dict[str, list[dict]]:
    """The examples grouped by their ``category`` field, categories sorted, file order kept within each."""
    groups: dict[str, list[dict]] = {}
    for example in examples:
        groups.setdefault(str(example["category"]), []).append(example)
    return dict(sorted(groups.items()))


def normalize_answer(text: str) -> str:
    """Foundry's (TriviaQA's) answer normalisation: underscores and punctuation to spaces, lowercase,
    articles removed, whitespace collapsed."""
    text = text.replace("_", " ").lower()
    punctuation = set(string.punctuation + "\u2018\u2019\u00b4`")
    text = "".join(" " if ch in punctuation else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def stopping_pattern(criteria: Sequence[str] | None, *, where: str) -> re.Pattern[str] | None:
    """The regular expression that cuts generated answers: ``criteria`` joined with ``|`` as Foundry
    joins them (None when there are none). An empty entry, which would cut every answer to nothing,
    or a pattern that is not a valid regular expression is a one-line ``ConfigError`` after ``where``."""
    if not criteria:
        return None
    if any(stop == "" for stop in criteria):
        raise ConfigError(f"{where}: early_stopping_criteria={list(criteria)!r} has an empty string, which would "
                          f"cut every generated answer to nothing: remove it")
    try:
        return re.compile("|".join(criteria))
    except re.error as error:
        raise ConfigError(f"{where}: early_stopping_criteria={list(criteria)!r} is not a valid regular expression "
                          f"once joined with '|' ({error}); answers are cut at its matches as in LLM Foundry, so "
                          f"escape the special characters of a literal string (e.g. '\\(' for '(')") from None


def generation_correct(output: str, answers: Sequence[str], *, stopping_criteria: Sequence[str] = (),
                       do_normalization: bool = True, cot_delimiter: str = "") -> bool:
    """Whether ``output``, cut before the first match of ``stopping_criteria`` (joined with ``|``
    into one regular expression, as LLM Foundry's ``re.split`` joins them) and then after the last
    ``cot_delimiter``, starts with one of ``answers`` (both normalised, or only stripped without
    ``do_normalization``). Check the criteria with ``stopping_pattern`` first."""
    if stopping_criteria:
        output = re.split("|".join(stopping_criteria), output)[0]
    if cot_delimiter:
        output = output.split(cot_delimiter)[-1]
    clean = normalize_answer if do_normalization else str.strip
    return any(clean(output).startswith(clean(answer)) for answer in answers)


@dataclasses.dataclass
class TaskResult:
    """One task's accuracy at one few-shot setting (and one category of a ``has_categories`` task).
    ``dataset_size``: the examples of the file (or category), scored or not (0: ``num_examples``)."""

    label: str
    icl_task_type: str
    num_fewshot: int
    accuracy: float
    num_examples: int
    category: str | None = None
    dataset_size: int = 0

    @property
    def key(self) -> str:
        return f"{self.label}/{self.num_fewshot}-shot" + (f"/{self.category}" if self.category is not None else "")


def questions_per_batch(task: ICLTask, examples: list[dict], batch_size: int) -> int:
    """Examples per batch as Foundry's loader groups them: every choice (or context option) of a
    question is a row, and a batch holds ``max(choices, batch_size) // choices`` questions, the
    choices counted on the first example."""
    field = {"multiple_choice": "choices", "schema": "context_options"}.get(task.icl_task_type)
    if field is None:
        return batch_size
    choices = len(examples[0][field])
    return max(choices, batch_size) // choices


def evaluate_task(model, tokenizer, task: ICLTask, num_fewshot: int, *, examples: list[dict] | None = None,
                  batch_size: int = 8, max_len: int | None = None, compute_dtype=jnp.float32,
                  scorer: SpanScorer | None = None, max_examples: int | None = None,
                  on_batch: Callable[[], None] | None = None,
                  on_compile: Callable[[], None] | None = None) -> TaskResult:
    """Accuracy of ``model`` on ``task`` with ``num_fewshot`` demonstrations per example.

    ``max_examples``: score only the task's first examples (Foundry's ``icl_subset_num_batches``
    times its questions per batch); their demonstrations still come from all of them, as in a full
    pass. ``on_batch()`` is called after each batch has finished computing, ``on_compile()``
    before a batch whose program shape this process has not run yet (it compiles first).
    ``examples`` are scored as one set: ``run_icl_suite`` splits a ``has_categories`` task."""
    if task.icl_task_type == "generation_task_with_answers":
        stopping_pattern(task.early_stopping_criteria, where=f"task {task.label!r}")
    raw = read_examples(task.dataset_uri, task.icl_task_type) if examples is None else examples
    examples = [prompts.stripped(example) for example in raw] if task.strip_dataset else raw
    max_len = min(task.max_seq_len or max_len or model.max_seq_len, model.max_seq_len)
    rng = random.Random(task.fewshot_random_seed)
    scored = len(examples) if max_examples is None else min(max_examples, len(examples))
    kind = task.icl_task_type
    has_cot = kind == "generation_task_with_answers" and prompts.has_chain_of_thought(examples)
    # one preamble per scored example, drawn in file order from one generator, as Foundry prepares them
    preambles = [prompts.preamble(task, examples, index, num_fewshot, rng, has_cot=has_cot) for index in range(scored)]
    if kind == "generation_task_with_answers":
        correct = _generation_correct(model, tokenizer, task, raw, examples, preambles, batch_size=batch_size,
                                      max_len=max_len, compute_dtype=compute_dtype, on_batch=on_batch,
                                      on_compile=on_compile)
    else:
        if scorer is None:
            scorer = SpanScorer(model, batch_size=batch_size, compute_dtype=compute_dtype, max_len=max_len,
                                pad_token_id=tokenizer.pad_token_id or 0)
        requests, groups = prompts.span_requests(task, examples, preambles, tokenizer, max_len)
        scores = scorer.score(requests, on_batch=on_batch, on_compile=on_compile)
        correct = []
        for first, count, gold in groups:
            group = scores[first : first + count]
            if kind == "language_modeling":
                correct.append(group[0].all_argmax)
            else:
                losses = [score.mean_loss for score in group]
                correct.append(losses.index(min(losses)) == gold)
    return TaskResult(task.label, kind, num_fewshot, sum(correct) / len(correct), len(correct),
                      dataset_size=len(examples))


_generation_shapes: set = set()  # decode programs this process has compiled (see SpanScorer's)


def _generation_correct(model, tokenizer, task: ICLTask, raw, examples, preambles, *, batch_size: int, max_len: int,
                        compute_dtype, on_batch=None, on_compile=None) -> list[bool]:
    from jaxtrain.inference.generate import generate

    budget = prompts.answer_budget(tokenizer, raw, task.cot_delimiter)
    if budget >= max_len:
        raise ConfigError(f"{task.dataset_uri}: the longest answer takes {budget} tokens to generate, which leaves "
                          f"no room for a prompt in a sequence of {max_len}; raise max_seq_len (icl_seq_len)")
    prompt_tokens = prompts.generation_prompts(task, examples, preambles, tokenizer, max_len - budget)
    answers = [[example["answer"], *example.get("aliases", [])] for example in raw]
    signature = (program_signature(model), jnp.dtype(compute_dtype), batch_size, budget, tokenizer.eos_token_id,
                 tokenizer.pad_token_id or 0)
    correct = []
    for start in range(0, len(prompt_tokens), batch_size):
        # one compiled decode program per length bucket: prompts padded to the bucket, and the last
        # batch filled up with copies of its first prompt (their answers are not read)
        batch = prompt_tokens[start : start + batch_size]
        width = length_bucket(max(len(tokens) for tokens in batch), max_len - budget)
        if on_compile is not None and (signature, width) not in _generation_shapes:
            on_compile()
        result = generate(model, batch + [batch[0]] * (batch_size - len(batch)), max_new_tokens=budget,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0,
                          compute_dtype=compute_dtype, pad_to=width)
        _generation_shapes.add((signature, width))
        for offset, tokens in enumerate(result.tokens[: len(batch)]):
            output = tokenizer.decode(tokens, skip_special_tokens=True)
            correct.append(generation_correct(output, answers[start + offset],
                                              stopping_criteria=task.early_stopping_criteria or (),
                                              do_normalization=task.do_normalization,
                                              cot_delimiter=task.cot_delimiter))
        if on_batch is not None:
            on_batch()
    return correct

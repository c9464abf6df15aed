"""LLM Foundry's eval gauntlet: ICL accuracies folded into category scores and averages.

The YAML is Foundry's::

    eval_gauntlet:
      weighting: EQUAL            # or SAMPLE_SZ (weights by example count), LOG_SAMPLE_SZ (by its log2)
      subtract_random_baseline: true
      rescale_accuracy: true
      averages:                   # optional named averages of categories
        core_average: [world_knowledge]
      categories:
      - name: world_knowledge
        benchmarks:
        - {name: jeopardy, num_fewshot: 10, random_baseline: 0}

A benchmark's accuracy is the task's, or the mean over its categories for a ``has_categories``
task. Its score is ``accuracy - random_baseline``, divided by ``1 - random_baseline`` with
``rescale_accuracy`` (which needs the subtraction, as in Foundry). A category is the weighted mean
of its benchmarks' scores: weight 1, the benchmark's example count (the whole file, however many
were scored), or ``max(log2(count), 1)``. ``average`` is the mean of the categories, and each
named average the mean of the categories it lists.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from jaxtrain.algorithms.ema import evaluation_params
from jaxtrain.config import ConfigError
from jaxtrain.eval.icl import TaskResult, read_yaml, where
from jaxtrain.train.events import Callback, Event

WEIGHTINGS = ("EQUAL", "SAMPLE_SZ", "LOG_SAMPLE_SZ")


def load_gauntlet(spec, *, source: str | None = None) -> tuple[dict, str | None]:
    """The gauntlet mapping from a dict or a YAML path (with or without a top-level ``eval_gauntlet``)."""
    if isinstance(spec, str):
        source, spec = spec, read_yaml(spec)
    if isinstance(spec, dict) and "eval_gauntlet" in spec:
        spec = spec["eval_gauntlet"]
    if not isinstance(spec, dict) or not isinstance(spec.get("categories"), list):
        raise ConfigError(f"{where(source, spec)}: eval_gauntlet needs a 'categories' list")
    return spec, source


def _benchmark(benchmark, category: str, source: str | None) -> tuple[str, int, float]:
    """(name, num_fewshot, random_baseline) of a gauntlet benchmark entry, each of its type."""
    for field in ("name", "num_fewshot", "random_baseline"):
        if not isinstance(benchmark, dict) or field not in benchmark:
            raise ConfigError(f"{where(source, benchmark)}: gauntlet benchmark in category {category!r} is missing "
                              f"the field {field!r}")
    name, shots, baseline = benchmark["name"], benchmark["num_fewshot"], benchmark["random_baseline"]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where(source, benchmark)}: gauntlet benchmark name={name!r}: give the label of an ICL task")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise ConfigError(f"{where(source, benchmark)}: benchmark {name}: num_fewshot={shots!r} must be one whole "
                          f"number >= 0 (one entry per shot count)")
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)) or not 0.0 <= baseline < 1.0:
        raise ConfigError(f"{where(source, benchmark)}: benchmark {name}: random_baseline={baseline!r} must be a "
                          f"number in [0, 1) (the accuracy of guessing)")
    return name, shots, float(baseline)


def _weight(weighting: str, size: int) -> float:
    size = max(size, 1)
    if weighting == "SAMPLE_SZ":
        return float(size)
    if weighting == "LOG_SAMPLE_SZ":
        return max(math.log2(size), 1.0)
    return 1.0


def _averages(spec, categories: dict[str, float], source: str | None) -> dict[str, float]:
    """Foundry's named averages: each the mean of the listed categories."""
    named = spec.get("averages") or {}
    if not isinstance(named, dict):
        raise ConfigError(f"{where(source, spec)}: eval_gauntlet.averages must map names to lists of categories")
    names = [category["name"] for category in spec["categories"]]
    averages = {}
    for name, members in named.items():
        if name in names:
            raise ConfigError(f"{where(source, named)}: average {name!r} has a category's name; rename one of them")
        if not isinstance(members, list) or any(member not in names for member in members):
            unknown = [m for m in members if m not in names] if isinstance(members, list) else members
            raise ConfigError(f"{where(source, named)}: average {name!r} lists {unknown!r}, not among the "
                              f"categories ({', '.join(map(str, names))})")
        scores = [categories[member] for member in members if member in categories]
        averages[name] = sum(scores) / len(scores) if scores else 0.0
    return averages


def gauntlet_scores(spec, results: list[TaskResult], *, source: str | None = None) -> dict:
    """``{"benchmarks": {name/k-shot: score}, "categories": {name: score}, "average": score,
    "averages": {name: score}}``.

    ``spec`` is the gauntlet mapping or a YAML path; ``results`` must hold every benchmark it names.
    """
    spec, source = load_gauntlet(spec, source=source)
    weighting = str(spec.get("weighting", "EQUAL")).upper()
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"{where(source, spec)}: eval_gauntlet.weighting={weighting!r} is not one of "
                          f"{', '.join(WEIGHTINGS)}")
    subtract = bool(spec.get("subtract_random_baseline", True))
    rescale = bool(spec.get("rescale_accuracy", True))
    if rescale and not subtract:
        raise ConfigError(f"{where(source, spec)}: eval_gauntlet.rescale_accuracy (true by default) needs "
                          f"subtract_random_baseline: true; set rescale_accuracy: false to average raw accuracies")
    by_key: dict[tuple[str, int], list[TaskResult]] = {}
    for result in results:
        by_key.setdefault((result.label, result.num_fewshot), []).append(result)
    benchmarks: dict[str, float] = {}
    categories: dict[str, float] = {}
    named: set = set()
    for category in spec["categories"]:
        if not isinstance(category, dict) or "name" not in category or "benchmarks" not in category:
            raise ConfigError(f"{where(source, category)}: a gauntlet category needs 'name' and 'benchmarks'")
        if not isinstance(category["benchmarks"], list) or not category["benchmarks"]:
            raise ConfigError(f"{where(source, category)}: gauntlet category {category['name']!r} has no benchmarks "
                              f"(its score would be NaN); list its benchmarks or remove it")
        if category["name"] in named:
            raise ConfigError(f"{where(source, category)}: gauntlet category {category['name']!r} is named twice; "
                              f"give each category its own name")
        named.add(category["name"])
        scores, weights = [], []
        for benchmark in category["benchmarks"]:
            name, shots, baseline = _benchmark(benchmark, category["name"], source)
            group = by_key.get((name, shots))
            if not group:
                raise ConfigError(f"{where(source, benchmark)}: gauntlet benchmark {name} ({shots}-shot) was not "
                                  f"evaluated: add it to icl_tasks with that num_fewshot")
            score = sum(result.accuracy for result in group) / len(group)  # a has_categories task: their mean
            if subtract:
                score -= baseline
                if rescale:
                    score /= 1.0 - baseline
            benchmarks[f"{name}/{shots}-shot"] = score
            scores.append(score)
            weights.append(_weight(weighting, sum(result.dataset_size or result.num_examples for result in group)))
        if scores:
            categories[category["name"]] = sum(s * w for s, w in zip(scores, weights)) / sum(weights)
    average = sum(categories.values()) / len(categories) if categories else float("nan")
    return {"benchmarks": benchmarks, "categories": categories, "average": average,
            "averages": _averages(spec, categories, source)}


def run_icl_suite(model, tokenizer, tasks, *, gauntlet=None, batch_size: int = 8, max_len: int | None = None,
                  compute_dtype=None, gauntlet_source: str | None = None, subset_num_batches: int | None = None,
                  on_batch: Callable[[], None] | None = None, on_compile: Callable[[], None] | None = None) -> dict:
    """Every task at each of its ``num_fewshot`` settings (and, with ``has_categories``, each
    category), plus the gauntlet when given. ``subset_num_batches``: score only the first that many
    batches of each. ``on_batch`` / ``on_compile``: as in ``evaluate_task``.

    Returns ``{"tasks": [TaskResult, ...], "gauntlet": gauntlet_scores(...) or None}``.
    """
    import dataclasses

    import jax.numpy as jnp

    from jaxtrain.eval.icl import by_category, evaluate_task, questions_per_batch, read_examples

    compute_dtype = jnp.float32 if compute_dtype is None else compute_dtype
    results = []
    for task in tasks:
        examples = read_examples(task.dataset_uri, task.icl_task_type, require_category=task.has_categories)
        parts = by_category(examples) if task.has_categories else {None: examples}
        task_batch = task.batch_size or batch_size
        for shots in task.num_fewshot:
            for category, part in parts.items():
                limit = (None if subset_num_batches is None
                         else subset_num_batches * questions_per_batch(task, part, task_batch))
                result = evaluate_task(model, tokenizer, task, shots, examples=part, batch_size=task_batch,
                                       max_len=max_len, compute_dtype=compute_dtype, max_examples=limit,
                                       on_batch=on_batch, on_compile=on_compile)
                results.append(dataclasses.replace(result, category=category))
    scores = gauntlet_scores(gauntlet, results, source=gauntlet_source) if gauntlet is not None else None
    return {"tasks": results, "gauntlet": scores}


def flat_metrics(suite: dict) -> dict[str, float]:
    """Metric names for loggers: ``icl/<label>/<k>-shot`` (``/<category>`` per category of a
    ``has_categories`` task), ``icl/gauntlet/<category>``, ``icl/gauntlet/average`` and
    ``icl/gauntlet/<named average>``."""
    record = {f"icl/{result.key}": result.accuracy for result in suite["tasks"]}
    if suite.get("gauntlet"):
        record.update({f"icl/gauntlet/{name}": score for name, score in suite["gauntlet"]["categories"].items()})
        record["icl/gauntlet/average"] = suite["gauntlet"]["average"]
        record.update({f"icl/gauntlet/{name}": score for name, score in suite["gauntlet"].get("averages", {}).items()})
    return record


class ICLEvalCallback(Callback):
    """Runs ICL tasks (and the gauntlet) on the current parameters after each evaluation (``EVAL_END``).

    ``tasks`` is a tasks YAML path or a list of ``ICLTask``s or of ``icl_tasks`` mappings (as
    written inline in a config); the scores go to the run's metrics. ``subset_num_batches``:
    score only each task's first that many batches (Foundry's ``icl_subset_num_batches``).
    """

    def __init__(self, tasks, *, gauntlet=None, batch_size: int = 8, max_len: int | None = None,
                 subset_num_batches: int | None = None):
        from jaxtrain.eval.icl import (ICLTask, check_labels, load_tasks, read_examples, stopping_pattern,
                                       task_from_dict)

        self.gauntlet_source = gauntlet if isinstance(gauntlet, str) else None
        if isinstance(tasks, str):
            try:
                tasks, file_gauntlet = load_tasks(tasks)
            except ConfigError as err:
                raise ConfigError(f"icl_tasks: {err}") from None
            gauntlet = file_gauntlet if gauntlet is None else gauntlet
        elif not isinstance(tasks, (list, tuple)) or not tasks:
            raise ConfigError("icl_tasks: give a tasks YAML path or a non-empty list of task mappings")
        self.tasks = [task if isinstance(task, ICLTask) else task_from_dict(task, source="icl_tasks") for task in tasks]
        check_labels(self.tasks, "icl_tasks")
        self.gauntlet = gauntlet
        # Every task file is read now, and the gauntlet checked against the tasks, so that a missing
        # file, a bad example or a benchmark no task evaluates stops the run before it trains.
        planned = []
        for task in self.tasks:
            if task.icl_task_type == "generation_task_with_answers":
                stopping_pattern(task.early_stopping_criteria, where=f"icl_tasks: task {task.label!r}")
            try:
                examples = read_examples(task.dataset_uri, task.icl_task_type, require_category=task.has_categories)
            except ConfigError as err:
                raise ConfigError(f"icl_tasks: task {task.label!r}: {err}") from None
            planned += [TaskResult(task.label, task.icl_task_type, shots, 0.0, len(examples)) for shots in task.num_fewshot]
        if gauntlet is not None:
            gauntlet_scores(gauntlet, planned, source=self.gauntlet_source)
        if subset_num_batches is not None and subset_num_batches < 1:
            raise ConfigError(f"icl_subset_num_batches: {subset_num_batches} must be at least 1 (or null for all)")
        self.batch_size, self.max_len, self.subset_num_batches = batch_size, max_len, subset_num_batches
        self.last: dict[str, float] = {}

    def run_event(self, event: Event, loop) -> None:
        if event is not Event.EVAL_END:
            return
        from jaxtrain.train.step import COMPUTE_DTYPES

        model = loop.parts.model_def.merge(evaluation_params(loop.state))
        # The loop fires EVAL_END with its watchdog paused; each finished batch is progress that
        # arms it, and it is paused again before a batch whose program compiles first.
        watchdog = getattr(loop, "watchdog", None)
        # in the run's compute precision, as the held-out evaluation (and Foundry's) runs
        suite = run_icl_suite(model, loop.parts.tokenizer, self.tasks, gauntlet=self.gauntlet,
                              batch_size=self.batch_size, max_len=self.max_len or loop.cfg.icl_seq_len,
                              compute_dtype=COMPUTE_DTYPES[loop.cfg.precision], gauntlet_source=self.gauntlet_source,
                              subset_num_batches=self.subset_num_batches,
                              on_batch=watchdog.beat if watchdog is not None else None,
                              on_compile=watchdog.pause if watchdog is not None else None)
        self.last = flat_metrics(suite)
        loop._write_metrics(dict(self.last))
        loop.print("ICL: " + ", ".join(f"{name} {value:.3f}" for name, value in self.last.items()))

"""LLM Foundry's eval gauntlet: ICL accuracies folded into category scores and one average.

The YAML is Foundry's::

    eval_gauntlet:
      weighting: EQUAL            # or SAMPLE_SZ (weights by example count)
      subtract_random_baseline: true
      rescale_accuracy: true
      categories:
      - name: world_knowledge
        benchmarks:
        - {name: jeopardy, num_fewshot: 10, random_baseline: 0}

Each benchmark's score is ``(accuracy - random_baseline) / (1 - random_baseline)`` (with both
options on); a category is the weighted mean of its benchmarks; the average is the mean of the
categories.
"""

from __future__ import annotations

from jaxtrain.config import ConfigError
from jaxtrain.eval.icl import TaskResult, read_yaml, where
from jaxtrain.train.events import Callback, Event

WEIGHTINGS = ("EQUAL", "SAMPLE_SZ")


def load_gauntlet(spec, *, source: str | None = None) -> tuple[dict, str | None]:
    """The gauntlet mapping from a dict or a YAML path (with or without a top-level ``eval_gauntlet``)."""
    if isinstance(spec, str):
        source, spec = spec, read_yaml(spec)
    if isinstance(spec, dict) and "eval_gauntlet" in spec:
        spec = spec["eval_gauntlet"]
    if not isinstance(spec, dict) or not isinstance(spec.get("categories"), list):
        raise ConfigError(f"{where(source, spec)}: eval_gauntlet needs a 'categories' list")
    return spec, source


def gauntlet_scores(spec, results: list[TaskResult], *, source: str | None = None) -> dict:
    """``{"benchmarks": {name/k-shot: score}, "categories": {name: score}, "average": score}``.

    ``spec`` is the gauntlet mapping or a YAML path; ``results`` must hold every benchmark it names.
    """
    spec, source = load_gauntlet(spec, source=source)
    weighting = str(spec.get("weighting", "EQUAL")).upper()
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"{where(source, spec)}: eval_gauntlet.weighting={weighting!r} is not one of "
                          f"{', '.join(WEIGHTINGS)}")
    subtract = bool(spec.get("subtract_random_baseline", True))
    rescale = bool(spec.get("rescale_accuracy", True))
    by_key = {(result.label, result.num_fewshot): result for result in results}
    benchmarks: dict[str, float] = {}
    categories: dict[str, float] = {}
    for category in spec["categories"]:
        if not isinstance(category, dict) or "name" not in category or "benchmarks" not in category:
            raise ConfigError(f"{where(source, category)}: a gauntlet category needs 'name' and 'benchmarks'")
        scores, weights = [], []
        for benchmark in category["benchmarks"]:
            for field in ("name", "num_fewshot", "random_baseline"):
                if not isinstance(benchmark, dict) or field not in benchmark:
                    raise ConfigError(f"{where(source, benchmark)}: gauntlet benchmark in category "
                                      f"{category['name']!r} is missing the field {field!r}")
            name, shots, baseline = benchmark["name"], int(benchmark["num_fewshot"]), float(benchmark["random_baseline"])
            result = by_key.get((name, shots))
            if result is None:
                raise ConfigError(f"{where(source, benchmark)}: gauntlet benchmark {name} ({shots}-shot) was not "
                                  f"evaluated: add it to icl_tasks with that num_fewshot")
            if not 0.0 <= baseline < 1.0:
                raise ConfigError(f"{where(source, benchmark)}: random_baseline={baseline} must be in [0, 1)")
            score = result.accuracy
            if subtract:
                score -= baseline
                if rescale:
                    score /= 1.0 - baseline
            benchmarks[f"{name}/{shots}-shot"] = score
            scores.append(score)
            weights.append(float(result.num_examples) if weighting == "SAMPLE_SZ" else 1.0)
        if scores:
            categories[category["name"]] = sum(s * w for s, w in zip(scores, weights)) / sum(weights)
    average = sum(categories.values()) / len(categories) if categories else float("nan")
    return {"benchmarks": benchmarks, "categories": categories, "average": average}


def run_icl_suite(model, tokenizer, tasks, *, gauntlet=None, batch_size: int = 8, max_len: int | None = None,
                  compute_dtype=None, gauntlet_source: str | None = None, subset_num_batches: int | None = None) -> dict:
    """Every task at each of its ``num_fewshot`` settings, plus the gauntlet when given.
    ``subset_num_batches``: score only each task's first that many batches of examples.

    Returns ``{"tasks": [TaskResult, ...], "gauntlet": gauntlet_scores(...) or None}``.
    """
    import jax.numpy as jnp

    from jaxtrain.eval.icl import evaluate_task, read_examples

    compute_dtype = jnp.float32 if compute_dtype is None else compute_dtype
    results = []
    for task in tasks:
        examples = read_examples(task.dataset_uri, task.icl_task_type)
        task_batch = task.batch_size or batch_size
        limit = None if subset_num_batches is None else subset_num_batches * task_batch
        for shots in task.num_fewshot:
            results.append(evaluate_task(model, tokenizer, task, shots, examples=examples, batch_size=task_batch,
                                         max_len=max_len, compute_dtype=compute_dtype, max_examples=limit))
    scores = gauntlet_scores(gauntlet, results, source=gauntlet_source) if gauntlet is not None else None
    return {"tasks": results, "gauntlet": scores}


def flat_metrics(suite: dict) -> dict[str, float]:
    """Metric names for loggers: ``icl/<label>/<k>-shot``, ``icl/gauntlet/<category>``, ``icl/gauntlet/average``."""
    record = {f"icl/{result.key}": result.accuracy for result in suite["tasks"]}
    if suite.get("gauntlet"):
        record.update({f"icl/gauntlet/{name}": score for name, score in suite["gauntlet"]["categories"].items()})
        record["icl/gauntlet/average"] = suite["gauntlet"]["average"]
    return record


class ICLEvalCallback(Callback):
    """Runs ICL tasks (and the gauntlet) on the current parameters after each evaluation (``EVAL_END``).

    ``tasks`` is a tasks YAML path or a list of ``ICLTask``s or of ``icl_tasks`` mappings (as
    written inline in a config); the scores go to the run's metrics. ``subset_num_batches``:
    score only each task's first that many batches (Foundry's ``icl_subset_num_batches``).
    """

    def __init__(self, tasks, *, gauntlet=None, batch_size: int = 8, max_len: int | None = None,
                 subset_num_batches: int | None = None):
        from jaxtrain.eval.icl import ICLTask, load_tasks, read_examples, task_from_dict

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
        self.gauntlet = gauntlet
        # Every task file is read now, and the gauntlet checked against the tasks, so that a missing
        # file, a bad example or a benchmark no task evaluates stops the run before it trains.
        planned = []
        for task in self.tasks:
            try:
                examples = read_examples(task.dataset_uri, task.icl_task_type)
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

        model = loop.parts.model_def.merge(loop.state.params)
        # in the run's compute precision, as the held-out evaluation (and Foundry's) runs
        suite = run_icl_suite(model, loop.parts.tokenizer, self.tasks, gauntlet=self.gauntlet,
                              batch_size=self.batch_size, max_len=self.max_len or loop.cfg.icl_seq_len,
                              compute_dtype=COMPUTE_DTYPES[loop.cfg.precision], gauntlet_source=self.gauntlet_source,
                              subset_num_batches=self.subset_num_batches)
        self.last = flat_metrics(suite)
        loop._write_metrics(dict(self.last))
        loop.print("ICL: " + ", ".join(f"{name} {value:.3f}" for name, value in self.last.items()))

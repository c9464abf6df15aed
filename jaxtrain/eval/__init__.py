"""Evaluation: perplexity and LLM Foundry's in-context-learning tasks and eval gauntlet."""

from jaxtrain.eval.gauntlet import ICLEvalCallback, gauntlet_scores, run_icl_suite
from jaxtrain.eval.icl import ICLTask, TaskResult, evaluate_task, load_tasks, normalize_answer, read_examples
from jaxtrain.eval.perplexity import SpanScorer, perplexity, text_batches

__all__ = [
    "ICLEvalCallback", "ICLTask", "SpanScorer", "TaskResult", "evaluate_task", "gauntlet_scores", "load_tasks",
    "normalize_answer", "perplexity", "read_examples", "run_icl_suite", "text_batches",
]

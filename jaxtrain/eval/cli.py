"""``jaxtrain eval``: perplexity and in-context-learning accuracy of a checkpoint.

    jaxtrain eval --checkpoint runs/x/checkpoints --tasks tasks.yaml --out results.json
    jaxtrain eval --checkpoint DIR --task piqa.jsonl --type multiple_choice --num-fewshot 5
    jaxtrain eval --checkpoint DIR --perplexity-data held_out.txt docs.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

from jaxtrain.config import ConfigError
from jaxtrain.eval.icl import TASK_FIELDS, ICLTask
from jaxtrain.tempfiles import check_output_file, temp_path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtrain eval", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="jaxtrain checkpoint folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default the newest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default the one beside the checkpoint)")
    parser.add_argument("--tasks", default=None, help="YAML with Foundry's icl_tasks (and optionally eval_gauntlet)")
    parser.add_argument("--task", action="append", default=[], help="one JSONL task file (repeatable)")
    parser.add_argument("--type", default=None, choices=sorted(TASK_FIELDS),
                        help="type of --task files (default multiple_choice)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="demonstrations per example for --task "
                        "(and overriding --tasks; default 0)")
    parser.add_argument("--example-delimiter", default="\n", help="between demonstrations (--task)")
    parser.add_argument("--continuation-delimiter", default=" ", help="between context and answer (--task)")
    parser.add_argument("--gauntlet", default=None, help="Foundry eval_gauntlet YAML")
    parser.add_argument("--perplexity-data", nargs="+", default=[], help="text or JSONL files/folders/globs")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (--perplexity-data)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (default the model's max_seq_len)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per compiled forward")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser


def _tasks(args) -> tuple[list[ICLTask], object, str | None]:
    from jaxtrain.eval.icl import load_tasks, read_examples

    tasks, gauntlet, gauntlet_source = [], None, None
    if args.tasks:
        tasks, gauntlet = load_tasks(args.tasks)
        gauntlet_source = args.tasks
        if args.num_fewshot is not None:
            for task in tasks:
                task.num_fewshot = [args.num_fewshot]
    kind = args.type or "multiple_choice"
    for path in args.task:
        label = os.path.splitext(os.path.basename(path))[0]
        read_examples(path, kind, kind_fix=f"pass --type (now {kind})")  # read now: its mistakes name the flag
        tasks.append(ICLTask(label=label, dataset_uri=path, icl_task_type=kind,
                             num_fewshot=[args.num_fewshot or 0], example_delimiter=args.example_delimiter,
                             continuation_delimiter=args.continuation_delimiter))
    if args.gauntlet:
        gauntlet, gauntlet_source = args.gauntlet, args.gauntlet
    if gauntlet is not None:  # checked against the tasks as if each had run, before any does
        from jaxtrain.eval.gauntlet import gauntlet_scores
        from jaxtrain.eval.icl import TaskResult

        planned = [TaskResult(task.label, task.icl_task_type, shots, 0.0, 1) for task in tasks for shots in task.num_fewshot]
        gauntlet_scores(gauntlet, planned, source=gauntlet_source)
    return tasks, gauntlet, gauntlet_source


def _perplexity(args, model, tokenizer, compute_dtype) -> dict:
    from jaxtrain.data.sources import JSONL_SUFFIXES, jsonl_documents, text_documents
    from jaxtrain.eval.perplexity import perplexity, text_batches

    def texts():
        for local in args.perplexity_data:
            is_jsonl = local.endswith(JSONL_SUFFIXES)
            documents = (jsonl_documents(local, "eval", text_field=args.text_field, key="--perplexity-data",
                                         field_key="--text-field")
                         if is_jsonl else text_documents(local, "eval", key="--perplexity-data"))
            yield from documents.texts()

    seq_len = min(args.seq_len or model.max_seq_len, model.max_seq_len)
    batches = text_batches((tokenizer.encode(text) for text in texts()), seq_len=seq_len,
                           batch_size=args.batch_size, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id or 0,
                           separate_documents=bool(getattr(model, "attn_uses_sequence_id", False)))
    return perplexity(model, batches, compute_dtype=compute_dtype)


def format_table(results: dict) -> str:
    """The results as an aligned plain-text table."""
    rows = [("metric", "value")]
    if results.get("perplexity"):
        rows += [("perplexity", f"{results['perplexity']['perplexity']:.4f}"),
                 ("cross_entropy", f"{results['perplexity']['cross_entropy']:.4f}")]
    rows += [(f"{task['label']}/{task['num_fewshot']}-shot" + (f"/{task['category']}" if task.get("category") else "")
              + f" ({task['icl_task_type']}, n={task['num_examples']})", f"{task['accuracy']:.4f}")
             for task in results.get("tasks", [])]
    gauntlet = results.get("gauntlet")
    if gauntlet:
        rows += [(f"gauntlet/{name}", f"{score:.4f}") for name, score in gauntlet["categories"].items()]
        rows.append(("gauntlet/average", f"{gauntlet['average']:.4f}"))
        rows += [(f"gauntlet/{name}", f"{score:.4f}") for name, score in gauntlet.get("averages", {}).items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def check_args(args: argparse.Namespace) -> None:
    """Refuse out-of-range numeric options before the checkpoint is read."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be positive (rows per forward)")
    if args.seq_len is not None and args.seq_len < 2:
        raise ConfigError(f"--seq-len {args.seq_len}: must be at least 2 (or leave it out for the model's max_seq_len)")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {args.num_fewshot}: must be >= 0")
    if args.step is not None and args.step < 0:
        raise ConfigError(f"--step {args.step}: must be >= 0")
    if args.type is not None and not args.task:
        raise ConfigError(f"--type {args.type}: it is the kind of --task files; the tasks of --tasks name their own "
                          f"icl_task_type")


def check_vocabulary(tokenizer, vocab_size: int, what: str) -> None:
    """Refuse a tokenizer with token ids the model has no embedding for (ids ``0..vocab_size-1``): its
    scores would be NaN or meaningless rather than an error."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    largest = max(vocab.values(), default=-1)
    if largest >= vocab_size:
        raise ConfigError(f"{what}: token id {largest} is outside the model's vocabulary (0..{vocab_size - 1}; "
                          f"the tokenizer has {len(vocab)} tokens); pass the tokenizer the model was trained with")


def json_safe(value):
    """``value`` with every non-finite float (NaN, inf) as ``None``, so that it is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_results(results: dict, path: str) -> str | None:
    """Write ``results`` as strict JSON (a non-finite number as null) to ``path``, whole or not at all. If
    that fails, they go to a file in the temporary folder instead, whose path is returned with the reason,
    so the evaluation is not lost."""
    import tempfile


    text = json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n"
    tmp = temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
        return None
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = f"--out {path}: cannot write the results ({error.strerror or error})"
        try:
            handle, fallback = tempfile.mkstemp(prefix="jaxtrain-eval-", suffix=".json")
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
        except OSError:
            return f"{reason}, nor in the temporary folder; the table above holds them"
        return f"{reason}; they were saved to {fallback}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import dataclasses

        import jax.numpy as jnp

        from jaxtrain.checkpoint.load import load_checkpoint
        from jaxtrain.data.tokenizer import tokenizer_from_file
        from jaxtrain.eval.gauntlet import run_icl_suite

        check_args(args)
        given_tokenizer = (tokenizer_from_file(args.tokenizer, what="--tokenizer") if args.tokenizer
                           else None)  # before the slow load
        tasks, gauntlet, gauntlet_source = _tasks(args)
        if not tasks and not args.perplexity_data:
            raise ConfigError("nothing to evaluate: pass --tasks, --task or --perplexity-data")
        if args.out:
            check_output_file(args.out)
        loaded = load_checkpoint(args.checkpoint, args.step)
        if given_tokenizer is None and loaded.tokenizer_path is None:
            raise ConfigError(f"{args.checkpoint}: no tokenizer.json beside the checkpoint; pass --tokenizer PATH")
        tokenizer = given_tokenizer if given_tokenizer is not None else loaded.tokenizer()
        check_vocabulary(tokenizer, loaded.model_cfg.vocab_size,
                         f"--tokenizer {args.tokenizer}" if given_tokenizer is not None
                         else f"{loaded.tokenizer_path} (the checkpoint's tokenizer)")
        model = loaded.merged().module()
        compute_dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
        results: dict = {"checkpoint": args.checkpoint, "step": loaded.step,
                         "weights": "moving average (algorithms.ema)" if loaded.averaged else "trained"}
        if args.perplexity_data:
            results["perplexity"] = _perplexity(args, model, tokenizer, compute_dtype)
        if tasks:
            suite = run_icl_suite(model, tokenizer, tasks, gauntlet=gauntlet, batch_size=args.batch_size,
                                  max_len=args.seq_len, compute_dtype=compute_dtype, gauntlet_source=gauntlet_source)
            results["tasks"] = [dataclasses.asdict(result) for result in suite["tasks"]]
            results["gauntlet"] = suite["gauntlet"]
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        from jaxtrain.train.microbatch import is_out_of_memory, out_of_memory_line

        if not is_out_of_memory(error):
            raise
        seq_len = "the model's max_seq_len" if args.seq_len is None else args.seq_len
        print("error: " + out_of_memory_line(
            error, f"lower --batch-size (now {args.batch_size}) or --seq-len (now {seq_len})"
            + ("" if args.precision == "bf16" else ", or add --precision bf16")), file=sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        failure = write_results(results, args.out)
        if failure:
            print(f"error: {failure}", file=sys.stderr)
            return 2
    return 0

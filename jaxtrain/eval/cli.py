"""``jaxtrain eval``: perplexity and in-context-learning accuracy of a checkpoint.

    jaxtrain eval --checkpoint runs/x/checkpoints --tasks tasks.yaml --out results.json
    jaxtrain eval --checkpoint DIR --task piqa.jsonl --type multiple_choice --num-fewshot 5
    jaxtrain eval --checkpoint DIR --perplexity-data held_out.txt docs.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxtrain.config import ConfigError
from jaxtrain.eval.icl import TASK_FIELDS, ICLTask


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtrain eval", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="jaxtrain checkpoint folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default the newest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default the one beside the checkpoint)")
    parser.add_argument("--tasks", default=None, help="YAML with Foundry's icl_tasks (and optionally eval_gauntlet)")
    parser.add_argument("--task", action="append", default=[], help="one JSONL task file (repeatable)")
    parser.add_argument("--type", default="multiple_choice", choices=sorted(TASK_FIELDS), help="type of --task files")
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
    from jaxtrain.eval.icl import load_tasks

    tasks, gauntlet, gauntlet_source = [], None, None
    if args.tasks:
        tasks, gauntlet = load_tasks(args.tasks)
        gauntlet_source = args.tasks
        if args.num_fewshot is not None:
            for task in tasks:
                task.num_fewshot = [args.num_fewshot]
    for path in args.task:
        label = os.path.splitext(os.path.basename(path))[0]
        tasks.append(ICLTask(label=label, dataset_uri=path, icl_task_type=args.type,
                             num_fewshot=[args.num_fewshot or 0], example_delimiter=args.example_delimiter,
                             continuation_delimiter=args.continuation_delimiter))
    if args.gauntlet:
        gauntlet, gauntlet_source = args.gauntlet, args.gauntlet
    return tasks, gauntlet, gauntlet_source


def _perplexity(args, model, tokenizer, compute_dtype) -> dict:
    from jaxtrain.data.sources import JSONL_SUFFIXES, jsonl_documents, text_documents
    from jaxtrain.eval.perplexity import perplexity, text_batches

    def texts():
        for local in args.perplexity_data:
            is_jsonl = local.endswith(JSONL_SUFFIXES)
            documents = (jsonl_documents(local, "eval", text_field=args.text_field, key="--perplexity-data")
                         if is_jsonl else text_documents(local, "eval", key="--perplexity-data"))
            yield from documents.texts()

    seq_len = min(args.seq_len or model.max_seq_len, model.max_seq_len)
    batches = text_batches((tokenizer.encode(text) for text in texts()), seq_len=seq_len,
                           batch_size=args.batch_size, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id or 0)
    return perplexity(model, batches, compute_dtype=compute_dtype)


def format_table(results: dict) -> str:
    """The results as an aligned plain-text table."""
    rows = [("metric", "value")]
    if results.get("perplexity"):
        rows += [("perplexity", f"{results['perplexity']['perplexity']:.4f}"),
                 ("cross_entropy", f"{results['perplexity']['cross_entropy']:.4f}")]
    rows += [(f"{task['label']}/{task['num_fewshot']}-shot ({task['icl_task_type']}, n={task['num_examples']})",
              f"{task['accuracy']:.4f}") for task in results.get("tasks", [])]
    gauntlet = results.get("gauntlet")
    if gauntlet:
        rows += [(f"gauntlet/{name}", f"{score:.4f}") for name, score in gauntlet["categories"].items()]
        rows.append(("gauntlet/average", f"{gauntlet['average']:.4f}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import dataclasses

        import jax.numpy as jnp
        import tokenizers

        from jaxtrain.checkpoint.load import load_checkpoint
        from jaxtrain.data.tokenizer import Tokenizer
        from jaxtrain.eval.gauntlet import run_icl_suite

        tasks, gauntlet, gauntlet_source = _tasks(args)
        if not tasks and not args.perplexity_data:
            raise ConfigError("nothing to evaluate: pass --tasks, --task or --perplexity-data")
        loaded = load_checkpoint(args.checkpoint, args.step)
        tokenizer_path = args.tokenizer or loaded.tokenizer_path
        if tokenizer_path is None:
            raise ConfigError(f"{args.checkpoint}: no tokenizer.json beside the checkpoint; pass --tokenizer PATH")
        tokenizer = Tokenizer(tokenizers.Tokenizer.from_file(tokenizer_path))
        model = loaded.module()
        compute_dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
        results: dict = {"checkpoint": args.checkpoint, "step": loaded.step}
        if args.perplexity_data:
            results["perplexity"] = _perplexity(args, model, tokenizer, compute_dtype)
        if tasks:
            suite = run_icl_suite(model, tokenizer, tasks, gauntlet=gauntlet, batch_size=args.batch_size,
                                  max_len=args.seq_len, compute_dtype=compute_dtype, gauntlet_source=gauntlet_source)
            results["tasks"] = [dataclasses.asdict(result) for result in suite["tasks"]]
            results["gauntlet"] = suite["gauntlet"]
    except (ConfigError, ValueError) as error:
        print(f"jaxtrain eval: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
            handle.write("\n")
    return 0

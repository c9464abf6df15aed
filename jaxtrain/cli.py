"""The ``jaxtrain`` console script: ``jaxtrain <command> [options]``."""

from __future__ import annotations

import os
import sys

USAGE = """usage: jaxtrain <command> [options]

commands:
  train     train a model: jaxtrain train --config configs/quickstart.yaml [--set key=value ...]
  data prepare  tokenize text/JSONL/TFDS/MDS into MDS shards: jaxtrain data prepare --help
  convert   Hugging Face MPT <-> jaxtrain checkpoint: jaxtrain convert SRC DST [--to hf]
  generate  sample from a checkpoint: jaxtrain generate --checkpoint DIR --prompt "def "
  eval      perplexity and in-context-learning tasks: jaxtrain eval --checkpoint DIR --tasks tasks.yaml
  bench     time training on this hardware: jaxtrain bench --config configs/quickstart.yaml --out bench.json
  plan      scaling-law and cost planner: jaxtrain plan --budget-usd 50000 --hardware h100
"""


def _underscore_flag(arg: str) -> str:
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + sep + value


def run(argv: list[str] | None = None) -> None:
    from jaxtrain.interrupt import EXIT_INTERRUPTED, was_interrupted

    try:
        _run(argv)
    except BaseException as err:  # noqa: BLE001 - only an interrupt is turned into a line
        if not was_interrupted(err):
            raise
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)


def _run(argv: list[str] | None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    for arg in argv:  # the OS hands undecodable bytes over as lone surrogates, which no text step can take
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            print(f"error: the argument {os.fsencode(arg)!r} is not valid UTF-8 text; pass it in UTF-8",
                  file=sys.stderr)
            sys.exit(2)
    command, rest = argv[0], argv[1:]
    if command != "train":  # training sets it up itself, after starting its data on a process of its own
        from jaxtrain.train.host_allocator import retain_freed_memory

        retain_freed_memory()  # before JAX starts its threads
    if command == "train":
        from jaxtrain import main

        # absl flags use underscores; accept the dashed spelling too (--max-restarts).
        rest = [_underscore_flag(arg) for arg in rest]
        sys.argv = ["jaxtrain train", *rest]
        main.run()
    elif command == "data" and rest[:1] == ["prepare"]:
        from jaxtrain.data.prepare_cli import main as prepare_main

        sys.exit(prepare_main(rest[1:]))
    elif command == "convert":
        from jaxtrain.convert.cli import main as convert_main

        sys.exit(convert_main(rest))
    elif command == "generate":
        from jaxtrain.inference.cli import main as generate_main

        sys.exit(generate_main(rest))
    elif command == "eval":
        from jaxtrain.eval.cli import main as eval_main

        sys.exit(eval_main(rest))
    elif command == "bench":
        from jaxtrain.train.bench import main as bench_main

        sys.exit(bench_main(rest))
    elif command == "plan":
        from jaxtrain.plan.cli import main as plan_main

        sys.exit(plan_main(rest))
    else:
        print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()

"""Entry point: ``python -m jaxtrain.main --config configs/quickstart.yaml [--set key=value ...]``."""

from __future__ import annotations

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Path to a YAML config file.")
flags.DEFINE_multi_string("set", [], "Override a config value: --set dotted.key=value (repeatable).")
flags.DEFINE_bool("help_config", False, "List every config key with its type, default and meaning.")


def main(argv: list[str]) -> None:
    # JAX and Orbax log set-up details at INFO; the run reports its own progress.
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; use --config PATH and --set key=value", file=sys.stderr)
        sys.exit(2)
    if FLAGS.help_config:
        from jaxtrain.config import Config, describe

        print(describe(Config))
        return
    from jaxtrain.train.command import train_command

    sys.exit(train_command(FLAGS.config, FLAGS.set))


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()

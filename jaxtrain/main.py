"""Entry point: ``python -m jaxtrain.main --config configs/quickstart.yaml [--set key=value ...]``."""

from __future__ import annotations

import os
import sys
import traceback

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Path to a YAML config file.")
flags.DEFINE_multi_string("set", [], "Override a config value: --set dotted.key=value (repeatable).")
flags.DEFINE_bool("help_config", False, "List every config key with its type, default and meaning.")
flags.DEFINE_integer("max_restarts", 0, "Supervise the run: restart it after a crash, hang or preemption, up to N times.")
flags.DEFINE_float("restart_backoff", 5.0, "Seconds before the first restart; doubles after each one.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (or JAXTRAIN_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (or JAXTRAIN_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id (or JAXTRAIN_PROCESS_ID).")


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
    if FLAGS.max_restarts > 0:  # the supervisor only watches; the child it starts joins the cluster
        from jaxtrain.train.supervisor import supervise

        passed = [f"--{name}={FLAGS[name].value}" for name in ("coordinator_address", "num_processes", "process_id")
                  if FLAGS[name].present]
        sys.exit(supervise(FLAGS.config, FLAGS.set, max_restarts=FLAGS.max_restarts,
                           backoff_seconds=FLAGS.restart_backoff, extra_args=passed))
    from jaxtrain.parallel.distributed import DistributedError, detect_cluster, env_with_flags, initialize_from_env
    from jaxtrain.train.host_allocator import retain_freed_memory

    env = env_with_flags(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
        single_process = detect_cluster(env) is None
    except DistributedError:
        single_process = False  # reported just below
    data_prefetch = None
    if single_process:  # before JAX is imported: a forked child tokenizes while this process imports and compiles
        from jaxtrain.train.data_prefetch import prefetch_for_command

        data_prefetch = prefetch_for_command(FLAGS.config, FLAGS.set)
    retain_freed_memory()  # before JAX starts its threads
    try:  # before any JAX computation: every process must see the whole cluster's devices
        initialize_from_env(env)
    except DistributedError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    from jaxtrain.parallel import failures
    from jaxtrain.train.command import train_command

    if not failures.multi_process():
        sys.exit(train_command(FLAGS.config, FLAGS.set, data_prefetch=data_prefetch))
    # A multi-host run: a process that stops on an error tells the others and leaves at once (JAX's
    # shutdown would wait for them); one that finds another stopped says which and why.
    try:
        code = train_command(FLAGS.config, FLAGS.set, data_prefetch=data_prefetch)
    except Exception as err:  # noqa: BLE001 - reported below, then the process leaves
        failure = failures.peer_failure()
        if failure is None:
            traceback.print_exc()
            failures.note(f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}")
        else:
            print(f"error: {failure}; this process stopped too", file=sys.stderr, flush=True)
        code = 1 if failure is None else 2
    if code in (0, 130, 143):  # finished, or stopped together at one step
        sys.exit(code)
    failures.announce(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a flag mistake reported as one line and status 2 (absl's own: 1)."""
    try:
        return FLAGS(argv)
    except flags.Error as err:
        print(f"error: {err}; see --help", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    from jaxtrain.interrupt import EXIT_INTERRUPTED, INTERRUPTED_AT_START, was_interrupted

    try:
        app.run(main, flags_parser=parse_flags)
    except BaseException as err:  # noqa: BLE001 - only an interrupt is turned into a line
        if not was_interrupted(err):
            raise
        print(INTERRUPTED_AT_START, file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    run()

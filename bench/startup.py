"""Time to the first step of `python -m jaxtrain.main`, by phase, alternating variants.

    python bench/startup.py --rounds 4
    python bench/startup.py --rounds 4 --variant off:JAXTRAIN_DATA_PREFETCH=0 --variant on:
    git worktree add /tmp/base HEAD~3 && python bench/startup.py --variant base@/tmp/base: --variant head:
    python bench/startup.py --rounds 3 --busy 1

Each round runs every variant once, in a fresh run folder, with ``--set max_duration=2ba``
(and the --set overrides given). A variant is ``name[@checkout]:VAR=value,VAR=value``:
environment settings (none for the code as it is), and optionally another checkout of jaxtrain
to run from (``python -m`` imports the package from its working directory first). Printed per run: when the resolved config, the memory
report (the model built and the train step compiled), the step-0 evaluation and the first step's
line appeared, seconds after launch, and the run's own "first step done" figure (from process
start); then the medians per variant. The machine's load average is printed beside each run:
compare variants only within one invocation on a shared machine.

``--busy N`` keeps N busy processes (a Python loop each, at normal priority) running beside every
run, as other users' work would on a shared machine; they start before the first round and are
stopped at the end.

``--cores`` (Linux) also samples the CPU time of the run and its child processes (the forked
data process) every 0.1 s and prints, per run, the cores busy in each phase (CPU seconds over
wall seconds, from launch to the config, to the model built, to the step-0 evaluation, to the
first step) and the CPU seconds spent before the first step: a phase near the machine's core
count is bound by CPU work, one well below it is waiting.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from jaxtrain.train.data_prefetch import process_cpu

MARKS = (("config", "resolved config"), ("built", "memory per device"), ("eval0", "step 0: held-out"),
         ("step1", "step 1/"))


def parse_variant(text: str) -> tuple[str, str | None, dict[str, str]]:
    label, _, settings = text.partition(":")
    name, _, checkout = label.partition("@")
    if checkout and not os.path.isfile(os.path.join(checkout, "jaxtrain", "main.py")):
        raise SystemExit(f"error: --variant {text!r}: {checkout} is not a jaxtrain checkout")
    env = {}
    for item in filter(None, settings.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --variant {text!r}: settings are VAR=value, separated by commas")
        env[key.strip()] = value
    return name or "as-is", checkout or None, env


class TreeCPU:
    """CPU seconds (user + system) of a process and its descendants, sampled on a thread.

    A descendant that has exited keeps its last sample (its final ~0.1 s may be missed); the
    ``cutime`` fields are not read, so a reaped child is never counted twice."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> float:
        family, stats = {self.pid}, {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (stat := process_cpu(int(entry))) is not None:
                stats[int(entry)] = stat  # (parent pid, CPU seconds)
        grown = True
        while grown:
            grown = False
            for pid, (ppid, _) in stats.items():
                if ppid in family and pid not in family:
                    family.add(pid)
                    grown = True
        for pid in family:
            if pid in stats:
                self._last[pid] = stats[pid][1]
        return sum(self._last.values())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def busy_processes(count: int):
    """``count`` processes each spinning one core at normal priority until the block ends."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield [spinner.pid for spinner in spinners]
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def run_once(config: str, overrides: list[str], env: dict[str, str], folder: str,
             checkout: str | None = None, cores: bool = False) -> dict[str, float]:
    command = [sys.executable, "-m", "jaxtrain.main", "--config", config, "--set", "max_duration=2ba",
               "--set", f"run_folder={folder}/run", "--set", f"save_folder={folder}/checkpoints"]
    for item in overrides:
        command += ["--set", item]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **env}, cwd=checkout)
    seen: dict[str, float] = {}
    cpu_at: dict[str, float] = {}
    tree = TreeCPU(process.pid) if cores else None
    output = []
    for line in process.stdout:
        output.append(line)
        for name, prefix in MARKS:
            if name not in seen and line.startswith(prefix):
                seen[name] = time.perf_counter() - started
                if tree is not None:
                    cpu_at[name] = tree.sample()
        if match := re.search(r"first step done ([0-9.]+)s after start", line):
            seen["first_step"] = float(match.group(1))
    if tree is not None:
        tree.stop()
    if process.wait() != 0 or "first_step" not in seen:
        raise SystemExit("error: the run failed:\n" + "".join(output[-20:]))
    previous_time = previous_cpu = 0.0
    for name, _ in MARKS:
        if name in cpu_at:
            seen[f"cores:{name}"] = (cpu_at[name] - previous_cpu) / max(seen[name] - previous_time, 1e-9)
            previous_time, previous_cpu = seen[name], cpu_at[name]
    if "step1" in cpu_at:
        seen["cpu_s"] = cpu_at["step1"]
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="config override (repeatable)")
    parser.add_argument("--variant", action="append", default=[], help="name:VAR=value,... (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cores", action="store_true", help="also print the cores busy in each phase (Linux)")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="run N busy processes beside every run (a shared machine's other work)")
    args = parser.parse_args(argv)
    if args.busy < 0:
        raise SystemExit("error: --busy must be 0 or more")
    if args.cores and not os.path.isdir("/proc/self"):
        raise SystemExit("error: --cores reads /proc (Linux only)")
    variants = [parse_variant(text) for text in args.variant] or [("as-is", None, {})]
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
    columns = [name for name, _ in MARKS] + ["first_step"]
    if args.busy:
        print(f"{args.busy} busy process{'es' if args.busy > 1 else ''} beside every run", flush=True)
    with busy_processes(args.busy):
        run_rounds(args, variants, results, columns)
    print("medians:")
    for name, runs in results.items():
        medians = [statistics.median(run.get(column, float("nan")) for run in runs) for column in columns]
        print(f"{name:>10} {'':5} " + " ".join(f"{value:10.2f}" for value in medians))
    return 0


def run_rounds(args, variants, results, columns) -> None:
    """Each round runs every variant once; a run's figures go into ``results[variant]``."""
    print(f"{'variant':>10} {'load':>5} " + " ".join(f"{column:>10}" for column in columns), flush=True)
    for _ in range(args.rounds):
        for name, checkout, env in variants:
            with tempfile.TemporaryDirectory(prefix="jaxtrain-startup-") as folder:
                load = os.getloadavg()[0]
                seen = run_once(args.config, args.overrides, env, folder, checkout, cores=args.cores)
            results[name].append(seen)
            print(f"{name:>10} {load:5.2f} " + " ".join(f"{seen.get(column, float('nan')):10.2f}" for column in columns),
                  flush=True)
            if args.cores:
                print(f"{'cores':>16} " + " ".join(f"{seen.get('cores:' + mark, float('nan')):10.2f}" for mark, _ in MARKS)
                      + f" {seen.get('cpu_s', float('nan')):7.1f} CPU s", flush=True)


if __name__ == "__main__":
    sys.exit(main())

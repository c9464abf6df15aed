"""jaxtrain against PyTorch (transformers' MptForCausalLM), alternating the two in one invocation
so both see the same machine load; prints medians and the ratio. With ``--maxtext`` MaxText
(``bench/maxtext_throughput.py``, in its own environment) joins each round as well.

    .venv/bin/python bench/compare_torch.py --shape s --precision bf16 --rounds 3 --steps 4

Each round runs ``bench/train_throughput.py`` and ``bench/torch_mpt_throughput.py`` once each
(in that order, then reversed the next round), as separate processes. jaxtrain runs with its
default CPU host-allocator setting (``jaxtrain/train/host_allocator.py``); ``--torch-retained``
adds a third process per round: PyTorch with the equivalent glibc settings
(``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_``), so the comparison can be read both ways.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


RETAINED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def run(command: list[str], extra_env: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, **(extra_env or {}))
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="xs", choices=("xs", "s"))
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--torch-python", default=os.path.join(ROOT, ".venv-ref", "bin", "python"))
    parser.add_argument("--maxtext", action="store_true", help="also run MaxText each round")
    parser.add_argument("--maxtext-python", default="/work/maxtext-venv/bin/python",
                        help="the environment MaxText is installed in (see bench/maxtext_throughput.py)")
    parser.add_argument("--torch-retained", action="store_true",
                        help="also run PyTorch with glibc keeping freed memory (as jaxtrain does on CPU)")
    args = parser.parse_args(argv)
    common = ["--shape", args.shape, "--precision", args.precision, "--steps", str(args.steps)]
    jax_cmd = [sys.executable, os.path.join(HERE, "train_throughput.py"), *common, "--no-microbench"]
    torch_cmd = [args.torch_python, os.path.join(HERE, "torch_mpt_throughput.py"), *common]
    rates: dict[str, list[float]] = {"jaxtrain": [], "torch": []}
    maxtext_cmd = [args.maxtext_python, os.path.join(HERE, "maxtext_throughput.py"), *common]
    if args.torch_retained:
        rates["torch-ret"] = []
    if args.maxtext:
        rates["maxtext"] = []
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {args.shape} {args.precision}; load {load_average()}", flush=True)
    for round_index in range(args.rounds):
        order = [("jaxtrain", jax_cmd, None), ("torch", torch_cmd, None)]
        if args.torch_retained:
            order.append(("torch-ret", torch_cmd, RETAINED_MALLOC))
        if args.maxtext:
            order.append(("maxtext", maxtext_cmd, None))
        for name, command, extra_env in order if round_index % 2 == 0 else order[::-1]:
            result = run(command, extra_env)
            rates[name].append(result["tokens_per_s"])
            print(f"  round {round_index + 1} {name:<9} {result['tokens_per_s']:8,.0f} tok/s "
                  f"(step spread {result['step_s_min']:.2f}-{result['step_s_max']:.2f} s; load {load_average()})",
                  flush=True)  # fmt: skip
    jax_median, torch_median = statistics.median(rates["jaxtrain"]), statistics.median(rates["torch"])
    print(f"{args.shape} {args.precision}: jaxtrain {jax_median:,.0f} tok/s, torch {torch_median:,.0f} tok/s, "
          f"ratio jaxtrain/torch {jax_median / torch_median:.2f}; load {load_average()}")  # fmt: skip
    if args.torch_retained:
        retained = statistics.median(rates["torch-ret"])
        print(f"{args.shape} {args.precision}: torch with retained malloc {retained:,.0f} tok/s, "
              f"ratio jaxtrain/torch-retained {jax_median / retained:.2f}")
    if args.maxtext:
        maxtext = statistics.median(rates["maxtext"])
        print(f"{args.shape} {args.precision}: MaxText {maxtext:,.0f} tok/s, ratio jaxtrain/MaxText {jax_median / maxtext:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

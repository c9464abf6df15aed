"""What a LoRA run's checkpoints cost with and without the frozen weights.

    python bench/lora_checkpoints.py                       # the quickstart widened to about 110M parameters
    python bench/lora_checkpoints.py --set model.n_layers=4

Trains the quickstart (its data and tokenizer, with the --set overrides) for one batch and saves
it: the base. Then runs LoRA (rank 8 on every linear layer) from it with ``load_path`` for three
batches, saving after each, twice: checkpoints without the frozen weights (the default) and with
them (``save_frozen_weights: true``). Prints per variant the bytes of one checkpoint step, the
run's wall time, and what reading the last checkpoint back takes (``load_checkpoint``, as
``generate``, ``eval`` and ``convert`` read it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

WIDE = ["model.d_model=1024", "model.n_heads=16", "model.n_layers=8"]
COMMON = ["variables.max_seq_len=128", "global_train_batch_size=4", "device_train_microbatch_size=4", "eval_interval=0", "progress_bar=false",
          "log_to_console=false"]


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(where, name)) for where, _, names in os.walk(folder) for name in names)


def run(sets: list[str], cwd: str) -> float:
    argv = [sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"]
    for item in sets:
        argv += ["--set", item]
    start = time.perf_counter()
    subprocess.run(argv, check=True, cwd=cwd, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=None, help="config override for every run")
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sets = COMMON + (WIDE if args.set is None else args.set)
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        run(sets + ["max_duration=1ba", f"save_folder={base}", f"run_folder={tmp}/base-run"], root)
        print(f"base checkpoint: {folder_bytes(os.path.join(base, '1')) / 1e6:.1f} MB (weights and optimizer state)")
        lora = sets + [f"load_path={base}", "model.peft_config={r: 8, lora_alpha: 16, target_modules: all-linear}",
                       "max_duration=3ba", "save_interval=1ba"]
        from jaxtrain.checkpoint.load import load_checkpoint

        variants = (("adapters only (default)", "adapters", []),
                    ("save_frozen_weights: true", "frozen", ["save_frozen_weights=true"]))
        for name, short, extra in variants:
            folder = os.path.join(tmp, short)
            seconds = run(lora + extra + [f"save_folder={folder}", f"run_folder={folder}-run"], root)
            start = time.perf_counter()
            load_checkpoint(folder)
            read = time.perf_counter() - start
            print(f"{name}: {folder_bytes(os.path.join(folder, '3')) / 1e6:.2f} MB per checkpoint step; "
                  f"run {seconds:.1f} s (3 steps, 3 saves); read back in {read:.2f} s")


if __name__ == "__main__":
    main()

"""Tokens per second the training loader delivers from local MDS token shards, on one core.

    python bench/loader_throughput.py [--rows 20000 --seq 2048 --batch 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxtrain.data.loader import BatchLoader  # noqa: E402
from jaxtrain.data.mds.reader import MDSDataset, TokenRows  # noqa: E402
from jaxtrain.data.mds.writer import MDSWriter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        with MDSWriter(folder, {"tokens": "ndarray:int32"}, size_limit="64mb") as writer:
            for _ in range(args.rows):
                writer.write({"tokens": rng.integers(0, 50000, size=args.seq, dtype=np.int32)})
        rows = TokenRows([MDSDataset(folder)], seq_len=args.seq)
        loader = BatchLoader(rows, global_batch_size=args.batch, seed=0, shuffle=True)
        started, tokens = time.perf_counter(), 0
        while time.perf_counter() - started < args.seconds:
            tokens += next(loader)["input_ids"].size
        elapsed = time.perf_counter() - started
    print(f"loader: {tokens / elapsed:,.0f} tokens/s ({args.rows} rows x {args.seq} in 64 MB shards, "
          f"shuffled global batches of {args.batch}, one process)")


if __name__ == "__main__":
    main()

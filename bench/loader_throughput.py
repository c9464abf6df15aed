"""Tokens per second the training loader delivers from local MDS token shards, on one core.

    python bench/loader_throughput.py [--rows 20000 --seq 2048 --batch 32 --workers 1 --algo py1e]

The order is the training order (``jaxtrain.data.order``, py1e over the shards by default);
``--workers`` background threads gather the batches ahead (0: gathered when asked for). The time
to compute the first epoch's order is reported apart from the steady rate.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxtrain.data.loader import BatchLoader  # noqa: E402
from jaxtrain.data.mds.reader import MDSDataset  # noqa: E402
from jaxtrain.data.mds.rows import TokenRows  # noqa: E402
from jaxtrain.data.mds.writer import MDSWriter  # noqa: E402
from jaxtrain.data.order import SampleOrder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=1, help="background gathering threads (0: none)")
    parser.add_argument("--algo", default="py1e", help="shuffle algorithm (py1e, py1br, py1s, py1b, py2s, naive, none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        with MDSWriter(folder, {"tokens": "ndarray:int32"}, size_limit="64mb") as writer:
            for _ in range(args.rows):
                writer.write({"tokens": rng.integers(0, 50000, size=args.seq, dtype=np.int32)})
        dataset = MDSDataset(folder)
        rows = TokenRows([dataset], seq_len=args.seq)
        shards = [int(entry["samples"]) for entry in dataset.shards]
        order = SampleOrder([shards], seed=0, shuffle_algo=args.algo)
        started = time.perf_counter()
        order(0)
        order_seconds = time.perf_counter() - started
        loader = BatchLoader(rows, global_batch_size=args.batch, order=order, num_workers=args.workers)
        next(loader)  # starts the workers
        started, tokens = time.perf_counter(), 0
        while time.perf_counter() - started < args.seconds:
            tokens += next(loader)["input_ids"].size
        elapsed = time.perf_counter() - started
        loader.close()
    print(f"loader: {tokens / elapsed:,.0f} tokens/s ({args.rows} rows x {args.seq} in {len(shards)} shards of 64 MB, "
          f"{args.algo} order ({order_seconds:.3f} s per epoch), global batches of {args.batch}, one process, "
          f"{args.workers} prefetch workers)")


if __name__ == "__main__":
    main()

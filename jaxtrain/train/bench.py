"""``jaxtrain bench --config ...``: a short timed training run on this hardware.

Builds the run exactly as ``jaxtrain train`` does (same model, mesh, precision, microbatches),
times the compiled train step on real batches after a warm-up, and writes tokens/s and MFU per
device as JSON, the file ``jaxtrain plan --mfu from:FILE`` reads. Nothing is saved or evaluated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

from jaxtrain.config import ConfigError, load_config
from jaxtrain.metrics.hardware import get_hardware
from jaxtrain.tempfiles import check_output_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtrain bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the training config to measure")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation (default 2)")
    parser.add_argument("--hardware", help="hardware name for the result (default: detected)")
    parser.add_argument("--out", default="bench.json", help="where to write the JSON result (default bench.json)")
    return parser


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        return _error("--steps must be >= 1 and --warmup >= 0")
    hardware = None
    if args.hardware:
        try:
            hardware = get_hardware(args.hardware)
        except ValueError as err:
            return _error(f"--hardware: {err}")
    try:
        cfg = load_config(args.config, args.set, notices=[])
    except ConfigError as err:
        return _error(str(err))
    try:
        check_output_file(args.out)
    except ConfigError as err:
        return _error(str(err))

    import jax
    import numpy as np

    from jaxtrain.metrics.flops import mfu
    from jaxtrain.metrics.hardware import detect_hardware
    from jaxtrain.metrics.tokens import TrainTokens, data_position
    from jaxtrain.parallel.mesh import global_batch_from_local
    from jaxtrain.train.paths import expand_run_paths, resolve_run_name
    from jaxtrain.train.setup import build_run, peak_flops

    peak, peak_source = peak_flops(cfg)
    if peak is None:
        return _error(peak_source)
    hardware = hardware or detect_hardware()
    total = 1 + args.warmup + args.steps
    # The run folder only holds the data cache (tokenizer, packed rows), shared with training runs.
    cfg = expand_run_paths(
        dataclasses.replace(cfg, max_duration=f"{total}ba", save_folder=None, eval_loader=None),
        resolve_run_name(cfg, args.config),
    )
    try:
        parts = build_run(cfg)
    except ConfigError as err:
        return _error(str(err))
    loader = iter(parts.train_loader)
    positions = cfg.global_train_batch_size * cfg.max_seq_len
    counter = TrainTokens(parts.train_loader, positions)
    state = parts.state
    compile_started = time.perf_counter()
    times, tokens = [], []
    for index in range(total):
        position = data_position(parts.train_loader.state_dict())
        local = next(loader)
        if index > args.warmup:  # padding left out, as training counts its tokens
            tokens.append(counter.count(local, position))
        batch = global_batch_from_local(local, parts.mesh)
        started = time.perf_counter()
        state, metrics = parts.train_step(state, batch)
        jax.block_until_ready(metrics["loss"])
        if index == 0:
            compile_seconds = time.perf_counter() - compile_started
        elif index > args.warmup:
            times.append(time.perf_counter() - started)
    step_seconds = statistics.median(times)
    memory = jax.local_devices()[0].memory_stats() or {}  # None on CPU
    devices = jax.device_count()
    tokens_per_second = statistics.mean(tokens) / step_seconds
    flops_per_second_per_device = parts.flops_per_batch / step_seconds / devices
    result = {
        "mfu": mfu(flops_per_second_per_device, parts.peak_flops_per_device),
        "hardware": hardware.name if hardware else "unknown",
        "tokens_per_second_per_device": tokens_per_second / devices,
        "tokens_per_second": tokens_per_second,
        "padded_tokens_per_second": positions / step_seconds,  # every position of every row
        "model_flops_per_second_per_device": flops_per_second_per_device,
        "peak_flops_per_device": parts.peak_flops_per_device,
        "peak_source": parts.peak_source,
        "step_seconds_median": step_seconds,
        "step_seconds_spread": [min(times), max(times)],
        "compile_seconds": compile_seconds,
        "model": cfg.run_name,
        "params": parts.num_params,
        "seq_len": cfg.max_seq_len,
        "global_batch": cfg.global_train_batch_size,
        "devices": devices,
        "precision": cfg.precision,
        "final_loss": float(np.asarray(metrics["loss"])),
        "peak_bytes_in_use": memory.get("peak_bytes_in_use"),
        "device_bytes_limit": memory.get("bytes_limit"),
    }
    try:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    except OSError as err:  # the folder was checked before the run; keep the measurement all the same
        print(json.dumps(result, indent=2))
        return _error(f"--out {args.out}: cannot write it ({err.strerror or err}); the result is printed above "
                      f"as JSON: save it to a file for jaxtrain plan --mfu from:FILE")
    padding = (f" ({100 * (1 - tokens_per_second / result['padded_tokens_per_second']):.0f}% of the positions are "
               f"padding)" if result["padded_tokens_per_second"] > tokens_per_second * 1.0005 else "")
    print(f"{tokens_per_second:,.0f} tokens/s ({result['tokens_per_second_per_device']:,.0f} per device){padding}, "
          f"MFU {100 * result['mfu']:.2f}% of {parts.peak_flops_per_device:.3g} FLOP/s ({parts.peak_source}); "
          f"median step {1000 * step_seconds:.1f} ms, compile {compile_seconds:.1f} s; wrote {args.out}")
    if result["peak_bytes_in_use"] is not None:
        print(f"peak device memory {result['peak_bytes_in_use'] / 2**30:.1f} GiB of "
              f"{(result['device_bytes_limit'] or 0) / 2**30:.1f} GiB")
    return 0

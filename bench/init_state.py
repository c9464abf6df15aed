"""The program that builds a run's state (parameters drawn into their shardings, optimizer state
beside them), with its weights drawn and as placeholders for weights loaded right after
(``load_path``): XLA's memory figures for it per device, and, with ``--run``, how long it takes here.

    python bench/init_state.py --config configs/mpt/7b.yaml --devices 8 --fsdp 8
    python bench/init_state.py --config configs/mpt/7b.yaml --devices 1 --fsdp 1 --set precision=amp_bf16
    python bench/init_state.py --config configs/mpt/350m.yaml --devices 1 --fsdp 1 --run --rounds 3

Compiling takes no memory for the state itself (nothing is allocated without ``--run``), so any
preset compiles for a simulated mesh of CPU devices. ``--run`` builds the state for real,
alternating the two ways, and prints the median seconds of each (the first, compiling, left out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mpt/7b.yaml")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--fsdp", type=int, default=8)
    parser.add_argument("--run", action="store_true", help="also build the state here and time it")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import optax

    from jaxtrain.config import load_config
    from jaxtrain.parallel.mesh import axis_rules, build_mesh
    from jaxtrain.train import state as train_state
    from jaxtrain.train.step import COMPUTE_DTYPES

    cfg = load_config(args.config, ["parallelism.data=-1", f"parallelism.fsdp={args.fsdp}", *args.set])
    mesh = build_mesh(cfg.parallelism)
    rules = axis_rules(cfg.parallelism)
    tx = optax.adamw(1e-4)  # the state's shape is what counts here, not the schedule
    programs = {}
    for name, loaded in (("drawn", False), ("placeholders", True)):
        init, shardings, _ = train_state._state_plan(cfg.model, tx, mesh, rules, cfg.health.spike_window,
                                                     frozen_dtype=COMPUTE_DTYPES[cfg.precision],
                                                     weights_loaded=loaded)
        started = time.perf_counter()
        programs[name] = jax.jit(init, out_shardings=shardings).lower(jax.random.key(0)).compile()
        compiled_in = time.perf_counter() - started
        memory = programs[name].memory_analysis()
        print(f"{name:>12}: per device, state {memory.output_size_in_bytes / 2**30:.2f} GiB, temporaries "
              f"{memory.temp_size_in_bytes / 2**30:.2f} GiB (compiled in {compiled_in:.1f} s)", flush=True)
    params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(init, jax.random.key(0)).params))
    print(f"{args.config}: {params / 1e9:.2f}B parameters, precision {cfg.precision}, mesh {dict(mesh.shape)}, "
          f"LoRA {'on' if cfg.model.peft_config is not None else 'off'}")
    if not args.run:
        return
    times = {name: [] for name in programs}
    for _ in range(args.rounds + 1):
        for name, program in programs.items():
            started = time.perf_counter()
            jax.block_until_ready(program(jax.random.key(0)))
            times[name].append(time.perf_counter() - started)
    for name, seconds in times.items():
        print(f"{name:>12}: built in {statistics.median(seconds[1:]):.2f} s (median of {args.rounds}; "
              f"runs {', '.join(f'{s:.2f}' for s in seconds)})")


if __name__ == "__main__":
    sys.exit(main())

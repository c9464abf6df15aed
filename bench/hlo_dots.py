"""List every dot in the optimized HLO of jaxtrain's train step and say which run as bf16 on
XLA:CPU's fast path and which were rewritten to float32 (operands converted before the dot).

    python bench/hlo_dots.py --shape xs --precision bf16

Prints one line per dot (shape, operand dtypes, fast or slow) and a summary line.
"""

from __future__ import annotations

import argparse
import re
import sys

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import train_throughput  # noqa: E402

from jaxtrain.parallel.mesh import axis_rules, batch_sharding, build_mesh  # noqa: E402
from jaxtrain.train.optim import build_optimizer  # noqa: E402
from jaxtrain.train.state import create_train_state  # noqa: E402
from jaxtrain.train.step import COMPUTE_DTYPES, compile_train_step, make_train_step  # noqa: E402

_DOT = re.compile(r"%(\S+) = (\w+)\[([\d,]*)\]\S* dot\(%([^,]+), %([^)]+)\)(.*)")
_DEF = re.compile(r"%(\S+) = (\w+)\[([\d,]*)\]")


def classify_dots(hlo_text: str) -> list[dict]:
    """Each dot: its output, operand dtypes, and whether it runs in bf16 (fast) or float32."""
    dtypes = {m.group(1): m.group(2) for m in _DEF.finditer(hlo_text)}
    long_dims = {m.group(1): sum(int(d) > 1 for d in m.group(3).split(",") if d) for m in _DEF.finditer(hlo_text)}
    params = {}
    for line in hlo_text.splitlines():
        m = re.search(r"%(\S+) = (\w+)\[[\d,]*\]\S* parameter\((\d+)\)", line)
        if m:
            params[m.group(1)] = m.group(2)
    dots = []
    for m in _DOT.finditer(hlo_text):
        name, out_dtype, shape, lhs, rhs, rest = m.groups()
        lhs_dtype = dtypes.get(lhs.split(" ")[0], params.get(lhs, "?"))
        rhs_dtype = dtypes.get(rhs.split(" ")[0], params.get(rhs, "?"))
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        op_name = re.search(r'op_name="([^"]+)"', rest)
        dots.append({
            "name": name, "out": f"{out_dtype}[{shape}]", "operands": f"{lhs_dtype} x {rhs_dtype}",
            "lhs_contracting": dims.group(1) if dims else "", "op": op_name.group(1)[-70:] if op_name else "",
            "matvec": min(long_dims.get(lhs.split(" ")[0], 2), long_dims.get(rhs.split(" ")[0], 2)) <= 1,
        })  # fmt: skip
    return dots


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(train_throughput.SHAPES), default="xs")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args(argv)
    ns = argparse.Namespace(config=None, shape=args.shape, precision=args.precision, seq=None, batch=None,
                            micro=None, remat=None)  # fmt: skip
    cfg = train_throughput.build_config(ns)
    mesh = build_mesh(cfg.parallelism, jax.devices())
    tx = build_optimizer(cfg.optimizer, lambda step: cfg.optimizer.lr, clipping=cfg.algorithms.gradient_clipping)
    state, model_def, shardings = create_train_state(cfg.model, tx, seed=0, mesh=mesh, rules=axis_rules(cfg.parallelism))
    step = make_train_step(model_def, tx, lambda step: cfg.optimizer.lr, compute_dtype=COMPUTE_DTYPES[cfg.precision])
    compiled = compile_train_step(step, shardings, batch_sharding(mesh))
    batch = {"input_ids": np.zeros((cfg.global_train_batch_size, cfg.max_seq_len), np.int32)}
    text = compiled.lower(state, batch).compile().as_text()
    dots = classify_dots(text)
    slow = matvec = 0
    for dot in dots:
        is_bf16 = dot["operands"] == "bf16 x bf16"
        # float32 matrix-vector products (LayerNorm's row sums) are memory-bound, not slow matmuls
        matvec += dot["matvec"] and not is_bf16
        slow += args.precision == "bf16" and not is_bf16 and not dot["matvec"]
        kind = "fast" if is_bf16 else "mv  " if dot["matvec"] else "f32 "
        print(f"{kind}  {dot['out']:<28} {dot['operands']:<14} {dot['op']}")
    ynn = text.count('"kind":"__ynn_fusion"')
    print(f"{len(dots)} dots, {slow} matmuls with float32 operands in a bf16 step, {matvec} float32 "
          f"matrix-vector products; {ynn} YNNPACK fusions")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The PyTorch reference: transformers' ``MptForCausalLM`` trained on synthetic tokens, at the
same shapes as ``bench/train_throughput.py`` (bf16 autocast or float32, AdamW, clipping at 1.0).

    /work/main/.venv-ref/bin/python bench/torch_mpt_throughput.py --shape s --precision bf16

Prints one ``RESULT {json}`` line last, for drivers. Run it under a PyTorch environment
(torch==2.13.0 CPU + transformers), not jaxtrain's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

T_PROCESS = time.perf_counter()

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import MptConfig, MptForCausalLM  # noqa: E402

SHAPES = {
    "xs": dict(d_model=256, n_heads=4, n_layers=4, seq=256, vocab=8192, batch=8),
    "s": dict(d_model=512, n_heads=8, n_layers=8, seq=512, vocab=50432, batch=8),
}


def mpt_flops_per_batch(n_params: int, n_layers: int, d_model: int, seq: int, batch: int) -> float:
    """LLM Foundry's formula, as ``jaxtrain.metrics.flops`` computes it."""
    return float(3 * batch * (2 * n_params * seq + n_layers * 4 * d_model * seq**2))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="xs")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    torch.manual_seed(0)
    t_start = time.perf_counter()
    config = MptConfig(
        d_model=shape["d_model"], n_heads=shape["n_heads"], n_layers=shape["n_layers"], expansion_ratio=4,
        max_seq_len=shape["seq"], vocab_size=shape["vocab"], no_bias=True,
        attn_config={"alibi": True, "attn_pdrop": 0.0}, resid_pdrop=0.0, emb_pdrop=0.0,
    )  # fmt: skip
    model = MptForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    n_params = sum(p.numel() for p in model.parameters())
    batch, seq = shape["batch"], shape["seq"]
    tokens = [torch.randint(0, shape["vocab"], (batch, seq)) for _ in range(2)]

    def step(input_ids):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    t_init = time.perf_counter()
    step(tokens[0])
    t_first = time.perf_counter()
    step_times = []
    for i in range(args.steps):
        start = time.perf_counter()
        loss = step(tokens[i % 2])
        step_times.append(time.perf_counter() - start)
    median = statistics.median(step_times)
    flops = mpt_flops_per_batch(n_params, shape["n_layers"], shape["d_model"], seq, batch)
    result = {
        "framework": "torch",
        "shape": args.shape,
        "precision": args.precision,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "params": n_params,
        "tokens_per_s": batch * seq / median,
        "model_gflops": flops / median / 1e9,
        "step_s_median": median,
        "step_s_min": min(step_times),
        "step_s_max": max(step_times),
        "init_s": t_init - t_start,
        "first_step_s": t_first - t_init,
        "time_to_first_step_s": t_first - T_PROCESS,
        "loss": loss,
    }
    print(
        f"torch {args.shape} {args.precision}: {result['tokens_per_s']:,.0f} tok/s, "
        f"{result['model_gflops']:,.1f} model GFLOP/s; step median {median * 1e3:.1f} ms "
        f"(min {min(step_times) * 1e3:.1f}, max {max(step_times) * 1e3:.1f}); first step {result['first_step_s']:.1f} s"
    )
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

"""``jaxtrain generate``: continue a prompt with a trained or converted checkpoint."""

from __future__ import annotations

import argparse
import sys

from jaxtrain.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtrain generate", description="Generate text with KV-cache decoding.")
    parser.add_argument("--checkpoint", required=True, help="jaxtrain checkpoint folder (tokenizer.json beside it)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop when this text is generated; repeatable")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default the newest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default the one beside the checkpoint)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="compute dtype")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse out-of-range numeric options before the checkpoint is read."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if not args.temperature >= 0:  # NaN too
        raise ConfigError(f"--temperature {args.temperature}: must be >= 0 (0 is greedy)")
    if args.top_k < 0:
        raise ConfigError(f"--top-k {args.top_k}: must be >= 0 (0 turns it off)")
    if not 0.0 < args.top_p <= 1.0:
        raise ConfigError(f"--top-p {args.top_p}: must be in (0, 1] (1 turns it off)")
    if args.step is not None and args.step < 0:
        raise ConfigError(f"--step {args.step}: must be >= 0")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import jax.numpy as jnp

    from jaxtrain.checkpoint.load import load_checkpoint
    from jaxtrain.data.tokenizer import Tokenizer, read_tokenizer_file
    from jaxtrain.inference.generate import Sampling, generate

    try:
        check_args(args)
        given_tokenizer = (read_tokenizer_file(args.tokenizer, what="--tokenizer") if args.tokenizer
                           else None)  # before the slow load
        loaded = load_checkpoint(args.checkpoint, args.step)
        if given_tokenizer is None and loaded.tokenizer_path is None:
            raise ConfigError(f"{args.checkpoint}: no tokenizer.json beside the checkpoint; pass --tokenizer PATH")
        tokenizer = Tokenizer(given_tokenizer if given_tokenizer is not None
                              else read_tokenizer_file(loaded.tokenizer_path, what="the checkpoint's tokenizer"))
        prompts = [tokenizer.encode(text) for text in args.prompt]
        if any(not p for p in prompts):
            raise ConfigError("--prompt: every prompt must encode to at least one token")
        result = generate(
            loaded.module(), prompts, max_new_tokens=args.max_new_tokens,
            sampling=Sampling(args.temperature, args.top_k, args.top_p),
            stop_sequences=[tokenizer.encode(stop) for stop in args.stop],
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0, seed=args.seed,
            compute_dtype=jnp.bfloat16 if args.precision == "bf16" else jnp.float32,
        )  # fmt: skip
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for text, new_tokens in zip(args.prompt, result.tokens):
        completion = tokenizer.decode(new_tokens, skip_special_tokens=True)
        ends = [completion.index(stop) + len(stop) for stop in args.stop if stop in completion]
        print(text + completion[: min(ends, default=len(completion))])
    total = sum(len(t) for t in result.tokens)
    print(f"{total} tokens in {result.seconds:.3f} s ({result.tokens_per_second:.1f} tokens/s; "
          f"compiled in {result.compile_seconds:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

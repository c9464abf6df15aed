"""``jaxtrain generate``: continue a prompt with a trained or converted checkpoint."""

from __future__ import annotations

import argparse
import math
import sys

from jaxtrain.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtrain generate", description="Generate text with KV-cache decoding.")
    parser.add_argument("--checkpoint", required=True, help="jaxtrain checkpoint folder (tokenizer.json beside it)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--chat", action="store_true",
                        help="each prompt is a user's message, rendered with the chat template the model was "
                             "fine-tuned with; prints the reply")
    parser.add_argument("--system", default=None, help="with --chat: a system message before each user message")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 is greedy; default 0, or 1 when --top-k, --top-p or --min-p is given")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--min-p", type=float, default=0.0,
                        help="drop tokens less likely than this fraction of the most likely one (0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="above 1 discourages tokens already in the text, as transformers' option (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, 0 to 2**32-1")
    parser.add_argument("--stop", action="append", default=[],
                        help="stop a prompt's generation once its text contains this string; repeatable")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default the newest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default the one beside the checkpoint)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="compute dtype")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse out-of-range numeric options before the checkpoint is read."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature {args.temperature}: must be a finite number >= 0 (0 is greedy)")
    if args.top_k < 0:
        raise ConfigError(f"--top-k {args.top_k}: must be >= 0 (0 turns it off)")
    if not 0.0 < args.top_p <= 1.0:
        raise ConfigError(f"--top-p {args.top_p}: must be in (0, 1] (1 turns it off)")
    if not 0.0 <= args.min_p <= 1.0:
        raise ConfigError(f"--min-p {args.min_p}: must be in [0, 1] (0 turns it off)")
    for flag, value, off in (("--top-k", args.top_k, 0), ("--top-p", args.top_p, 1.0), ("--min-p", args.min_p, 0.0)):
        if value != off and args.temperature == 0:
            raise ConfigError(f"{flag} {value}: applies to sampling, and --temperature 0 is greedy; "
                              "give a temperature > 0 (1 samples the model's own distribution)")
    if not (math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0):
        raise ConfigError(f"--repetition-penalty {args.repetition_penalty}: must be a finite number > 0 (1 turns it "
                          f"off; 1.1 to 1.3 discourages repeats)")
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed {args.seed}: must be in [0, 2**32)")
    if any(not stop for stop in args.stop):
        raise ConfigError("--stop '': an empty stop string would end the generation before it starts")
    if args.system is not None and not args.chat:
        raise ConfigError("--system: a system message is part of a chat; add --chat")
    if args.step is not None and args.step < 0:
        raise ConfigError(f"--step {args.step}: must be >= 0")


def sampling_from_args(args: argparse.Namespace):
    """``Sampling`` from the options: without ``--temperature``, greedy unless top-k, top-p or min-p is set
    (then temperature 1, as transformers samples by default)."""
    from jaxtrain.inference.generate import Sampling

    temperature = args.temperature
    if temperature is None:
        temperature = 1.0 if args.top_k or args.top_p < 1.0 or args.min_p > 0.0 else 0.0
    return Sampling(temperature, args.top_k, args.top_p, args.repetition_penalty, args.min_p)


def token_texts(backend) -> list[str]:
    """The text each id of a ``tokenizers.Tokenizer`` adds when decoded after other text (special
    tokens: ""), read after a fixed prefix so that decoders which strip a leading space (Metaspace,
    WordPiece) keep it."""
    prefix = backend.encode("abcdef", add_special_tokens=False).ids
    base = backend.decode(prefix)
    size = backend.get_vocab_size(with_added_tokens=True)
    texts = backend.decode_batch([prefix + [token] for token in range(size)], skip_special_tokens=True)
    return [text[len(base) :] if text.startswith(base) else backend.decode([token], skip_special_tokens=True)
            for token, text in enumerate(texts)]


def chat_texts(args: argparse.Namespace, loaded, tokenizer) -> list[str]:
    """Each ``--prompt`` as a user's message (after ``--system``'s), rendered with the generation
    prompt by the chat template fine-tuning used: the run's ``tokenizer.kwargs.chat_template``, else
    the one saved beside the checkpoint's tokenizer, else ChatML (``--tokenizer``: that one's)."""
    from jaxtrain.config.schema import TokenizerConfig
    from jaxtrain.data.chat import chat_template

    if args.tokenizer:
        cfg = TokenizerConfig(name=args.tokenizer)
    else:
        run_tokenizer = (loaded.meta.get("config") or {}).get("tokenizer") or {}
        cfg = TokenizerConfig(name=loaded.tokenizer_path, kwargs=dict(run_tokenizer.get("kwargs") or {}))
    template = chat_template(cfg, tokenizer)
    system = [("system", args.system)] if args.system else []
    return [template.render([*system, ("user", text)], add_generation_prompt=True, where=f"--prompt {text!r}")
            for text in args.prompt]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import jax.numpy as jnp

    from jaxtrain.checkpoint.load import load_checkpoint
    from jaxtrain.data.tokenizer import tokenizer_from_file
    from jaxtrain.inference.generate import generate
    from jaxtrain.train.microbatch import is_out_of_memory, out_of_memory_line

    try:
        check_args(args)
        given_tokenizer = (tokenizer_from_file(args.tokenizer, what="--tokenizer") if args.tokenizer
                           else None)  # before the slow load
        loaded = load_checkpoint(args.checkpoint, args.step)
        if given_tokenizer is None and loaded.tokenizer_path is None:
            raise ConfigError(f"{args.checkpoint}: no tokenizer.json beside the checkpoint; pass --tokenizer PATH")
        tokenizer = given_tokenizer if given_tokenizer is not None else loaded.tokenizer()
        texts = chat_texts(args, loaded, tokenizer) if args.chat else args.prompt
        prompts = [tokenizer.encode(text) for text in texts]
        if any(not p for p in prompts):
            raise ConfigError("--prompt: every prompt must encode to at least one token")
        result = generate(
            loaded.merged().module(), prompts, max_new_tokens=args.max_new_tokens, sampling=sampling_from_args(args),
            stop_strings=args.stop, token_texts=token_texts(tokenizer.backend) if args.stop else None,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=None, seed=args.seed,
            compute_dtype=jnp.bfloat16 if args.precision == "bf16" else jnp.float32,
        )  # fmt: skip
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        print("error: " + out_of_memory_line(
            error, f"lower --max-new-tokens (now {args.max_new_tokens}) or give fewer --prompt (now {len(args.prompt)})"
            + ("" if args.precision == "bf16" else ", or add --precision bf16")), file=sys.stderr)
        return 2
    for text, new_tokens in zip(args.prompt, result.tokens):
        completion = tokenizer.decode(new_tokens, skip_special_tokens=True)
        ends = [completion.index(stop) + len(stop) for stop in args.stop if stop in completion]
        print(("" if args.chat else text) + completion[: min(ends, default=len(completion))])
    total = sum(len(t) for t in result.tokens)
    print(f"{total} token{'s' if total != 1 else ''} in {result.seconds:.3f} s "
          f"({result.tokens_per_second:.1f} tokens/s; compiled in {result.compile_seconds:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``jaxtrain convert``: Hugging Face MPT folder <-> jaxtrain checkpoint folder."""

from __future__ import annotations

import argparse
import sys

from jaxtrain.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxtrain convert",
        description="Convert MPT weights between a Hugging Face folder (config.json + safetensors) and a "
                    "jaxtrain checkpoint folder. Pickle weights (.bin) are refused.",
    )
    parser.add_argument("src", help="Hugging Face MPT folder (--to jaxtrain) or jaxtrain checkpoint folder (--to hf)")
    parser.add_argument("dst", help="new output folder")
    parser.add_argument("--to", choices=("jaxtrain", "hf", "peft"), default="jaxtrain",
                        help="output format (default jaxtrain); hf merges LoRA adapters into the weights, peft writes "
                             "a checkpoint's LoRA adapters alone as a PEFT adapter folder")
    parser.add_argument("--adapter", default=None,
                        help="--to jaxtrain: a PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) "
                             "for the model in SRC; the checkpoint keeps it as LoRA adapters")
    parser.add_argument("--step", type=int, default=None, help="--to hf/peft: checkpoint step (default the newest)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="--to hf/peft: tensor dtype (default the dtype the weights were imported in, else float32)")
    parser.add_argument("--max-shard-size", default=None, help="--to hf: largest safetensors file (default 5GB)")
    parser.add_argument("--no-scan-layers", dest="scan_layers", action="store_false",
                        help="--to jaxtrain: store blocks unrolled (blocks/0..n-1) instead of stacked")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxtrain.convert.hf_mpt import export_hf, import_hf, transformers_mpt_gaps

    try:
        if args.adapter is not None and args.to != "jaxtrain":
            raise ConfigError(f"--adapter {args.adapter}: it is read with --to jaxtrain (the base model in SRC)")
        # options of the other direction would be silently ignored: say so instead
        unused = {"jaxtrain": [("--step", args.step), ("--dtype", args.dtype), ("--max-shard-size", args.max_shard_size)],
                  "hf": [("--no-scan-layers", None if args.scan_layers else True)],
                  "peft": [("--no-scan-layers", None if args.scan_layers else True),
                           ("--max-shard-size", args.max_shard_size)]}[args.to]
        for flag, value in unused:
            if value is not None:
                raise ConfigError(f"{flag}: it has no effect with --to {args.to}; remove it (see --help for the "
                                  f"options of each direction)")
        if args.to == "jaxtrain":
            cfg = import_hf(args.src, args.dst, scan_layers=args.scan_layers, adapter=args.adapter)
            adapters = ""
            if cfg.peft_config is not None:
                from jaxtrain.layers.lora import rank_text

                adapters = f", LoRA adapters of {rank_text(cfg)}"
            print(f"wrote jaxtrain checkpoint {args.dst} (step 0): MPT d_model={cfg.d_model} "
                  f"n_layers={cfg.n_layers} vocab={cfg.vocab_size}, {'stacked' if cfg.scan_layers else 'unrolled'} "
                  f"blocks{adapters}")
        elif args.to == "peft":
            export_hf(args.src, args.dst, step=args.step, dtype=args.dtype, adapter_only=True)
            print(f"wrote PEFT adapter folder {args.dst} (for the Hugging Face MPT model the adapters were trained on)")
        else:
            cfg = export_hf(args.src, args.dst, step=args.step, dtype=args.dtype,
                            max_shard_size=args.max_shard_size or "5GB")
            print(f"wrote Hugging Face MPT folder {args.dst}")
            gaps = transformers_mpt_gaps(cfg)
            if gaps:
                print(f"warning: transformers' built-in MptForCausalLM does not implement {', '.join(gaps)}: it would "
                      f"load {args.dst} with other logits; load it with MosaicML's MPT code (LLM Foundry, or "
                      f"trust_remote_code with its modeling files)", file=sys.stderr)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. no permission or no space left where the output goes
        print(f"error: {error.filename or args.dst}: {error.strerror or error}; nothing usable was written to "
              f"{args.dst}: fix that and convert again into a new folder", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

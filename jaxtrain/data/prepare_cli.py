"""``jaxtrain data prepare``: the command line of ``jaxtrain.data.prepare.prepare``."""

from __future__ import annotations

import argparse
import os
import sys

from jaxtrain.config.schema import ConfigError
from jaxtrain.tempfiles import file_in_the_way

EXAMPLES = """examples:
  jaxtrain data prepare 'docs/**/*.txt' --out data/mds --tokenizer bpe:default --concat-tokens 2048
  jaxtrain data prepare corpus.jsonl --text-field content --out data/mds --split val --tokenizer tok/tokenizer.json
  jaxtrain data prepare mds:raw_text --out data/mds --compression zstd --hashes sha1,xxh64 --workers 8
  jaxtrain data prepare tfds:wikipedia/20230601.en --input-split train --out data/wiki --no-tokenize
then train on it with  train_loader.dataset: {source: mds, local: data/mds, split: train}
and tokenizer.name: data/mds/tokenizer.json"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxtrain data prepare", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Tokenize and concatenate text into MDS shards (MosaicML Streaming's format), as LLM "
                    "Foundry's convert_dataset_hf --concat_tokens does.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="text/JSONL files, folders or globs; mds:PATH (an MDS text dataset); "
                             "tfds:NAME[/CONFIG][:VERSION][:SPLIT] (a TFDS dataset prepared with "
                             "`tfds build NAME --file_format=array_record`)")
    parser.add_argument("--out", "--out-root", required=True, help="output folder or fsspec URL (s3://...)")
    parser.add_argument("--split", default="train", help="output split: the dataset goes to OUT/SPLIT (default train)")
    parser.add_argument("--text-field", default="text", help="JSONL field, MDS column or TFDS feature holding the text")
    parser.add_argument("--input-split", default="train", help="split of an mds: or tfds: input (default train)")
    parser.add_argument("--tfds-data-dir", default=None, help="TFDS data_dir holding prepared datasets (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.add_argument("--tokenizer", default="bpe:default",
                        help="a tokenizer.json path, or bpe:default (a byte-level BPE trained on the inputs)")
    parser.add_argument("--vocab-size", type=int, default=None, help="bpe:default vocabulary size (default 8192)")
    parser.add_argument("--eos-text", default=None, help="the EOS token put between documents (default the tokenizer's)")
    parser.add_argument("--concat-tokens", type=int, default=2048, help="tokens per sample row (default 2048)")
    parser.add_argument("--no-tokenize", action="store_true", help="keep raw text (a `text: str` column) instead")
    parser.add_argument("--size-limit", default="64mb", help="shard size limit, e.g. 64mb (default)")
    parser.add_argument("--compression", default=None, help="shard compression, e.g. zstd or zstd:7")
    parser.add_argument("--hashes", default="", help="comma-separated shard hashes, e.g. sha1,xxh64")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--cache-dir", default=None, help="where bpe:default is cached (default ~/.cache/jaxtrain)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/SPLIT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def check_out(out: str, split: str) -> None:
    """Refuse an ``--out`` that cannot hold the dataset folder ``OUT/SPLIT`` (a file there, or a file in
    its path) before the inputs are read or a tokenizer trained. Remote URLs are left to the writer."""
    from jaxtrain.data.mds.writer import is_remote

    if is_remote(out):
        return
    local = os.path.expanduser(out)
    if os.path.exists(local) and not os.path.isdir(local):
        raise ConfigError(f"--out {out}: is a file; pass a folder (the dataset is written to OUT/{split} "
                          "and the tokenizer to OUT/tokenizer.json)")
    target = os.path.join(local, split)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ConfigError(f"--out {out}: {target} is a file; pass another folder, or another --split")
    blocking = file_in_the_way(os.path.dirname(os.path.abspath(target)))
    if blocking:
        raise ConfigError(f"--out {out}: {blocking} is a file, not a folder; pass a folder path")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxtrain.data.prepare import prepare

    try:
        if not args.split.strip() or args.split in (".", "..") or "/" in args.split or "\\" in args.split:
            raise ConfigError(f"--split {args.split!r}: give a plain folder name such as train or val (the dataset "
                              f"is written to OUT/SPLIT)")
        blocking = file_in_the_way(args.cache_dir) if args.cache_dir else None
        if blocking:
            raise ConfigError(f"--cache-dir {args.cache_dir}: {blocking} is a file; pass a folder (or leave it out)")
        check_out(args.out, args.split)
        result = prepare(
            args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size, eos_text=args.eos_text,
            concat_tokens=args.concat_tokens, tokenize=not args.no_tokenize, split=args.split,
            text_field=args.text_field, input_split=args.input_split, size_limit=args.size_limit,
            compression=args.compression, hashes=[h.strip() for h in args.hashes.split(",") if h.strip()],
            workers=args.workers, cache_dir=args.cache_dir, tfds_data_dir=args.tfds_data_dir,
            overwrite=args.overwrite, progress=not args.no_progress)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tokens = f", {result.num_tokens} tokens" if result.num_tokens is not None else ""
    print(f"wrote {result.num_samples} samples ({result.num_documents} documents{tokens}) to {result.out}")
    if result.tokenizer_path:
        print(f"tokenizer: {result.tokenizer_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`jaxtrain data prepare`: text and JSONL in, MDS token rows out, trained on through build_loaders."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxtrain.config.schema import Config, ConfigError, DatasetConfig, LoaderConfig, TokenizerConfig
from jaxtrain.data import build_loaders
from jaxtrain.data.mds import MDSDataset
from jaxtrain.data.prepare import prepare
from jaxtrain.data.prepare_cli import main
from jaxtrain.data.tokenizer import EOS_TOKEN, load_tokenizer

SEQ_LEN = 16
VOCAB = 320
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "mds")
DOCUMENTS = [f"Document {i}: the quick brown fox number {i} jumps over {i * 7} lazy dogs.\n" * (1 + i % 3)
             for i in range(12)]


@pytest.fixture()
def jsonl(tmp_path) -> str:
    path = tmp_path / "corpus.jsonl"
    with open(path, "w") as handle:
        for index, text in enumerate(DOCUMENTS):
            handle.write(json.dumps({"id": index, "body": text}) + "\n" + "\n" * (index == 3))  # a blank line is skipped
    return str(path)


def _prepare(inputs, out, tmp_path, **kwargs):
    options = dict(tokenizer="bpe:default", vocab_size=VOCAB, concat_tokens=SEQ_LEN, text_field="body",
                   cache_dir=str(tmp_path / "cache"), progress=False)
    options.update(kwargs)
    return prepare(inputs, str(out), **options)


def _config(out: str, tokenizer: str, **dataset) -> Config:
    return Config(max_seq_len=SEQ_LEN, global_train_batch_size=2, tokenizer=TokenizerConfig(name=tokenizer),
                  train_loader=LoaderConfig(dataset=DatasetConfig(source="mds", local=out, **dataset)))


def _joined(documents) -> str:
    return "".join(text + EOS_TOKEN for text in documents)


def test_jsonl_to_token_rows_that_train_and_decode_to_the_text(jsonl, tmp_path):
    out = tmp_path / "out"
    result = _prepare([jsonl], out, tmp_path, compression="zstd", hashes=["xxh64", "sha1"], size_limit=300)
    assert result.num_documents == len(DOCUMENTS) and result.tokenizer_path == str(out / "tokenizer.json")
    dataset = MDSDataset(str(out), "train")
    assert len(dataset) == result.num_samples > 4 and dataset.num_shards > 1
    assert dataset.columns == {"tokens": "ndarray:int32"}
    index = json.load(open(out / "train" / "index.json"))
    assert index["shards"][0]["compression"] == "zstd" and index["shards"][0]["hashes"] == ["sha1", "xxh64"]
    tokenizer = load_tokenizer(TokenizerConfig(name=result.tokenizer_path), cache_dir=str(tmp_path))
    stored = np.concatenate([dataset[i]["tokens"] for i in range(len(dataset))])
    assert stored.dtype == np.int32 and result.num_tokens == stored.size
    text = tokenizer.decode(stored)
    assert _joined(DOCUMENTS).startswith(text) and len(text) > 0.8 * len(_joined(DOCUMENTS))  # only the tail row is dropped
    assert text.count(EOS_TOKEN) >= len(DOCUMENTS) - 1

    train, _, loaded = build_loaders(_config(str(out), result.tokenizer_path, split="train", shuffle=False),
                                     cache_dir=str(tmp_path / "run"))
    assert loaded.eos_token_id == tokenizer.eos_token_id
    batches = [next(train)["input_ids"] for _ in range(train.batches_per_epoch)]
    assert all(batch.shape == (2, SEQ_LEN) and batch.dtype == np.int32 for batch in batches)
    assert tokenizer.decode(np.concatenate(batches).ravel()) == tokenizer.decode(stored[: len(batches) * 2 * SEQ_LEN])
    shuffled, _, _ = build_loaders(_config(str(out), result.tokenizer_path, split="train"), cache_dir=str(tmp_path / "run"))
    rows = np.concatenate([next(shuffled)["input_ids"] for _ in range(shuffled.batches_per_epoch)])
    assert len(rows) == train.batches_per_epoch * 2
    assert not collections.Counter(map(tuple, rows)) - collections.Counter(map(tuple, stored.reshape(-1, SEQ_LEN)))


def test_text_glob_with_worker_processes_matches_one_process(tmp_path):
    (tmp_path / "docs").mkdir()
    for index, text in enumerate(DOCUMENTS[:6]):
        (tmp_path / "docs" / f"doc{index:02d}.txt").write_text(text)
    glob = str(tmp_path / "docs" / "*.txt")
    one = _prepare([glob], tmp_path / "one", tmp_path)
    two = _prepare([glob], tmp_path / "two", tmp_path, workers=2)
    rows_one, rows_two = (MDSDataset(result.out) for result in (one, two))
    assert len(rows_one) == len(rows_two) == one.num_samples > 0
    for i in range(len(rows_one)):
        np.testing.assert_array_equal(rows_one[i]["tokens"], rows_two[i]["tokens"])
    tokenizer = load_tokenizer(TokenizerConfig(name=one.tokenizer_path), cache_dir=str(tmp_path))
    text = tokenizer.decode(np.concatenate([rows_one[i]["tokens"] for i in range(len(rows_one))]))
    assert _joined(DOCUMENTS[:6]).startswith(text) and text.count(EOS_TOKEN) >= 4


def test_raw_text_dataset_trains_with_on_the_fly_tokenizing(jsonl, tmp_path):
    out = tmp_path / "raw"
    result = _prepare([jsonl], out, tmp_path, tokenize=False, split="val")
    assert result.num_samples == len(DOCUMENTS) and result.tokenizer_path is None
    assert list(MDSDataset(str(out), "val").texts()) == DOCUMENTS
    cfg = _config(str(out), "bpe:default", split="val", shuffle=False)
    cfg.tokenizer.kwargs = {"vocab_size": VOCAB}
    train, _, tokenizer = build_loaders(cfg, cache_dir=str(tmp_path / "run"))
    first = tokenizer.decode(next(train)["input_ids"].ravel())
    assert _joined(DOCUMENTS).startswith(first)
    again = _prepare([f"mds:{out}"], tmp_path / "from_mds", tmp_path, text_field="text", input_split="val")
    assert again.num_documents == len(DOCUMENTS) and again.num_samples > 0


def test_foundry_int64_bytes_rows_and_wrong_lengths(tmp_path):
    local = str(tmp_path / "tokens_bytes")
    shutil.copytree(os.path.join(FIXTURES, "tokens_bytes"), local)
    tokenizer_path = str(tmp_path / "tok.json")
    load_tokenizer(TokenizerConfig(name="bpe:default", kwargs={"vocab_size": VOCAB}), cache_dir=str(tmp_path),
                   train_texts=lambda: iter(DOCUMENTS)).save(tokenizer_path)
    train, _, _ = build_loaders(_config(local, tokenizer_path, shuffle=False), cache_dir=str(tmp_path / "run"))
    np.testing.assert_array_equal(next(train)["input_ids"], np.arange(32).reshape(2, SEQ_LEN))
    cfg = _config(local, tokenizer_path)
    cfg.max_seq_len = 8
    with pytest.raises(ConfigError, match=r"shard .*train/shard\.00000\.mds holds rows of 16 tokens but max_seq_len is 8"):
        build_loaders(cfg, cache_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="pre-tokenized MDS.*tokenizer.json"):
        build_loaders(_config(local, "bpe:default"), cache_dir=str(tmp_path / "run"))


def test_cli_writes_and_reports_errors_in_one_line(jsonl, tmp_path, capsys):
    out = str(tmp_path / "cli")
    code = main([jsonl, "--out", out, "--text-field", "body", "--concat-tokens", str(SEQ_LEN), "--vocab-size",
                 str(VOCAB), "--cache-dir", str(tmp_path / "cache"), "--hashes", "sha1", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and f"to {os.path.join(out, 'train')}" in printed and "tokenizer.json" in printed
    assert main([jsonl, "--out", out, "--text-field", "body", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "not empty" in error and error.count("\n") == 1
    assert main([jsonl, "--out", str(tmp_path / "x"), "--text-field", "missing", "--no-progress"]) == 2
    assert "corpus.jsonl:1 has no string field 'missing'" in capsys.readouterr().err
    assert main(["tfds:no_such_dataset_here", "--out", str(tmp_path / "t"), "--no-tokenize", "--no-progress",
                 "--tfds-data-dir", str(tmp_path / "tfds")]) == 2
    assert "tfds:no_such_dataset_here" in capsys.readouterr().err


def test_cli_refuses_an_out_that_is_a_file_before_reading_the_inputs(jsonl, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.write_text("kept\n")
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "train").write_text("kept\n")
    corpus = open(jsonl).read()
    cases = [(existing, f"--out {existing}: is a file; pass a folder"),
             (existing / "sub", f"--out {existing / 'sub'}: {existing} is a file, not a folder"),
             (tmp_path / "dataset", f"--out {tmp_path / 'dataset'}: {tmp_path / 'dataset' / 'train'} is a file")]
    for out, start in cases:
        assert main([jsonl, "--out", str(out), "--text-field", "body", "--vocab-size", str(VOCAB),
                     "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured.err
        assert captured.err.startswith(f"error: {start}"), captured.err
        assert "Traceback" not in captured.err
    assert existing.read_text() == "kept\n" and (tmp_path / "dataset" / "train").read_text() == "kept\n"
    assert open(jsonl).read() == corpus and not (tmp_path / "cache").exists()  # no tokenizer was trained


def test_cli_refuses_a_split_a_cache_or_an_mds_input_that_cannot_be_one_line(jsonl, tmp_path, capsys):
    """A --split that is not a plain name (it would write outside --out), a --cache-dir that is a
    file, and an mds: input that is a file are each one line, and nothing is written."""
    cases = [(["--split", "../../escaped"], "--split '../../escaped': give a plain folder name"),
             (["--split", ""], "--split '': give a plain folder name"),
             (["--split", "/tmp/elsewhere"], "--split '/tmp/elsewhere': give a plain folder name"),
             (["--cache-dir", jsonl], f"--cache-dir {jsonl}: {os.path.abspath(jsonl)} is a file; pass a folder")]
    for extra, start in cases:
        assert main([jsonl, "--out", str(tmp_path / "out"), "--text-field", "body", "--no-progress", *extra]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: {start}") and captured.err.count("\n") == 1, captured.err
    assert main([f"mds:{jsonl}", "--out", str(tmp_path / "out"), "--no-tokenize", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no MDS dataset at {jsonl} (split 'train'): {jsonl} is a file, not a dataset "
                          f"folder") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escaped").exists()


def test_cli_tokenizer_errors_name_the_flags(jsonl, tmp_path, capsys):
    missing = tmp_path / "missing.json"
    assert main([jsonl, "--out", str(tmp_path / "o"), "--tokenizer", str(missing), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --tokenizer '{missing}': no tokenizer file at {missing}") and "tokenizer.name" not in err


def test_streaming_reads_a_prepared_dataset(jsonl, tmp_path, run_streaming):
    out = tmp_path / "out"
    _prepare([jsonl], out, tmp_path, compression="zstd", hashes=["sha1"], size_limit=300)
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); from reference_streaming import import_streaming; "
              "import_streaming(); from streaming import StreamingDataset; "
              "d = StreamingDataset(local=sys.argv[2], split='train', validate_hash='sha1', batch_size=1); "
              "print(json.dumps([d[i]['tokens'].tolist() for i in range(len(d))]))")
    result = run_streaming(["-c", script, FIXTURES, str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = MDSDataset(str(out), "train")
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [ours[i]["tokens"].tolist() for i in range(len(ours))]


def test_quickstart_trains_on_prepared_shards_by_changing_only_its_data_section(jsonl, tmp_path):
    """JSONL -> token shards, then `python -m jaxtrain.main --config configs/quickstart.yaml` on them."""
    out = tmp_path / "shards"
    result = _prepare([jsonl], out, tmp_path)
    data = ["train_loader.dataset.source=mds", f"train_loader.dataset.local={out}",
            "eval_loader.dataset.source=mds", f"eval_loader.dataset.local={out}", "eval_loader.dataset.split=train",
            f"tokenizer.name={result.tokenizer_path}"]
    quick = [f"variables.max_seq_len={SEQ_LEN}", "model.d_model=64", "model.n_layers=2", f"model.vocab_size={VOCAB}",
             "global_train_batch_size=4", "device_train_microbatch_size=4", "max_duration=4ba", "eval_interval=0",
             "progress_bar=false", f"run_folder={tmp_path / 'run'}", "save_folder=null"]
    command = [sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"]
    for override in (*quick, *data):
        command += ["--set", override]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.jsonl") as handle:
        losses = [json.loads(line)["train/loss"] for line in handle if "train/loss" in line]
    assert len(losses) == 4 and all(np.isfinite(losses)) and losses[0] > 0
    assert "held-out loss" in done.stdout

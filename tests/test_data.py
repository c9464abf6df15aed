"""jaxtrain.data: the stdlib corpus, tokenizers, packing and the resumable loader."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from jaxtrain.config.schema import ConfigError
from jaxtrain.config.schema import Config, DatasetConfig, LoaderConfig, TokenizerConfig
from jaxtrain.data import (
    BatchLoader,
    Documents,
    build_loaders,
    list_stdlib_files,
    load_or_pack,
    load_tokenizer,
    pack_documents,
    pack_token_lists,
    split_files,
    stdlib_documents,
)
from jaxtrain.data.loader import IGNORE_INDEX
from jaxtrain.data.tokenizer import bpe_train_max_chars, capped_texts
from jaxtrain.data.stdlib_corpus import is_held_out

SMALL_VOCAB = 512
SNIPPETS = [
    "def f(x):\n    return x ** 2  # square\n",
    "\tclass Ünïcode:\n\t\tπ = 3.14159\n\n\n   trailing   \n",
    "s = '日本語テキスト 🚀 emoji'\r\nprint(s)\n",
    "",
    "    ",
]


@pytest.fixture(scope="module")
def small_corpus() -> Documents:
    return stdlib_documents("train", max_files=24)


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory, small_corpus):
    cfg = TokenizerConfig(name="bpe:default", kwargs={"vocab_size": SMALL_VOCAB})
    return load_tokenizer(cfg, cache_dir=str(tmp_path_factory.mktemp("tok")), train_texts=small_corpus.texts)


# ----------------------------------------------------------------------------- stdlib corpus


def test_stdlib_split_is_stable_disjoint_and_about_the_fraction():
    files = list_stdlib_files()
    assert len(files) > 200
    assert all(not f.startswith("/") and "\\" not in f and f.endswith(".py") for f in files)
    assert not any(part in ("site-packages", "test", "idlelib", "encodings") for f in files for part in f.split("/"))
    assert files == list_stdlib_files()
    train, held_out = split_files(files, 0.05)
    assert set(train).isdisjoint(held_out) and set(train) | set(held_out) == set(files)
    assert 0.02 < len(held_out) / len(files) < 0.10
    # A cap changes which files are read, never which split a file belongs to.
    capped_train, capped_held_out = split_files(files[:100], 0.05)
    assert set(capped_held_out) == set(held_out) & set(files[:100])
    assert set(capped_train) == set(train) & set(files[:100])
    assert is_held_out(held_out[0], 0.05) and not is_held_out(train[0], 0.05)


def test_stdlib_caps_and_empty_split_error():
    assert len(list_stdlib_files(max_files=7)) == 7
    capped = list_stdlib_files(max_bytes=200_000)
    assert 0 < len(capped) < len(list_stdlib_files())
    with pytest.raises(ConfigError, match="raise max_files or holdout_fraction"):
        stdlib_documents("eval", holdout_fraction=0.0, max_files=5)
    with pytest.raises(ConfigError, match="split='bogus'"):
        stdlib_documents("bogus")


# ----------------------------------------------------------------------------- tokenizers


def test_bpe_trains_caches_and_retrains_on_changed_vocab(tmp_path, small_corpus):
    calls = []

    def texts():
        calls.append(1)
        return small_corpus.texts()

    cfg = TokenizerConfig(name="bpe:default", kwargs={"vocab_size": SMALL_VOCAB})
    first = load_tokenizer(cfg, cache_dir=str(tmp_path), train_texts=texts, train_fingerprint="corpus-a")
    assert calls == [1] and first.vocab_size == SMALL_VOCAB
    (cached,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert cached.endswith("tokenizer.json")
    mtime = os.stat(cached).st_mtime_ns
    second = load_tokenizer(cfg, cache_dir=str(tmp_path), train_texts=texts, train_fingerprint="corpus-a")
    assert calls == [1] and os.stat(cached).st_mtime_ns == mtime
    assert second.encode_batch(SNIPPETS) == first.encode_batch(SNIPPETS)
    bigger = TokenizerConfig(name="bpe:default", kwargs={"vocab_size": SMALL_VOCAB + 64})
    assert load_tokenizer(bigger, cache_dir=str(tmp_path), train_texts=texts, train_fingerprint="corpus-a").vocab_size == SMALL_VOCAB + 64
    load_tokenizer(cfg, cache_dir=str(tmp_path), train_texts=texts, train_fingerprint="corpus-b")
    assert len(calls) == 3


def test_tokenizer_round_trips_code_and_unicode(small_tokenizer):
    assert small_tokenizer.decode(small_tokenizer.encode_batch(["<|endoftext|>"])[0]) == "<|endoftext|>"
    for text, ids in zip(SNIPPETS, small_tokenizer.encode_batch(SNIPPETS)):
        assert small_tokenizer.decode(ids) == text
        assert small_tokenizer.eos_token_id not in ids
    assert small_tokenizer.decode([small_tokenizer.eos_token_id]) == "<|endoftext|>"
    assert small_tokenizer.pad_token_id == small_tokenizer.eos_token_id
    # the batch path (offsets skipped) gives the ids of the plain one-text encoder
    texts = [*SNIPPETS, "a<|endoftext|>b", ""]
    plain = [small_tokenizer.backend.encode(text, add_special_tokens=False).ids for text in texts]
    assert small_tokenizer.encode_batch(texts) == plain


def test_tokenizer_json_path_loads_and_missing_path_is_clear(tmp_path, small_tokenizer):
    small_tokenizer.save(str(tmp_path))
    loaded = load_tokenizer(TokenizerConfig(name=str(tmp_path / "tokenizer.json")), cache_dir=str(tmp_path), train_texts=None)
    assert loaded.encode_batch(SNIPPETS) == small_tokenizer.encode_batch(SNIPPETS)
    assert loaded.eos_token_id == small_tokenizer.eos_token_id
    missing = str(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(ConfigError, match="no tokenizer file at .*nope"):
        load_tokenizer(TokenizerConfig(name=missing), cache_dir=str(tmp_path), train_texts=None)


@pytest.mark.parametrize("offline_env", [None, "1"])
def test_hub_name_fails_fast_and_clearly_offline(tmp_path, monkeypatch, offline_env):
    if offline_env is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        # Stand in for a machine without network, whatever this one has.
        monkeypatch.setattr("jaxtrain.data.tokenizer._HUB_HOST", ("unreachable.invalid", 443))
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="tokenizer.json .*local path") as error:
        load_tokenizer(TokenizerConfig(name="EleutherAI/gpt-neox-20b"), cache_dir=str(tmp_path), train_texts=None)
    assert time.monotonic() - start < 10
    assert "EleutherAI/gpt-neox-20b" in str(error.value)


# ----------------------------------------------------------------------------- packing


def test_pack_token_lists_appends_eos_and_drops_remainder():
    rows = pack_token_lists([[1, 2, 3], [4, 5], [6]], max_seq_len=3, eos_token_id=0)
    assert rows.dtype == np.int32
    np.testing.assert_array_equal(rows, [[1, 2, 3], [0, 4, 5], [0, 6, 0]])
    assert pack_token_lists([[1, 2, 3], [4]], max_seq_len=4, eos_token_id=9).tolist() == [[1, 2, 3, 9]]
    assert pack_token_lists([[1]], max_seq_len=8, eos_token_id=0).shape == (0, 8)


def test_pack_documents_separates_documents_with_eos(small_tokenizer):
    documents = ["alpha = 1\n", "beta = 2\n", "gamma = 3\n"]
    rows = pack_documents(small_tokenizer, documents, max_seq_len=4, eos_token_id=small_tokenizer.eos_token_id)
    assert rows.ndim == 2 and rows.shape[1] == 4
    flat = rows.reshape(-1).tolist()
    assert small_tokenizer.decode(flat).startswith("alpha = 1\n<|endoftext|>beta = 2\n<|endoftext|>gamma")
    assert sum(len(ids) + 1 for ids in small_tokenizer.encode_batch(documents)) // 4 == rows.shape[0]


def test_load_or_pack_caches_so_second_run_skips_tokenising(tmp_path, small_tokenizer):
    calls = []

    def texts():
        calls.append(1)
        yield from ["x = 1\n" * 50, "y = 2\n" * 50]

    documents = Documents("unit", "fingerprint-1", texts, 2)
    first = load_or_pack(documents, small_tokenizer, cache_dir=str(tmp_path), max_seq_len=16, eos_token_id=0)
    second = load_or_pack(documents, small_tokenizer, cache_dir=str(tmp_path), max_seq_len=16, eos_token_id=0)
    assert calls == [1] and first.shape == second.shape and first.shape[1] == 16
    np.testing.assert_array_equal(first, second)
    load_or_pack(documents, small_tokenizer, cache_dir=str(tmp_path), max_seq_len=8, eos_token_id=0)
    assert len(calls) == 2
    # a cache file damaged on disk (cut short) is packed again, to the same rows
    expected = np.asarray(first).copy()
    (path,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.startswith("unit-L16")]
    with open(path, "r+b") as handle:
        handle.truncate(200)
    again = load_or_pack(documents, small_tokenizer, cache_dir=str(tmp_path), max_seq_len=16, eos_token_id=0)
    assert len(calls) == 3
    np.testing.assert_array_equal(again, expected)


def test_a_damaged_cached_tokenizer_is_trained_again(tmp_path, small_corpus):
    cfg = TokenizerConfig(name="bpe:default", kwargs={"vocab_size": SMALL_VOCAB})
    first = load_tokenizer(cfg, cache_dir=str(tmp_path), train_texts=small_corpus.texts, train_fingerprint="a")
    (cached,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    open(cached, "w").close()  # emptied
    second = load_tokenizer(cfg, cache_dir=str(tmp_path), train_texts=small_corpus.texts, train_fingerprint="a")
    assert second.encode_batch(SNIPPETS) == first.encode_batch(SNIPPETS) and os.path.getsize(cached) > 0


# ----------------------------------------------------------------------------- loader


def _rows(num_rows: int = 23, length: int = 4) -> np.ndarray:
    return np.arange(num_rows * length, dtype=np.int32).reshape(num_rows, length)


def _take(loader: BatchLoader, count: int) -> list[np.ndarray]:
    return [next(loader)["input_ids"] for _ in range(count)]


def test_loader_is_deterministic_in_seed_and_covers_each_epoch():
    loader = BatchLoader(_rows(), global_batch_size=5, seed=3)
    assert loader.batches_per_epoch == 4 and loader.num_tokens_per_batch == 20
    batches = _take(loader, 8)
    assert all(b.shape == (5, 4) and b.dtype == np.int32 for b in batches)
    again = _take(BatchLoader(_rows(), global_batch_size=5, seed=3), 8)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = _take(BatchLoader(_rows(), global_batch_size=5, seed=4), 8)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))
    epoch0 = np.concatenate(batches[:4])[:, 0] // 4
    epoch1 = np.concatenate(batches[4:])[:, 0] // 4
    assert len(set(epoch0)) == 20 and len(set(epoch1)) == 20
    assert not np.array_equal(epoch0, epoch1)
    assert loader.state_dict() == {"epoch": 2, "sample_in_epoch": 0, "shuffle_algo": "py1e", "num_canonical_nodes": 1,
                                   "shuffle_block_size": 4_000_000, "shuffle_seed": 3}
    ordered = BatchLoader(_rows(), global_batch_size=5, shuffle=False)
    assert next(ordered)["input_ids"][:, 0].tolist() == [0, 4, 8, 12, 16]


@pytest.mark.parametrize("stop_after", [2, 4, 6])
def test_loader_resumes_exactly_mid_epoch_and_across_epochs(stop_after):
    uninterrupted = _take(BatchLoader(_rows(), global_batch_size=5, seed=11), 10)
    first = BatchLoader(_rows(), global_batch_size=5, seed=11)
    _take(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BatchLoader(_rows(), global_batch_size=5, seed=11)
    resumed.load_state_dict(state)
    for expected, got in zip(uninterrupted[stop_after:], _take(resumed, 10 - stop_after)):
        np.testing.assert_array_equal(expected, got)


def test_process_slices_concatenate_to_the_global_batch():
    whole = BatchLoader(_rows(), global_batch_size=6, seed=5)
    halves = [BatchLoader(_rows(), global_batch_size=6, seed=5, process_index=p, process_count=2) for p in range(2)]
    assert halves[0].local_batch_size == 3
    for _ in range(7):
        expected = next(whole)["input_ids"]
        np.testing.assert_array_equal(np.concatenate([next(h)["input_ids"] for h in halves]), expected)
    with pytest.raises(ConfigError, match="multiple of the process count"):
        BatchLoader(_rows(), global_batch_size=5, process_count=2)


def test_loader_with_too_few_sequences_says_how_many():
    with pytest.raises(ConfigError, match="has 23 sequences .* one global batch of 32"):
        BatchLoader(_rows(), global_batch_size=32)


def test_eval_batches_cover_the_split_in_order_with_padding_ignored():
    loaders = [BatchLoader(_rows(), global_batch_size=None, shuffle=False, pad_token_id=7, process_index=p,
                           process_count=2) for p in range(2)]
    assert loaders[0].num_batches(8) == 3
    per_process = [list(loader.batches(8)) for loader in loaders]
    inputs = np.concatenate([np.concatenate([a["input_ids"], b["input_ids"]]) for a, b in zip(*per_process)])
    labels = np.concatenate([np.concatenate([a["labels"], b["labels"]]) for a, b in zip(*per_process)])
    assert inputs.shape == labels.shape == (24, 4) and per_process[0][0]["input_ids"].shape == (4, 4)
    real = labels[:, 0] != IGNORE_INDEX
    assert real.sum() == 23
    np.testing.assert_array_equal(inputs[real], _rows())
    np.testing.assert_array_equal(labels[real], _rows())
    assert (inputs[~real] == 7).all() and (labels[~real] == IGNORE_INDEX).all()
    # drop_last (Composer's eval dataloader with it): the incomplete last global batch is left out
    assert loaders[0].num_batches(8, drop_last=True) == 2
    kept = [list(loader.batches(8, drop_last=True)) for loader in loaders]
    inputs = np.concatenate([np.concatenate([a["input_ids"], b["input_ids"]]) for a, b in zip(*kept)])
    np.testing.assert_array_equal(inputs, _rows()[:16])


def _config(train: DatasetConfig, eval_dataset: DatasetConfig | None = None, **kwargs) -> Config:
    kwargs.setdefault("tokenizer", TokenizerConfig(name="bpe:default", kwargs={"vocab_size": SMALL_VOCAB}))
    return Config(
        max_seq_len=32,
        global_train_batch_size=4,
        train_loader=LoaderConfig(dataset=train),
        eval_loader=None if eval_dataset is None else LoaderConfig(dataset=eval_dataset),
        **kwargs,
    )


def test_build_loaders_on_the_stdlib_corpus_caches_everything(tmp_path):
    cfg = _config(DatasetConfig(max_files=20, holdout_fraction=0.3),
                  DatasetConfig(split="eval", max_files=20, holdout_fraction=0.3))
    train, evaluation, tokenizer = build_loaders(cfg, cache_dir=str(tmp_path))
    assert tokenizer.vocab_size == SMALL_VOCAB
    batch = next(train)["input_ids"]
    assert batch.shape == (4, 32) and batch.max() < SMALL_VOCAB
    assert evaluation is not None and evaluation.num_sequences > 0
    assert next(evaluation.batches(4))["input_ids"].shape == (4, 32)
    cached = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(tmp_path) for f in fs}
    assert len(cached) == 3
    train_again, _, _ = build_loaders(cfg, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(next(train_again)["input_ids"], batch)
    assert cached == {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(tmp_path) for f in fs}
    with pytest.raises(ConfigError, match="evaluate on training data"):
        build_loaders(_config(DatasetConfig(max_files=20), DatasetConfig(max_files=20)), cache_dir=str(tmp_path))


def test_bpe_learns_from_the_first_train_max_chars_of_the_train_split(tmp_path):
    corpus = stdlib_documents("train", max_files=20, holdout_fraction=0.3)
    lengths = [len(text) for text in corpus.texts()]
    cap = lengths[0] + lengths[1] // 2  # crossed inside the second document, which is kept whole
    assert [len(text) for text in capped_texts(corpus.texts, cap)()] == lengths[:2]
    assert bpe_train_max_chars({}) == 64 * 1024 * 1024 and bpe_train_max_chars({"train_max_chars": 5}) == 5
    for bad in (0, -3, "2M", 1.5, True):
        with pytest.raises(ConfigError, match="tokenizer.kwargs.train_max_chars"):
            bpe_train_max_chars({"train_max_chars": bad})
    dataset = DatasetConfig(max_files=20, holdout_fraction=0.3)
    full_cfg = _config(dataset)
    capped_cfg = _config(dataset, tokenizer=TokenizerConfig(
        name="bpe:default", kwargs={"vocab_size": SMALL_VOCAB, "train_max_chars": lengths[0]}))
    full = build_loaders(full_cfg, cache_dir=str(tmp_path))[2]
    capped = build_loaders(capped_cfg, cache_dir=str(tmp_path))[2]  # cached apart: its own cap, its own file
    first_only = load_tokenizer(capped_cfg.tokenizer, cache_dir=str(tmp_path / "direct"),
                                train_texts=lambda: iter([next(corpus.texts())]))
    assert capped.encode_batch(SNIPPETS) == first_only.encode_batch(SNIPPETS)
    assert full.encode_batch(SNIPPETS) != capped.encode_batch(SNIPPETS)


def test_text_and_jsonl_sources_share_the_packing_path(tmp_path):
    (tmp_path / "docs" / "train").mkdir(parents=True)
    for index in range(6):
        (tmp_path / "docs" / "train" / f"doc{index}.txt").write_text(f"def function_{index}(a, b):\n    return a + b\n" * 20)
    with open(tmp_path / "data.jsonl", "w") as handle:
        for index in range(6):
            handle.write(json.dumps({"content": f"value_{index} = [{index}] * 10\n" * 30}) + "\n")
    cache = str(tmp_path / "cache")
    train, _, _ = build_loaders(_config(DatasetConfig(source="text", local=str(tmp_path / "docs"))), cache_dir=cache)
    assert next(train)["input_ids"].shape == (4, 32)
    jsonl = DatasetConfig(source="jsonl", local=str(tmp_path / "*.jsonl"), text_field="content")
    train, _, tokenizer = build_loaders(_config(jsonl), cache_dir=cache)
    assert "value_" in tokenizer.decode(next(train)["input_ids"][0])
    with pytest.raises(ConfigError, match="no field 'text'"):
        build_loaders(_config(DatasetConfig(source="jsonl", local=str(tmp_path / "data.jsonl"))), cache_dir=cache)
    with pytest.raises(ConfigError, match="no MDS dataset at"):
        build_loaders(_config(DatasetConfig(source="mds", local=str(tmp_path))), cache_dir=cache)
    with pytest.raises(ConfigError, match="matches no input files"):
        build_loaders(_config(DatasetConfig(source="text", local=str(tmp_path / "missing*.txt"))), cache_dir=cache)


def test_json_files_named_by_split_give_that_split_only(tmp_path):
    from jaxtrain.data.sources import JSONL_SUFFIXES, TEXT_SUFFIXES, resolve_files

    for name in ("train.jsonl", "test-00000-of-00002.jsonl", "test-00001-of-00002.jsonl", "validation.json"):
        (tmp_path / name).write_text("{}\n")
    assert resolve_files(str(tmp_path), "train", JSONL_SUFFIXES, "k") == [str(tmp_path / "train.jsonl")]
    assert [os.path.basename(p) for p in resolve_files(str(tmp_path), "test", JSONL_SUFFIXES, "k")] == [
        "test-00000-of-00002.jsonl", "test-00001-of-00002.jsonl"]
    with pytest.raises(ConfigError, match=r"holds files of the splits test, train, validation but none of split "
                                          r"'eval': set k.split to one of them"):
        resolve_files(str(tmp_path), "eval", JSONL_SUFFIXES, "k")
    # text sources read folders as given: a source tree's train.py and test_x.py are documents, not splits
    (tmp_path / "train.py").write_text("x = 1\n")
    (tmp_path / "test_x.py").write_text("y = 2\n")
    assert len(resolve_files(str(tmp_path), "train", TEXT_SUFFIXES, "k")) == 2


def test_a_token_id_outside_the_models_vocabulary_names_its_row():
    from jaxtrain.data.loader import BatchLoader

    rows = np.arange(64, dtype=np.int32).reshape(16, 4)
    rows[11, 2] = 1030
    loader = BatchLoader(rows, global_batch_size=16, shuffle=False)
    assert int(next(loader)["input_ids"].max()) == 1030  # unchecked until the model's vocabulary is known
    loader.vocab_size = 1024
    with pytest.raises(ConfigError, match=r"^train_loader: row 11 holds token id 1030, outside model.vocab_size "
                                          r"1024: the data was tokenized with another tokenizer"):
        next(loader)
    with pytest.raises(ConfigError, match="row 11 holds token id 1030"):
        list(loader.batches(8))
    rows[11, 2] = -1
    with pytest.raises(ConfigError, match="row 11 holds token id -1"):
        list(loader.batches(8))


def test_a_token_id_outside_the_vocabulary_in_mds_shards_names_the_shard(tmp_path):
    from jaxtrain.data.loader import BatchLoader
    from jaxtrain.data.mds import MDSDataset, MDSWriter, TokenRows

    with MDSWriter(str(tmp_path / "mds"), {"tokens": "ndarray:int32:4"}, size_limit=100) as writer:
        for index in range(16):
            writer.write({"tokens": np.arange(4, dtype=np.int32) + (1030 if index == 11 else index)})
    rows = TokenRows([MDSDataset(str(tmp_path / "mds"))], seq_len=4)
    assert rows.where(11).startswith(f"shard {tmp_path / 'mds'}/shard.")
    loader = BatchLoader(rows, global_batch_size=16, shuffle=False)
    loader.vocab_size = 1024
    with pytest.raises(ConfigError) as err:
        next(loader)
    assert f"train_loader: row 11 ({rows.where(11)}) holds token id 1030" in str(err.value)
    assert not rows.where(11).endswith("sample 11")  # the sample within its own shard


def test_eval_loader_drop_last_leaves_out_the_incomplete_batch_in_training_runs(tmp_path):
    """eval_loader.drop_last: true evaluates the full batches only, as Composer's eval dataloader
    does with it; by default every held-out row is scored. A split too small for one full batch is
    a one-line error before anything trains."""
    import contextlib
    import dataclasses
    import io

    from jaxtrain.config import load_config
    from jaxtrain.train.loop import Trainer
    from jaxtrain.train.setup import build_run, eval_batch_size
    from test_end_to_end import ROOT, TINY

    def config(*overrides):
        return load_config(str(ROOT / "configs" / "quickstart.yaml"), [
            *TINY, "max_duration=1ba", "eval_subset_num_batches=-1", "save_folder=null", "log_to_console=false",
            "device_eval_batch_size=7", f"run_folder={tmp_path}/run", *overrides])

    parts = build_run(config())
    calls = []
    step = parts.eval_step
    parts.eval_step = lambda *args: calls.append(1) or step(*args)
    rows, size = parts.eval_loader.num_sequences, eval_batch_size(parts.cfg)
    losses = []
    try:
        for drop_last in (None, True):
            cfg = dataclasses.replace(parts.cfg, eval_loader=dataclasses.replace(parts.cfg.eval_loader,
                                                                                 drop_last=drop_last))
            calls.clear()
            with contextlib.redirect_stdout(io.StringIO()):
                losses.append(Trainer(dataclasses.replace(parts, cfg=cfg)).evaluate())
            assert len(calls) == (rows // size if drop_last else -(-rows // size))
    finally:
        parts.train_loader.close()
    assert (losses[0] != losses[1]) == bool(rows % size)  # the last batch's rows count only by default
    with pytest.raises(ConfigError, match=r"eval_loader.drop_last: true leaves no batch to evaluate: the held-out "
                                          rf"split has {rows} sequences, fewer than one eval batch of 100000"):
        build_run(config("eval_loader.drop_last=true", "device_eval_batch_size=100000"))

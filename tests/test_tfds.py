"""TFDS datasets as a source: real array_record datasets built here (no TensorFlow, no network), read back."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from jaxtrain.config.schema import ConfigError, DatasetConfig
from jaxtrain.data.mds import MDSDataset
from jaxtrain.data.prepare import input_texts
from jaxtrain.data.prepare_cli import main as prepare_main
from jaxtrain.data.tfds_source import TfdsSpec, parse_spec, tfds_documents

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = {
    ("tiny_docs", "short", "train"): ["alpha", "beta gamma", "δέλτα ε"],
    ("tiny_docs", "short", "test"): ["held out"],
    ("tiny_docs", "long", "train"): ["a much longer document " * 4, "another one\nwith two lines"],
    ("tiny_docs", "long", "test"): ["long test"],
    ("tiny_plain", None, "train"): [f"plain document {i}" for i in range(5)],
    ("tiny_plain", None, "test"): ["plain test"],
}
OLD_PLAIN = ["the first version"]  # tiny_plain 1.0.0's train split; 1.1.0 holds TEXTS' tiny_plain


def _build(tfds, data_dir: str, dataset_name: str, version: str, splits: dict, configs: tuple[str, ...] = ()):
    """Prepare ``splits`` ({split: [text, ...]}, per config when ``configs``) as TFDS would, in array_record."""
    import numpy as np

    class TinyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version(version)
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config) for config in configs]

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "id": np.int64}))

        def _split_generators(self, dl_manager):
            texts = splits[self.builder_config.name] if configs else splits
            return {split: self._generate_examples(items) for split, items in texts.items()}

        def _generate_examples(self, items):
            for index, text in enumerate(items):
                yield index, {"text": text, "id": index}

    for config in configs or (None,):
        builder = TinyBuilder(data_dir=data_dir, file_format="array_record", **({"config": config} if config else {}))
        builder.download_and_prepare()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    tfds = pytest.importorskip("tensorflow_datasets")
    tfds.disable_progress_bar()
    root = str(tmp_path_factory.mktemp("tfds"))
    by_config = {config: {split: TEXTS[("tiny_docs", config, split)] for split in ("train", "test")}
                 for config in ("short", "long")}
    _build(tfds, root, "tiny_docs", "1.0.0", by_config, configs=("short", "long"))
    _build(tfds, root, "tiny_plain", "1.0.0", {"train": OLD_PLAIN, "test": ["old test"]})
    _build(tfds, root, "tiny_plain", "1.1.0", {split: TEXTS[("tiny_plain", None, split)] for split in ("train", "test")})
    assert os.path.isfile(os.path.join(root, "tiny_docs", "short", "1.0.0", "dataset_info.json"))
    return root


def _dataset(data_dir, name, **fields) -> DatasetConfig:
    return DatasetConfig(source="tfds", local=data_dir, extra={"tfds_name": name}, **fields)


def _texts(documents) -> list[str]:
    return list(documents.texts())


def _same(texts: list[str], expected: list[str]) -> bool:
    """TFDS stores a split's examples in an order of its own (a hash of their keys): compare as multisets."""
    return sorted(texts) == sorted(expected)


def test_spec_names_dataset_config_version_and_split():
    assert parse_spec("wikipedia/20230601.en") == TfdsSpec("wikipedia", "20230601.en")
    assert parse_spec("mnist:3.0.1") == TfdsSpec("mnist", version="3.0.1")
    assert parse_spec("c4/en:3.1.0:validation[:5%]") == TfdsSpec("c4", "en", "3.1.0", "validation[:5%]")
    assert parse_spec("tiny:train+test") == TfdsSpec("tiny", split="train+test")
    with pytest.raises(ConfigError, match=r"NAME\[/CONFIG\]\[:VERSION\]\[:SPLIT\]"):
        parse_spec("a/b/c")


def test_training_source_reads_each_config_split_and_slice(data_dir):
    short = tfds_documents(_dataset(data_dir, "tiny_docs/short"), key="train_loader.dataset")
    assert _same(_texts(short), TEXTS[("tiny_docs", "short", "train")])
    assert short.name == "tfds:tiny_docs/short:1.0.0:train" and short.num_files == 1
    long_test = tfds_documents(_dataset(data_dir, "tiny_docs/long", split="test"), key="eval_loader.dataset")
    assert _same(_texts(long_test), TEXTS[("tiny_docs", "long", "test")])
    assert _texts(tfds_documents(_dataset(data_dir, "tiny_docs/short:test", split="train"), key="k")) == ["held out"]
    train = _texts(tfds_documents(_dataset(data_dir, "tiny_plain"), key="k"))
    assert _same(train, TEXTS[("tiny_plain", None, "train")])
    both = tfds_documents(_dataset(data_dir, "tiny_plain", split="train[:2]+test"), key="k")
    assert _texts(both) == train[:2] + ["plain test"] and both.num_files == 2
    folder = os.path.join(data_dir, "tiny_plain", "1.1.0")  # a version folder itself, no name needed
    assert _texts(tfds_documents(DatasetConfig(source="tfds", local=folder), key="k")) == train


def test_training_packs_tfds_documents_like_any_other_source(data_dir, tmp_path):
    from jaxtrain.config.schema import TokenizerConfig
    from jaxtrain.data.packing import load_or_pack
    from jaxtrain.data.tokenizer import load_tokenizer

    documents = tfds_documents(_dataset(data_dir, "tiny_plain"), key="train_loader.dataset")
    tokenizer = load_tokenizer(TokenizerConfig(name="bpe:default", kwargs={"vocab_size": 300}),
                               cache_dir=str(tmp_path / "tok"), train_texts=documents.texts,
                               train_fingerprint=documents.fingerprint)
    rows = load_or_pack(documents, tokenizer, cache_dir=str(tmp_path / "cache"), max_seq_len=8,
                        eos_token_id=tokenizer.eos_token_id)
    assert rows.shape[1] == 8 and rows.shape[0] >= 2
    text = tokenizer.decode([int(token) for token in rows.reshape(-1)])
    assert "plain document" in text


def test_build_loaders_trains_and_evaluates_on_tfds_splits(data_dir, tmp_path):
    """``source: tfds`` through the loaders a run uses: train split shuffled, test split held out."""
    import numpy as np

    from jaxtrain.config.schema import Config, LoaderConfig, TokenizerConfig
    from jaxtrain.data.build import build_loaders

    cfg = Config(
        max_seq_len=4, global_train_batch_size=2,
        tokenizer=TokenizerConfig(name="bpe:default", kwargs={"vocab_size": 300}),
        train_loader=LoaderConfig(dataset=_dataset(data_dir, "tiny_plain")),
        eval_loader=LoaderConfig(dataset=_dataset(data_dir, "tiny_plain", split="test")),
    )  # fmt: skip
    train, evaluation, tokenizer = build_loaders(cfg, cache_dir=str(tmp_path))
    batch = next(train)
    assert batch["input_ids"].shape == (2, 4)
    seen = tokenizer.decode([int(t) for t in np.asarray(train.rows[: train.num_sequences]).reshape(-1)])
    assert all(text in seen for text in TEXTS[("tiny_plain", None, "train")])
    held_out = tokenizer.decode([int(t) for t in np.asarray(evaluation.rows[: evaluation.num_sequences]).reshape(-1)])
    assert held_out.startswith("plain te") and "document" not in held_out  # the last partial row is dropped


def test_newest_version_by_default_and_fingerprint_follows_the_files(data_dir):
    newest = tfds_documents(_dataset(data_dir, "tiny_plain"), key="k")
    old = tfds_documents(_dataset(data_dir, "tiny_plain:1.0.0"), key="k")
    assert _same(_texts(newest), TEXTS[("tiny_plain", None, "train")]) and _texts(old) == OLD_PLAIN
    assert newest.fingerprint != old.fingerprint
    assert tfds_documents(_dataset(data_dir, "tiny_plain"), key="k").fingerprint == newest.fingerprint
    assert tfds_documents(_dataset(data_dir, "tiny_plain", text_field="id"), key="k").fingerprint != newest.fingerprint
    shard = os.path.join(data_dir, "tiny_plain", "1.0.0", "tiny_plain-train.array_record-00000-of-00001")
    stat = os.stat(shard)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as if rebuilt
    assert tfds_documents(_dataset(data_dir, "tiny_plain:1.0.0"), key="k").fingerprint != old.fingerprint


def test_bad_names_splits_fields_and_formats_are_one_line_errors(data_dir, tmp_path):
    cases = [
        (_dataset(data_dir, "tiny_docs"), r"tiny_docs is prepared .* for the configs long, short: name one"),
        (_dataset(data_dir, "tiny_docs/short", split="validation"), r"has no split 'validation' \(it has test, train\)"),
        (_dataset(data_dir, "tiny_plain:2.0.0"), r"tiny_plain is not prepared .*prepared versions: 1\.0\.0, 1\.1\.0"),
        (DatasetConfig(source="tfds", local=data_dir), r"k\.extra\.tfds_name is not set"),
        (_dataset(data_dir, "tiny_plain", remote="s3://bucket/tfds"), r"k\.remote is set"),
    ]
    for dataset, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as error:
            tfds_documents(dataset, key="k")
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"has no feature 'body' \(it has id, text\): set k\.text_field"):
        _texts(tfds_documents(_dataset(data_dir, "tiny_plain", text_field="body"), key="k"))
    not_text = r"feature 'id' holds .*not text: set {} to a Text feature \(text\)"
    with pytest.raises(ConfigError, match=not_text.format(r"k\.text_field")):
        _texts(tfds_documents(_dataset(data_dir, "tiny_plain", text_field="id"), key="k"))
    with pytest.raises(ConfigError, match=not_text.format("--text-field")):
        list(input_texts(["tfds:tiny_plain"], text_field="id", tfds_data_dir=data_dir)())
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(data_dir, "tiny_plain"), copy / "tiny_plain")
    info_path = copy / "tiny_plain" / "1.1.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps(dict(info, fileFormat="tfrecord")))
    with pytest.raises(ConfigError, match=r"stored as tfrecord.*tfds build tiny_plain --file_format=array_record"):
        tfds_documents(_dataset(str(copy), "tiny_plain"), key="k")
    info_path.write_text(json.dumps(info))
    os.remove(copy / "tiny_plain" / "1.1.0" / "tiny_plain-test.array_record-00000-of-00001")
    with pytest.raises(ConfigError, match=r"split 'test' .* has 0 of its 1 shard files"):
        tfds_documents(_dataset(str(copy), "tiny_plain", split="test"), key="k")


@pytest.mark.parametrize("name", ["mnist", "wikipedia/20230601.en", "no_such_dataset:1.0.0"])
def test_a_dataset_that_is_not_prepared_fails_fast_offline(name, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    empty = str(tmp_path / "empty")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        tfds_documents(_dataset(empty, name), key="train_loader.dataset")
    elapsed = time.perf_counter() - started
    message = str(error.value)
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert "\n" not in message and "is not prepared in" in message and empty in message
    assert "tfds build" in message and "--file_format=array_record" in message and "train_loader.dataset.local" in message
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"tfds build .*--data_dir=.*or point --tfds-data-dir at the data_dir"):
        input_texts([f"tfds:{name}"], tfds_data_dir=empty)
    assert time.perf_counter() - started < 5


def test_without_tensorflow_datasets_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import tensorflow_datasets now fails
    with pytest.raises(ConfigError, match=r"needs tensorflow-datasets.*pip install 'jaxtrain\[tfds\]'") as error:
        tfds_documents(_dataset(str(tmp_path), "tiny_plain"), key="train_loader.dataset")
    assert "\n" not in str(error.value)
    assert prepare_main(["tfds:tiny_plain", "--out", str(tmp_path / "out"), "--no-tokenize", "--no-progress"]) == 2


def test_data_prepare_command_writes_a_tfds_split_as_mds(data_dir, tmp_path):
    """In a fresh process, where the builders above are unknown: only the prepared files are read."""
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from jaxtrain.cli import run; run()", "data", "prepare", "tfds:tiny_docs/long", "--tfds-data-dir",
               data_dir, "--out", str(out), "--no-tokenize", "--no-progress"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "elsewhere")))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrote 2 samples" in done.stdout
    assert _same(list(MDSDataset(str(out), "train").texts()), TEXTS[("tiny_docs", "long", "train")])
    missing = subprocess.run([*command[:5], "tfds:not_here", *command[6:]], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("error: tfds:not_here: not_here is not prepared in ")


def _copy(data_dir: str, tmp_path) -> str:
    """A copy of ``tiny_plain`` (both versions) to damage."""
    copy = str(tmp_path / "copy")
    shutil.copytree(os.path.join(data_dir, "tiny_plain"), os.path.join(copy, "tiny_plain"))
    return copy


def _shard(root: str, split: str) -> str:
    return os.path.join(root, "tiny_plain", "1.1.0", f"tiny_plain-{split}.array_record-00000-of-00001")


def _truncate(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(3000)


def _flip(path: str) -> None:
    with open(path, "r+b") as handle:
        data = bytearray(handle.read())
        data[2000:] = bytes(byte ^ 0xFF for byte in data[2000:])
        handle.seek(0)
        handle.write(data)


@pytest.mark.parametrize("damage", [_truncate, _flip])
def test_a_damaged_shard_is_one_line_naming_the_file(damage, data_dir, tmp_path, capsys):
    copy = _copy(data_dir, tmp_path)
    damage(_shard(copy, "test"))
    rebuild = f"`tfds build tiny_plain:1.1.0 --file_format=array_record --overwrite --data_dir={copy}`"
    with pytest.raises(ConfigError) as error:  # the train shard is read whole before the damaged test shard
        _texts(tfds_documents(_dataset(copy, "tiny_plain", split="train+test"), key="train_loader.dataset"))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"train_loader.dataset (tfds:tiny_plain): shard file {_shard(copy, 'test')} of "
                              f"tiny_plain:1.1.0 split 'train+test' is damaged (")
    assert message.endswith(f"): prepare the dataset again with {rebuild}")
    assert _same(_texts(tfds_documents(_dataset(copy, "tiny_plain"), key="k")), TEXTS[("tiny_plain", None, "train")])
    code = prepare_main(["tfds:tiny_plain:test", "--tfds-data-dir", copy, "--out", str(tmp_path / "out"),
                         "--no-tokenize", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: tfds:tiny_plain:test: shard file {_shard(copy, 'test')} of tiny_plain:1.1.0 "
                          f"split 'test' is damaged (") and rebuild in err


SPLIT_MISTAKES = [
    ("train[3:1]", r"runs backwards \(train\[3:1\]: FROM must come before TO\)"),
    ("train[:0]", r"selects no example \(train\[:0\] of the 5 in 'train'\)"),
    ("train[:2]+test[1:]", r"selects no example \(test\[1:\] of the 1 in 'test'\)"),
    ("train[9:]", r"selects no example \(train\[9:\] starts past the 5 of 'train'\)"),
    ("train[:200%]", r"has a percent bound outside -100%\.\.100%"),
    ("train[abc]", r"is not a TFDS split expression"),
    ("train[", r"is not a TFDS split expression"),
]


@pytest.mark.parametrize(("split", "reason"), SPLIT_MISTAKES, ids=[split for split, _ in SPLIT_MISTAKES])
def test_a_split_that_selects_nothing_or_does_not_parse_names_its_key(split, reason, data_dir):
    forms = r"as NAME or NAME\[FROM:TO\] .*train\[:1000\], train\[10%:\].*a slice must select at least one example$"
    where = [
        (lambda: tfds_documents(_dataset(data_dir, "tiny_plain", split=split), key="k"), r"k\.split"),
        (lambda: tfds_documents(_dataset(data_dir, f"tiny_plain:{split}"), key="k"),
         r"the split in k\.extra\.tfds_name"),
        (lambda: input_texts([f"tfds:tiny_plain:{split}"], tfds_data_dir=data_dir),
         rf"the split in tfds:tiny_plain:{re.escape(split)}"),
        (lambda: input_texts(["tfds:tiny_plain"], input_split=split, tfds_data_dir=data_dir), r"--input-split"),
    ]
    for make, key in where:
        with pytest.raises(ConfigError) as error:
            make()  # refused when the dataset is named, before any reading
        message = str(error.value)
        assert "\n" not in message and "tfds build" not in message, message
        assert re.search(rf"split {re.escape(repr(split))} of tiny_plain:1\.1\.0 {reason}: write {key} {forms}",
                         message), message


def test_streams_are_refused_with_tfds(data_dir, tmp_path):
    from jaxtrain.config.schema import Config, LoaderConfig, TokenizerConfig
    from jaxtrain.data.build import build_loaders

    for streams in ({"a": {"local": data_dir}}, {"a": {"local": data_dir, "proportion": 1.0}}):
        cfg = Config(max_seq_len=4, global_train_batch_size=2,
                     tokenizer=TokenizerConfig(name="bpe:default", kwargs={"vocab_size": 300}),
                     train_loader=LoaderConfig(dataset=_dataset(data_dir, "tiny_plain", streams=streams)))
        with pytest.raises(ConfigError, match=r"^train_loader\.dataset\.streams is set, but streams are for MDS "
                                              r"data \(source: mds\).*train_loader\.dataset\.extra\.tfds_name"):
            build_loaders(cfg, cache_dir=str(tmp_path))

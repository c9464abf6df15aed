"""jaxtrain's MDS writer and reader against MosaicML Streaming's own files, both ways."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxtrain.config.schema import ConfigError
from jaxtrain.data.mds import MDSDataset, MDSWriter, TokenRows, encode, parse_size
from jaxtrain.data.mds import encodings

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "mds")
EXPECTED = json.load(open(os.path.join(FIXTURES, "expected.json")))


def copy_fixture(name: str, tmp_path) -> str:
    """A private copy (reading a compressed shard writes its decompressed form beside it)."""
    target = os.path.join(tmp_path, name)
    shutil.copytree(os.path.join(FIXTURES, name), target)
    return target


def rebuild(tag: dict):
    """The value a tagged expected.json entry describes."""
    (kind, value), = tag.items()
    if kind == "ndarray":
        return np.array(value["values"], dtype=value["dtype"]).reshape(value["shape"])
    if kind == "bytes":
        return bytes.fromhex(value)
    if kind == "json_text":
        return json.loads(value)
    if kind == "image":
        from PIL import Image
        return Image.open(io.BytesIO(bytes.fromhex(value["png"]))).convert(value["mode"])
    return value


def assert_value(encoding: str, actual, tag: dict) -> None:
    expected = rebuild(tag)
    if isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        np.testing.assert_array_equal(actual, expected)
    elif encoding in encodings.SCALAR_DTYPES:
        assert actual.dtype == np.dtype(encoding) and actual == expected
    elif encoding == "jpeg":
        assert actual.format == "JPEG" and actual.size == expected.size
        assert hashlib.sha1(actual.tobytes()).hexdigest() == tag["image"]["decoded_sha1"]
    elif encoding in ("png", "pil"):
        assert actual.mode == expected.mode and actual.tobytes() == expected.tobytes()
    else:
        assert type(actual) is type(expected) and actual == expected


# ----------------------------------------------------------------------------- reading Streaming's files


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reads_every_sample_streaming_wrote(name, tmp_path):
    if name == "images":
        pytest.importorskip("PIL", reason="Pillow is needed for the image columns")
    expected = EXPECTED[name]
    dataset = MDSDataset(copy_fixture(name, tmp_path))
    assert len(dataset) == len(expected["samples"])
    assert dataset.columns == dict(sorted(expected["columns"].items()))
    for index, record in enumerate(expected["samples"]):
        sample = dataset[index]
        assert sorted(sample) == sorted(record)
        for column, tag in record.items():
            assert_value(expected["columns"][column], sample[column], tag)
    assert dataset[-1].keys() == sample.keys()


def test_fixtures_cover_multiple_shards_compression_and_hashes():
    index = json.load(open(os.path.join(FIXTURES, "arrays", "index.json")))
    assert len(index["shards"]) > 1
    assert all(shard["compression"] == "zstd" and set(shard["zip_data"]["hashes"]) == {"sha1", "xxh64"}
               for shard in index["shards"])
    assert len(json.load(open(os.path.join(FIXTURES, "scalars", "index.json")))["shards"]) > 1


def test_opens_only_the_shards_it_reads(tmp_path):
    root = copy_fixture("arrays", tmp_path)
    dataset = MDSDataset(root)
    dataset[0]
    assert sorted(dataset._opened) == [0]
    assert os.path.isfile(os.path.join(root, "shard.00000.mds"))  # decompressed beside the .zstd, as Streaming does
    assert not os.path.exists(os.path.join(root, "shard.00001.mds"))
    assert MDSDataset(root)[0]["fixed"].tolist() == dataset[0]["fixed"].tolist()  # reuses the decompressed file


def test_corrupt_shard_fails_its_hash_and_names_the_shard(tmp_path):
    root = copy_fixture("scalars", tmp_path)
    path = os.path.join(root, "shard.00002.mds")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF
    open(path, "wb").write(bytes(data))
    dataset = MDSDataset(root)
    assert dataset[0]["name"].startswith("sample 0")  # other shards still read
    start = dataset.shard_start(2)
    with pytest.raises(ConfigError, match=r"shard .*shard\.00002\.mds fails its sha1 check"):
        dataset[start]
    assert MDSDataset(root, verify_hashes=False)[start]["i8"] is not None


def test_corrupt_compressed_shard_names_the_zstd_file(tmp_path):
    root = copy_fixture("arrays", tmp_path)
    path = os.path.join(root, "shard.00001.mds.zstd")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x55
    open(path, "wb").write(bytes(data))
    dataset = MDSDataset(root)
    with pytest.raises(ConfigError, match=r"shard\.00001\.mds\.zstd fails its sha1 check"):
        dataset[dataset.shard_start(1)]


def test_truncated_or_missing_shard_is_a_clear_error(tmp_path):
    root = copy_fixture("tokens", tmp_path)
    os.remove(os.path.join(root, "train", "shard.00003.mds"))
    with open(os.path.join(root, "train", "shard.00001.mds"), "r+b") as handle:
        handle.truncate(100)
    dataset = MDSDataset(root, "train")
    with pytest.raises(ConfigError, match=r"shard\.00001\.mds is 100 bytes but index\.json records 332"):
        dataset[dataset.shard_start(1)]
    with pytest.raises(ConfigError, match=r"shard\.00003\.mds is listed in index\.json but missing"):
        dataset[dataset.shard_start(3)]


def test_pickle_is_refused_on_read_and_write(tmp_path):
    with pytest.raises(ConfigError, match=r"shard\.00000\.mds\) column 'obj' \(pkl\).*refused"):
        MDSDataset(copy_fixture("pickled", tmp_path))
    with pytest.raises(ConfigError, match="column 'obj' \\(pkl\\).*pickle"):
        MDSWriter(str(tmp_path / "out"), {"obj": "pkl"})


def test_split_folder_convention_and_missing_dataset(tmp_path):
    root = copy_fixture("tokens", tmp_path)
    assert len(MDSDataset(root, "train")) == 10
    assert len(MDSDataset(os.path.join(root, "train"), "train")) == 10  # a folder with its own index.json
    with pytest.raises(ConfigError, match=r"no MDS dataset at .*tokens \(split 'val'\).*val/index\.json"):
        MDSDataset(root, "val")


def test_unknown_column_encoding_is_named_apart_from_pickle(tmp_path):
    root = copy_fixture("scalars", tmp_path)
    index_path = os.path.join(root, "index.json")
    index = json.load(open(index_path))
    column = index["shards"][1]["column_names"][0]
    index["shards"][1]["column_encodings"][0] = "float128"
    json.dump(index, open(index_path, "w"))
    with pytest.raises(ConfigError, match=rf"shard 1 \(shard\.00001\.mds\) column '{column}' has the unknown MDS "
                                          rf"encoding 'float128': use one of") as error:
        MDSDataset(root)
    assert "\n" not in str(error.value) and "pickle" not in str(error.value)


def _text_dataset(folder, column: str = "body", hashes=("sha1",)) -> str:
    with MDSWriter(str(folder), {column: "str"}, hashes=list(hashes), size_limit=200) as writer:
        for index in range(12):
            writer.write({column: f"document {index}: some words to read " * 3})
    return str(folder)


def test_a_column_the_config_names_but_the_data_lacks(tmp_path):
    from jaxtrain.config.schema import Config, DatasetConfig, LoaderConfig
    from jaxtrain.data.build import build_loaders

    text = _text_dataset(tmp_path / "text" / "train")
    cfg = Config(max_seq_len=16, global_train_batch_size=2, eval_loader=None,
                 train_loader=LoaderConfig(dataset=DatasetConfig(source="mds", local=str(tmp_path / "text"))))
    with pytest.raises(ConfigError, match=r"shard .*shard\.00000\.mds has no column 'text' \(it has body\): set "
                                          r"text_field") as error:
        build_loaders(cfg, cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"shard .*shard\.00000\.mds has no 'tokens' column \(it has body\): .*"
                                          r"re-write the dataset with `jaxtrain data prepare`"):
        TokenRows([MDSDataset(text)], seq_len=16)


def test_a_corrupt_shard_stops_training_with_one_line_and_no_traceback(tmp_path):
    data = _text_dataset(tmp_path / "data" / "train", column="text")
    shard = os.path.join(data, "shard.00000.mds")
    raw = bytearray(open(shard, "rb").read())
    raw[-2] ^= 0xFF
    open(shard, "wb").write(bytes(raw))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"]
    for override in ("train_loader.dataset.source=mds", f"train_loader.dataset.local={tmp_path / 'data'}",
                     f"run_folder={tmp_path / 'run'}", f"save_folder={tmp_path / 'run' / 'checkpoints'}",
                     "progress_bar=false"):
        command += ["--set", override]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "shard.00000.mds fails its sha1 check" in errors[0] and "re-download or re-write the dataset" in errors[0]


# ----------------------------------------------------------------------------- writing Streaming's files


@pytest.mark.parametrize("name", ["scalars", "arrays", "tokens/train", "tokens_bytes/train"])
def test_writer_reproduces_streamings_shards(name, tmp_path):
    expected = EXPECTED[name]
    out = str(tmp_path / "out")
    with MDSWriter(out, expected["columns"], **expected["options"]) as writer:
        for record in expected["samples"]:
            writer.write({column: rebuild(tag) for column, tag in record.items()})
    reference = os.path.join(FIXTURES, name)
    ours, theirs = (json.load(open(os.path.join(folder, "index.json"))) for folder in (out, reference))
    for shard in ours["shards"] + theirs["shards"]:
        shard["zip_data"] = shard["zip_data"] and shard["zip_data"]["basename"]  # compressor builds may differ
    assert ours == theirs
    for shard in theirs["shards"]:
        raw_ours, raw_theirs = (_raw_shard(folder, shard) for folder in (out, reference))
        assert raw_ours == raw_theirs


def _raw_shard(folder: str, shard: dict) -> bytes:
    if shard["zip_data"]:
        return encodings.decompress(shard["compression"], open(os.path.join(folder, shard["zip_data"]), "rb").read())
    return open(os.path.join(folder, shard["raw_data"]["basename"]), "rb").read()


def test_ndarray_header_is_streamings_layout():
    values = np.arange(3, dtype=np.int32)
    assert encode("ndarray", values) == bytes([33, (1 << 2) | 0, 3]) + values.tobytes()
    assert encode("ndarray:int32", values) == bytes([(1 << 2) | 0, 3]) + values.tobytes()
    assert encode("ndarray:int32:3", values) == values.tobytes()
    wide = np.zeros((2, 300), np.uint8)
    assert encode("ndarray:uint8", wide)[:5] == bytes([(2 << 2) | 1]) + np.array([2, 300], np.uint16).tobytes()


def test_writer_rejects_bad_samples_and_options(tmp_path):
    with pytest.raises(ConfigError, match=r"sample 0, column 'x' \(ndarray:int32:4\)"):
        with MDSWriter(str(tmp_path / "a"), {"x": "ndarray:int32:4"}) as writer:
            writer.write({"x": np.zeros(3, np.int32)})
    assert not os.path.exists(tmp_path / "a" / "index.json")  # no index for a failed dataset
    with pytest.raises(ConfigError, match="sorted"):
        MDSWriter(str(tmp_path / "b"), {"x": "int"}, hashes=["xxh64", "sha1"])
    with pytest.raises(ConfigError, match="compression 'lz4'"):
        MDSWriter(str(tmp_path / "c"), {"x": "int"}, compression="lz4")
    with pytest.raises(ConfigError, match="not empty"):
        MDSWriter(FIXTURES, {"x": "int"})
    assert parse_size("64mb") == 1 << 26 and parse_size("100kb") == 102400 and parse_size(1000) == 1000


def test_writes_to_an_fsspec_url(tmp_path):
    fsspec = pytest.importorskip("fsspec", reason="fsspec is optional")
    with MDSWriter("memory://mds-test/out", {"tokens": "ndarray:int32"}, hashes=["sha1"]) as writer:
        for row in range(3):
            writer.write({"tokens": np.full(4, row, np.int32)})
    local = tmp_path / "copy"
    fsspec.filesystem("memory").get("/mds-test/out", str(local), recursive=True)
    assert [MDSDataset(str(local))[i]["tokens"].tolist() for i in range(3)] == [[0] * 4, [1] * 4, [2] * 4]


# ----------------------------------------------------------------------------- token rows


def test_token_rows_gather_int32_and_int64_bytes(tmp_path):
    for name in ("tokens", "tokens_bytes"):
        rows = TokenRows([MDSDataset(copy_fixture(name, tmp_path), "train")], seq_len=16)
        assert rows.shape == (10, 16) and rows.ndim == 2
        np.testing.assert_array_equal(rows[np.array([9, 0, 4])], np.stack([np.arange(16) + 16 * i for i in (9, 0, 4)]))
        assert rows[2:4].dtype == np.int32 and rows[2:4][1, 0] == 48
    with pytest.raises(ConfigError, match=r"shard .*shard\.00000\.mds holds rows of 16 tokens but max_seq_len is 8"):
        TokenRows([MDSDataset(os.path.join(tmp_path, "tokens"), "train")], seq_len=8)


@pytest.mark.parametrize("encoding", ["ndarray:int32", "ndarray", "bytes"])
def test_token_rows_beside_a_column_of_varying_length(tmp_path, encoding):
    """Streaming-written datasets often keep the source text beside the tokens: the samples then
    differ in layout (columns are stored in name order, 'text' before 'tokens'), and each row is
    read from its own position."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50000, (37, 16)).astype(np.int32 if encoding != "bytes" else np.int64)
    with MDSWriter(str(tmp_path / "ds"), {"tokens": encoding, "text": "str", "id": "int"}, size_limit=1500) as writer:
        for index, row in enumerate(tokens):
            value = row.tobytes() if encoding == "bytes" else row
            writer.write({"tokens": value, "text": "x" * int(rng.integers(0, 200)), "id": index})
    dataset = MDSDataset(str(tmp_path / "ds"))
    assert dataset.num_shards > 1 and list(dataset.columns) == ["id", "text", "tokens"]
    rows = TokenRows([dataset], seq_len=16)
    picks = np.array([36, 0, 5, 17, 5, 23])
    np.testing.assert_array_equal(rows[picks], tokens[picks])
    np.testing.assert_array_equal(rows[:], tokens)
    with MDSWriter(str(tmp_path / "ragged"), {"tokens": "ndarray:int32", "text": "str"}) as writer:
        for length in (16, 16, 12):
            writer.write({"tokens": np.zeros(length, np.int32), "text": "x" * length})
    with pytest.raises(ConfigError, match=r"holds tokens rows of different lengths; pre-tokenized rows must all be 16"):
        TokenRows([MDSDataset(str(tmp_path / "ragged"))], seq_len=16)


# ----------------------------------------------------------------------------- read by Streaming itself

READ_WITH_STREAMING = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from reference_streaming import import_streaming
import_streaming()
from streaming import StreamingDataset
import numpy as np

def plain(value):
    if isinstance(value, np.ndarray):
        return {"dtype": value.dtype.name, "shape": list(value.shape), "values": value.ravel().tolist()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "tobytes") and hasattr(value, "mode"):
        return {"mode": value.mode, "size": list(value.size)}
    return value

local = StreamingDataset(local=sys.argv[2], validate_hash="sha1", batch_size=1)  # decompresses the .zstd shards
streamed = StreamingDataset(local=sys.argv[3], split="train", validate_hash="xxh64", batch_size=1)
print(json.dumps({"local": [{k: plain(v) for k, v in local[i].items()} for i in range(len(local))],
                  "streamed": [streamed[i]["tokens"].tolist() for i in range(len(streamed))]}))
"""


def test_streaming_reads_what_jaxtrain_writes(tmp_path, run_streaming):
    from PIL import Image
    columns = {"i8": "int8", "u64": "uint64", "f16": "float16", "f64": "float64", "n": "int", "s": "str", "b": "bytes",
               "j": "json", "any": "ndarray", "typed": "ndarray:float32", "fixed": "ndarray:int16:2,2",
               "jpg": "jpeg", "png": "png"}
    samples = []
    for i in range(7):
        samples.append({"i8": -i, "u64": 2**64 - 1 - i, "f16": 0.5 * i, "f64": i / 3, "n": -(10**12) * i,
                        "s": "é" * i, "b": bytes([i] * i), "j": {"i": i, "l": [i, None]},
                        "any": np.arange(i + 1, dtype=np.int64).reshape(1, -1), "typed": np.full(i + 1, i, np.float32),
                        "fixed": np.full((2, 2), i, np.int16),
                        "jpg": Image.new("RGB", (4 + i, 3), (i, 2 * i, 3 * i)), "png": Image.new("L", (3, 2), i)})
    everything = str(tmp_path / "everything")
    with MDSWriter(everything, columns, compression="zstd", hashes=["sha1", "xxh64"], size_limit=700) as writer:
        for sample in samples:
            writer.write(sample)
    assert MDSDataset(everything).num_shards > 1
    tokens = str(tmp_path / "tokens")
    with MDSWriter(os.path.join(tokens, "train"), {"tokens": "ndarray:int32"}, hashes=["xxh64"], size_limit=200) as writer:
        for row in range(6):
            writer.write({"tokens": np.arange(8, dtype=np.int32) + 8 * row})
    script = tmp_path / "read.py"
    script.write_text(READ_WITH_STREAMING)
    result = run_streaming([str(script), FIXTURES, everything, tokens], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    read = json.loads(result.stdout.strip().splitlines()[-1])
    assert read["streamed"] == [list(range(8 * row, 8 * row + 8)) for row in range(6)]
    for sample, theirs in zip(samples, read["local"], strict=True):
        assert theirs["i8"] == sample["i8"] and theirs["u64"] == sample["u64"] and theirs["n"] == sample["n"]
        assert theirs["f16"] == sample["f16"] and theirs["f64"] == sample["f64"]
        assert theirs["s"] == sample["s"] and theirs["b"] == sample["b"].hex() and theirs["j"] == sample["j"]
        for column in ("any", "typed", "fixed"):
            array = sample[column]
            assert theirs[column] == {"dtype": array.dtype.name, "shape": list(array.shape), "values": array.ravel().tolist()}
        assert theirs["jpg"] == {"mode": "RGB", "size": list(sample["jpg"].size)}
        assert theirs["png"] == {"mode": "L", "size": [3, 2]}

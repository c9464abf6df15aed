"""Remote MDS streaming and remote checkpoints, against a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from jaxtrain.config.schema import Config, ConfigError, DatasetConfig, LoaderConfig, TokenizerConfig
from jaxtrain.data import remote as data_remote
from jaxtrain.data import object_store
from jaxtrain.data.build import build_loaders
from jaxtrain.data.mds import MDSWriter
from jaxtrain.data.tokenizer import load_tokenizer

pytest.importorskip("moto.server")  # the whole module needs the local S3 server
boto3 = pytest.importorskip("boto3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN, NUM_ROWS, BUCKET = 32, 96, "jaxtrain-test"


@pytest.fixture(scope="module")
def s3_server(moto_s3):
    with moto_s3() as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A boto3 client on a fresh bucket; the AWS_* variables point every client at the local server."""
    for name, value in s3_server[1].items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    objects = client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    if objects:
        client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": item["Key"]} for item in objects]})
    client.delete_bucket(Bucket=BUCKET)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A local pre-tokenized MDS dataset (several small shards) and a tokenizer for it."""
    root = tmp_path_factory.mktemp("mds")
    rows = np.random.default_rng(0).integers(0, 250, (NUM_ROWS, SEQ_LEN), dtype=np.int32)
    with MDSWriter(str(root / "data" / "train"), {"tokens": "ndarray:int32"}, hashes=["sha1"], size_limit=1200) as writer:
        for row in rows:
            writer.write({"tokens": row})
    tokenizer = load_tokenizer(TokenizerConfig(name="bpe:default", kwargs={"vocab_size": 300}),
                               cache_dir=str(root / "tok"), train_texts=lambda: iter(["def f(x): return x"] * 20))
    tokenizer.save(str(root / "tokenizer.json"))
    return root


def _upload(client, folder, prefix):
    for name in sorted(os.listdir(folder)):
        client.upload_file(os.path.join(folder, name), BUCKET, f"{prefix}/{name}")


def _config(prepared, **dataset) -> Config:
    return Config(max_seq_len=SEQ_LEN, global_train_batch_size=8,
                  tokenizer=TokenizerConfig(name=str(prepared / "tokenizer.json")),
                  train_loader=LoaderConfig(dataset=DatasetConfig(source="mds", **dataset)), eval_loader=None)


def _shard_files(folder) -> list[str]:
    return [name for name in os.listdir(folder) if name != "index.json"] if os.path.isdir(folder) else []


def _cache_bytes(folder) -> int:
    total = 0
    for name in _shard_files(folder):
        try:
            total += os.path.getsize(folder / name)
        except FileNotFoundError:  # evicted by the predownload thread since the listing
            pass
    return total


def test_streams_the_same_batches_as_the_local_copy_within_the_cache_limit(s3, prepared, tmp_path):
    _upload(s3, prepared / "data" / "train", "ds/train")
    local_loader, _, _ = build_loaders(_config(prepared, local=str(prepared / "data")), cache_dir=str(tmp_path / "a"))
    cache = tmp_path / "cache"
    remote_cfg = _config(prepared, remote=f"s3://{BUCKET}/ds", local=str(cache),
                         extra={"cache_limit": "3kb", "predownload": 16})
    remote_loader, _, _ = build_loaders(remote_cfg, cache_dir=str(tmp_path / "b"))
    num_shards = len(_shard_files(prepared / "data" / "train"))
    assert num_shards >= 6 and remote_loader.num_sequences == local_loader.num_sequences
    peak = 0
    for _ in range(2 * local_loader.batches_per_epoch):  # two epochs, so evicted shards come back
        np.testing.assert_array_equal(next(remote_loader)["input_ids"], next(local_loader)["input_ids"])
        peak = max(peak, _cache_bytes(cache / "train"))
    assert 0 < peak <= 3 * 1024
    remote_loader.close()
    assert not (cache / "train").exists()  # keep_local defaults to false


def test_keep_local_leaves_the_cache(s3, prepared, tmp_path):
    _upload(s3, prepared / "data" / "train", "ds/train")
    cfg = _config(prepared, remote=f"s3://{BUCKET}/ds", local=str(tmp_path / "cache"), extra={"keep_local": True})
    loader, _, _ = build_loaders(cfg, cache_dir=str(tmp_path / "b"))
    next(loader)
    loader.close()
    assert _shard_files(tmp_path / "cache" / "train")


def test_a_shard_missing_for_a_moment_is_retried(s3, prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(object_store, "RETRY_BASE_SECONDS", 0.2)
    source = prepared / "data" / "train"
    _upload(s3, source, "ds/train")
    first = json.loads((source / "index.json").read_text())["shards"][0]["raw_data"]["basename"]
    s3.delete_object(Bucket=BUCKET, Key=f"ds/train/{first}")
    dataset = data_remote.RemoteMDSDataset(f"s3://{BUCKET}/ds", str(tmp_path / "c1"), "train", retries=0)
    with pytest.raises(ConfigError, match=rf"s3://{BUCKET}/ds/train/{first}.*download_retry"):
        dataset[0]
    dataset.close()
    threading.Timer(0.3, s3.upload_file, (str(source / first), BUCKET, f"ds/train/{first}")).start()
    dataset = data_remote.RemoteMDSDataset(f"s3://{BUCKET}/ds", str(tmp_path / "c2"), "train", retries=3)
    assert len(dataset[0]["tokens"]) == SEQ_LEN  # failed at 0 s and 0.2 s, found at 0.6 s
    dataset.close()


def test_missing_remote_dataset_is_one_clear_line(s3, prepared, tmp_path):
    cfg = _config(prepared, remote=f"s3://{BUCKET}/nothing", local=str(tmp_path / "c"), extra={"download_retry": 0})
    with pytest.raises(ConfigError, match=rf"s3://{BUCKET}/nothing/index.json") as error:
        build_loaders(cfg, cache_dir=str(tmp_path / "b"))
    assert "\n" not in str(error.value)


def _remote_dataset(**dataset) -> DatasetConfig:
    return DatasetConfig(source="mds", **{"remote": f"s3://{BUCKET}/ds", "local": None, **dataset})


@pytest.mark.parametrize("key", ["train_loader.dataset", "eval_loader.dataset"])
@pytest.mark.parametrize("extra, message", [
    ({"predownload": "abc"}, r"extra\.predownload='abc' is not a whole number"),
    ({"predownload": 2.5}, r"extra\.predownload=2\.5 is not a whole number"),
    ({"download_retry": "x"}, r"extra\.download_retry='x' is not a whole number"),
    ({"download_retry": True}, r"extra\.download_retry=True is not a whole number"),
    ({"download_retry": -1}, r"extra\.download_retry=-1 is negative"),
    ({"cache_limit": "1.2.3mb"}, r"extra\.cache_limit='1\.2\.3mb' is not a size"),
    ({"keep_local": "nope"}, r"extra\.keep_local='nope' is not a boolean: write true or false"),
    ({"keep_local": 2}, r"extra\.keep_local=2 is not a boolean"),
    ({"validate_hash": "maybe"}, r"extra\.validate_hash='maybe' is not a boolean"),
])
def test_extra_options_of_a_remote_dataset_that_are_not_values_are_one_line_naming_the_key(extra, message, key):
    with pytest.raises(ConfigError, match=rf"^{key}\.{message}") as error:  # checked before anything is fetched
        data_remote.open_mds_datasets(_remote_dataset(extra=extra), key=key)
    assert "\n" not in str(error.value)


def test_extra_booleans_read_the_strings_the_environment_gives(s3, prepared, tmp_path):
    for value, expected in [(True, True), ("true", True), ("Yes", True), ("1", True), (1, True), (False, False),
                            ("false", False), ("NO", False), (" 0 ", False), (0, False), (None, None), ("", None)]:
        got = data_remote.bool_option({"keep_local": value}, "keep_local", "k", None)
        assert got is expected, value
    _upload(s3, prepared / "data" / "train", "ds/train")
    for keep in ("false", "true"):  # as ${oc.env:KEEP} gives them
        cache = tmp_path / f"cache-{keep}"
        [dataset] = data_remote.open_mds_datasets(_remote_dataset(local=str(cache), extra={
            "keep_local": keep, "validate_hash": "false", "download_retry": "1", "predownload": "0"}),
            key="train_loader.dataset")
        assert dataset.verify_hashes is False and dataset.retries == 1
        assert len(dataset[0]["tokens"]) == SEQ_LEN
        dataset.close()
        assert bool(_shard_files(cache / "train")) is (keep == "true")
    [local] = data_remote.open_mds_datasets(DatasetConfig(source="mds", local=str(prepared / "data"),
                                                          extra={"validate_hash": "false"}), key="k")
    assert local.verify_hashes is False


def test_an_unknown_extra_key_is_one_warning_naming_the_nearest_known_one(prepared, monkeypatch, capsys):
    monkeypatch.setattr(data_remote, "_warned", set())
    dataset = DatasetConfig(source="mds", local=str(prepared / "data"), extra={
        "cache_limt": "10mb", "shuffle_seed": 3, "download_timeout": 60, "keep_zip": False})
    for _ in range(2):  # opened twice (documents, then rows): warned once
        data_remote.open_mds_datasets(dataset, key="train_loader.dataset")
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [
        "warning: unknown key 'train_loader.dataset.extra.cache_limt' (ignored); "
        "did you mean 'train_loader.dataset.extra.cache_limit'?",
        "warning: unknown key 'train_loader.dataset.extra.shuffle_seed' (ignored); "
        "did you mean 'train_loader.dataset.shuffle_seed'?"]  # Streaming's own options pass quietly


@pytest.mark.parametrize("url, message", [
    ("foo://namenode/data", "foo:// is not a storage scheme jaxtrain can read; use s3://BUCKET/PATH, "
                            "gs://BUCKET/PATH or a local copy of the dataset in train_loader.dataset.local"),
    ("s3://", "no bucket in the URL; write s3://BUCKET/PATH"),
    ("s3:///data", "no bucket in the URL; write s3://BUCKET/PATH"),
    ("gs://", "no bucket in the URL; write gs://BUCKET/PATH"),
])
def test_a_remote_url_without_a_bucket_or_of_another_scheme_is_refused_up_front(url, message, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("nothing is fetched")

    monkeypatch.setattr(data_remote.ObjectStore, "get", never)
    with pytest.raises(ConfigError) as error:
        data_remote.open_mds_datasets(_remote_dataset(remote=url), key="train_loader.dataset")
    assert str(error.value).startswith(f"train_loader.dataset.remote={url}: {message}")


def _count_attempts(monkeypatch, fail=None) -> collections.Counter:
    """Count ``ObjectStore.get`` calls by URL; ``fail(url)`` may return an error to raise instead."""
    counts, original = collections.Counter(), data_remote.ObjectStore.get

    def get(store, name, path):
        counts[store.where(name)] += 1
        error = fail(store.where(name)) if fail else None
        if error is not None:
            raise error
        original(store, name, path)

    monkeypatch.setattr(data_remote.ObjectStore, "get", get)
    return counts


def test_a_missing_bucket_or_index_is_named_at_once_without_retries(s3, tmp_path, monkeypatch):
    monkeypatch.setattr(object_store, "RETRY_BASE_SECONDS", 30.0)  # a retry would time the test out
    counts = _count_attempts(monkeypatch)
    options = {"local": str(tmp_path / "c"), "extra": {"download_retry": 3}}
    with pytest.raises(ConfigError) as error:
        data_remote.open_mds_datasets(_remote_dataset(remote="s3://no-such-bucket-here/ds", **options), key="k")
    assert str(error.value).startswith("k.remote=s3://no-such-bucket-here/ds: no such bucket 'no-such-bucket-here' at "
                                       "http://127.0.0.1:")
    for url in (f"s3://{BUCKET}/nothing", f"s3://{BUCKET}"):  # a prefix with nothing under it, an empty bucket
        with pytest.raises(ConfigError) as error:
            data_remote.open_mds_datasets(_remote_dataset(remote=url, **options), key="k")
        assert str(error.value).startswith(f"k.remote={url}: no index.json at {url}/train/index.json or "
                                           f"{url}/index.json; point remote at the folder holding index.json")
        assert "\n" not in str(error.value)
    assert set(counts.values()) == {1}  # each place asked once
    assert not os.path.exists(tmp_path / "c" / "train" / "index.json")


def test_access_denied_to_the_index_is_one_line_and_not_retried(s3, prepared, tmp_path, monkeypatch):
    from botocore.exceptions import ClientError

    monkeypatch.setattr(object_store, "RETRY_BASE_SECONDS", 30.0)
    _upload(s3, prepared / "data" / "train", "ds/train")
    counts = _count_attempts(monkeypatch, lambda url: ClientError(
        {"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadObject"))
    with pytest.raises(ConfigError) as error:
        data_remote.open_mds_datasets(_remote_dataset(extra={"download_retry": 3}), key="k")
    message = str(error.value)
    assert message.startswith(f"k.remote=s3://{BUCKET}/ds: cannot read s3://{BUCKET}/ds/train/index.json or "
                              f"s3://{BUCKET}/ds/index.json (ClientError: ")
    assert "access denied" in message and "credentials" in message and "\n" not in message
    assert set(counts.values()) == {1}


def test_a_damaged_index_in_the_bucket_is_named_by_its_url(s3, tmp_path):
    s3.put_object(Bucket=BUCKET, Key="ds/train/index.json", Body=b"{not json")
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as error:
        data_remote.open_mds_datasets(_remote_dataset(local=str(cache)), key="train_loader.dataset")
    assert str(error.value) == (
        f"train_loader.dataset.remote: s3://{BUCKET}/ds/train/index.json is not an MDS index (JSON with a 'shards' "
        f"list): upload it again, or write the dataset there again with jaxtrain data prepare --out s3://{BUCKET}/ds")
    assert not os.path.exists(cache / "train" / "index.json")  # the damaged copy is not kept


def _count_downloads(monkeypatch, corrupt_first: str | None = None) -> collections.Counter:
    """Count ``ObjectStore.get`` calls by object name; with ``corrupt_first``, damage that object's first local copy."""
    counts, original = collections.Counter(), data_remote.ObjectStore.get

    def get(store, name, path):
        original(store, name, path)
        counts[name] += 1
        if name == corrupt_first and counts[name] == 1:
            with open(path, "r+b") as handle:
                handle.seek(40)
                byte = handle.read(1)
                handle.seek(40)
                handle.write(bytes([byte[0] ^ 0xFF]))

    monkeypatch.setattr(data_remote.ObjectStore, "get", get)
    return counts


def _tree(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(parent, name), folder): open(os.path.join(parent, name), "rb").read()
            for parent, _, names in os.walk(folder) for name in names}


def test_a_shard_corrupt_in_the_bucket_is_downloaded_twice_then_named(s3, prepared, tmp_path, monkeypatch):
    source = prepared / "data" / "train"
    _upload(s3, source, "ds/train")
    first, second = (shard["raw_data"]["basename"] for shard in json.loads((source / "index.json").read_text())["shards"][:2])
    data = bytearray((source / second).read_bytes())
    data[-5] ^= 0xFF  # same size, wrong sha1
    s3.put_object(Bucket=BUCKET, Key=f"ds/train/{second}", Body=bytes(data))
    run = tmp_path / "run"
    (run / "checkpoints" / "3").mkdir(parents=True)
    (run / "checkpoints" / "3" / "state.bin").write_bytes(b"checkpoint bytes")
    before = _tree(run / "checkpoints")
    counts = _count_downloads(monkeypatch)
    dataset = data_remote.RemoteMDSDataset(f"s3://{BUCKET}/ds", str(run / "mds_cache"), "train", retries=0)
    assert len(dataset[0]["tokens"]) == SEQ_LEN  # the first shard is sound
    with pytest.raises(ConfigError) as error:
        dataset[dataset.shard_start(1)]
    message = str(error.value)
    assert "\n" not in message and f"s3://{BUCKET}/ds/train/{second}" in message
    assert "fails its sha1 check" in message and "re-upload it or regenerate the dataset" in message
    assert "validate_hash: false" in message
    assert counts[second] == 2 and counts[first] == 1
    assert _tree(run / "checkpoints") == before
    assert second not in os.listdir(run / "mds_cache" / "train")  # the corrupt copy is not kept
    dataset.close()
    unchecked = data_remote.RemoteMDSDataset(f"s3://{BUCKET}/ds", str(tmp_path / "c2"), "train", verify_hashes=False)
    assert len(unchecked[unchecked.shard_start(1)]["tokens"]) == SEQ_LEN  # validate_hash: false reads it as it is
    unchecked.close()


@pytest.mark.parametrize("compressed", [False, True])
def test_a_shard_corrupted_on_the_way_is_downloaded_again(s3, prepared, tmp_path, monkeypatch, compressed):
    source = prepared / "data" / "train"
    if compressed:
        source = tmp_path / "zstd"
        rows = np.random.default_rng(1).integers(0, 250, (24, SEQ_LEN), dtype=np.int32)
        with MDSWriter(str(source), {"tokens": "ndarray:int32"}, compression="zstd", hashes=["xxh64"],
                       size_limit=1200) as writer:
            for row in rows:
                writer.write({"tokens": row})
    _upload(s3, source, "ds/train")
    shards = json.loads((source / "index.json").read_text())["shards"]
    second = (shards[1].get("zip_data") or shards[1]["raw_data"])["basename"]
    counts = _count_downloads(monkeypatch, corrupt_first=second)
    dataset = data_remote.RemoteMDSDataset(f"s3://{BUCKET}/ds", str(tmp_path / "cache"), "train", retries=0)
    local = data_remote.MDSDataset(str(source))
    start = dataset.shard_start(1)
    np.testing.assert_array_equal(dataset[start]["tokens"], local[start]["tokens"])
    assert counts[second] == 2
    dataset.close()


def test_an_unreachable_endpoint_is_one_line_naming_the_url_within_seconds(prepared, tmp_path, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the probe goes: nothing listens there
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(object_store, "RETRY_BASE_SECONDS", 0.1)
    cfg = _config(prepared, remote=f"s3://{BUCKET}/ds", local=str(tmp_path / "c"), extra={"download_retry": 1})
    started = time.perf_counter()
    # the first place index.json may be (remote/split) is retried and named: an endpoint that does not
    # answer is not a reason to look elsewhere
    with pytest.raises(ConfigError, match=rf"s3://{BUCKET}/ds/train/index\.json after 2 attempts") as error:
        build_loaders(cfg, cache_dir=str(tmp_path / "b"))
    assert time.perf_counter() - started < 30
    assert "\n" not in str(error.value) and f"127.0.0.1:{port}" in str(error.value)


CLI_OVERRIDES = ("variables.max_seq_len=64 model.d_model=64 model.n_layers=2 model.vocab_size=1024 "
                 "tokenizer.kwargs.vocab_size=1024 train_loader.dataset.max_files=60 eval_loader.dataset.max_files=200 "
                 "global_train_batch_size=8 device_train_microbatch_size=4 eval_interval=0 progress_bar=false "
                 "max_duration=6ba save_interval=3ba").split()


def _train(run_folder, *overrides, env):
    command = [sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"]
    for override in (*CLI_OVERRIDES, f"run_folder={run_folder}", *overrides):
        command += ["--set", override]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(run_folder) -> dict[int, float]:
    losses = {}
    with open(os.path.join(run_folder, "metrics.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            if "train/loss" in record:
                losses[int(record["step"])] = record["train/loss"]
    return losses


def test_remote_save_folder_resumes_with_the_same_losses(s3, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    save_folder = f"s3://{BUCKET}/run/checkpoints"
    _train(tmp_path / "whole", f"save_folder={save_folder}", env=env)  # saves steps 3 and 6
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert "run/checkpoints/tokenizer.json" in keys
    assert {"run/checkpoints/3/_JAXTRAIN_UPLOADED", "run/checkpoints/6/_JAXTRAIN_UPLOADED"} <= set(keys)
    # As if the upload of step 6 had been cut short: autoresume must take step 3.
    s3.delete_object(Bucket=BUCKET, Key="run/checkpoints/6/_JAXTRAIN_UPLOADED")
    _train(tmp_path / "resumed", f"save_folder={save_folder}", "autoresume=true", env=env)
    whole, resumed = _losses(tmp_path / "whole"), _losses(tmp_path / "resumed")
    assert set(whole) == {1, 2, 3, 4, 5, 6} and set(resumed) == {4, 5, 6}
    for step, loss in resumed.items():
        assert loss == pytest.approx(whole[step], rel=1e-5)
    from jaxtrain.checkpoint.load import load_checkpoint
    loaded = load_checkpoint(save_folder)
    assert loaded.step == 6 and loaded.tokenizer_path and os.path.isfile(loaded.tokenizer_path)


def test_data_prepare_writes_to_a_bucket_that_trains_by_streaming(s3, tmp_path):
    """`jaxtrain data prepare ... --out s3://...` uploads shards + tokenizer; a streamed loader reads them back."""
    from jaxtrain.data.prepare import prepare

    documents = tmp_path / "docs.jsonl"
    documents.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 3}) + "\n"
                                 for i in range(60)))
    url = f"s3://{BUCKET}/prepared"
    result = prepare([str(documents)], url, vocab_size=300, concat_tokens=SEQ_LEN, size_limit=2000,
                     hashes=["xxh64"], cache_dir=str(tmp_path / "prep-cache"), progress=False)
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert {"prepared/tokenizer.json", "prepared/train/index.json"} <= keys
    assert sum(key.endswith(".mds") for key in keys) > 1  # several shards under the size limit
    assert not os.listdir(tmp_path / "prep-cache") or not any(
        name.endswith(".mds") for _, _, names in os.walk(tmp_path / "prep-cache") for name in names)
    s3.download_file(BUCKET, "prepared/tokenizer.json", str(tmp_path / "tokenizer.json"))
    cfg = Config(max_seq_len=SEQ_LEN, global_train_batch_size=4,
                 tokenizer=TokenizerConfig(name=str(tmp_path / "tokenizer.json")),
                 train_loader=LoaderConfig(dataset=DatasetConfig(source="mds", remote=url, local=str(tmp_path / "c"),
                                                                 shuffle=False)), eval_loader=None)
    loader, _, tokenizer = build_loaders(cfg, cache_dir=str(tmp_path / "run"))
    assert loader.num_sequences == result.num_samples
    text = tokenizer.decode([int(t) for t in next(loader)["input_ids"].ravel()])
    assert text.startswith("def f0(x):\n    return x * 0\n")
    loader.close()
    assert not (tmp_path / "c" / "train").exists()
    # The quickstart trains on the bucket by changing only its data section; no shard stays behind.
    run, cache = tmp_path / "quickstart", tmp_path / "stream-cache"
    data = ("train_loader.dataset.source=mds", f"train_loader.dataset.remote={url}",
            f"train_loader.dataset.local={cache}", f"tokenizer.name={tmp_path / 'tokenizer.json'}",
            "eval_loader.dataset.source=mds", f"eval_loader.dataset.remote={url}",
            f"eval_loader.dataset.local={tmp_path / 'eval-cache'}", "eval_loader.dataset.split=train")
    overrides = [item for item in CLI_OVERRIDES if not item.startswith(("tokenizer.", "train_loader.", "eval_loader."))]
    command = [sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"]
    for override in (*overrides, f"variables.max_seq_len={SEQ_LEN}", f"run_folder={run}", "save_folder=null", *data):
        command += ["--set", override]
    done = subprocess.run(command, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = _losses(run)
    assert set(losses) == {1, 2, 3, 4, 5, 6} and all(np.isfinite(list(losses.values())))
    leftover = [os.path.join(folder, name) for folder, _, names in os.walk(tmp_path)
                if "stream-cache" in folder or "eval-cache" in folder for name in names if name.endswith(".mds")]
    assert leftover == []  # keep_local defaults to false


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """An environment where boto3 finds no credentials anywhere (and asks no metadata server)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_a_remote_save_folder_without_credentials_is_one_line_naming_the_url(no_aws_credentials, tmp_path):
    from jaxtrain.checkpoint.manager import Checkpointer

    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"cannot list s3://nobody-bucket/run/ckpt \(NoCredentialsError") as error:
        Checkpointer("s3://nobody-bucket/run/ckpt", staging=str(tmp_path / "staging"))
    assert "\n" not in str(error.value) and "credentials" in str(error.value)
    assert time.perf_counter() - started < 10  # no retries: nothing a retry could fix


def test_storage_schemes_without_their_package_or_unknown_are_one_line():
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(ConfigError, match=r"gs://bucket/data needs a package that is not installed .*jaxtrain\[gcs\]"):
            data_remote.ObjectStore("gs://bucket/data")
    with pytest.raises(ConfigError, match=r"foo://x/y: foo:// is not a storage scheme jaxtrain can read; use s3://"):
        data_remote.ObjectStore("foo://x/y")  # refused before fsspec loads anything
    # a scheme fsspec knows is handed to it; its package failing to start is one line (hdfs: no JVM here)
    with pytest.raises(ConfigError, match=r"hdfs://namenode/data: cannot open its storage \(OSError: "):
        data_remote.ObjectStore("hdfs://namenode/data")
    for url in ("s3://", "s3:///x", "gs://"):
        with pytest.raises(ConfigError, match=r"no bucket in the URL; write (s3|gs)://BUCKET/PATH"):
            data_remote.ObjectStore(url)


def test_the_train_command_reports_a_bucket_it_cannot_reach_in_one_line(no_aws_credentials, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml",
         "--set", "save_folder=s3://nobody-bucket/run/ckpt", "--set", f"run_folder={tmp_path / 'run'}",
         "--set", "max_duration=2ba", "--set", "train_loader.dataset.max_files=20", "--set", "eval_interval=0",
         "--set", "progress_bar=false"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "s3://nobody-bucket/run/ckpt" in errors[0] and "NoCredentialsError" in errors[0]


@pytest.mark.parametrize("overrides, expected", [
    # pyarrow's HDFS client, which cannot start without a JVM (it printed 150 lines of traceback)
    (("train_loader.dataset.source=mds", "train_loader.dataset.remote=hdfs://namenode/data"),
     "error: hdfs://namenode/data/train: cannot open its storage (OSError: "),
    # a folder in a bucket with no checkpoint as load_path: the advice is about load_path
    ((f"load_path=s3://{BUCKET}/empty",),
     f"error: load_path: s3://{BUCKET}/empty: no complete jaxtrain checkpoint found (expected numbered step "
     f"folders with _JAXTRAIN_UPLOADED); give the save_folder of a run whose checkpoints were uploaded there"),
    # checkpoints to a store that cannot be opened: the error names the key that chose it
    (("save_folder=hdfs://namenode/ckpt",), "error: save_folder: hdfs://namenode/ckpt: cannot open its storage "
                                            "(OSError: "),
])
def test_the_train_command_reports_remote_mistakes_in_one_line(s3, tmp_path, overrides, expected):
    command = [sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"]
    for override in (*CLI_OVERRIDES, f"run_folder={tmp_path / 'run'}", "save_folder=null", *overrides):
        command += ["--set", override]
    done = subprocess.run(command, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.splitlines()[0].startswith(expected), done.stderr[-2000:]
    assert len(done.stderr.splitlines()) == 1
    if not any(override.startswith("save_folder") for override in overrides):  # no mention of a key not set
        assert "save_folder" not in done.stderr.replace("the save_folder of", "")


def test_pruning_old_remote_steps_that_fails_warns_and_keeps_training(s3, tmp_path, monkeypatch, capsys):
    from jaxtrain.checkpoint.remote import RemoteSteps

    steps = RemoteSteps(f"s3://{BUCKET}/run/ckpt", str(tmp_path / "staging"))
    for step in (1, 2):
        os.makedirs(tmp_path / "staging" / str(step))
        (tmp_path / "staging" / str(step) / "weights").write_text(f"step {step}")
    steps.sync([1, 2], keep=-1)

    def refuse(names):
        raise PermissionError("AccessDenied: no s3:DeleteObject")

    monkeypatch.setattr(steps.store, "delete", refuse)
    os.makedirs(tmp_path / "staging" / "3")
    (tmp_path / "staging" / "3" / "weights").write_text("step 3")
    steps.sync([2, 3], keep=2)  # step 1 should go, but the bucket refuses: a warning, not a crash
    assert steps.complete_steps() == [1, 2, 3]
    assert f"could not delete older checkpoints from s3://{BUCKET}/run/ckpt (PermissionError: AccessDenied" in capsys.readouterr().err


def test_a_hugging_face_folder_in_a_bucket_is_a_load_path(s3, tmp_path):
    """LoRA on a Hugging Face MPT folder in a bucket: its weights are downloaded into a temporary
    folder and read as the local folder's are. The checkpoints record the folder with its objects'
    sizes and ETags instead of holding the frozen weights, read them back from the bucket, and
    refuse a folder uploaded again since."""
    import jax
    from flax import nnx

    from jaxtrain.checkpoint.load import load_checkpoint
    from jaxtrain.convert.hf_mpt import export_hf, read_hf
    from jaxtrain.layers import lora
    from test_lora import BASE, fit, run_config

    _upload(s3, str(BASE), "models/mpt")
    s3.put_object(Bucket=BUCKET, Key="models/mpt/pytorch_model.bin", Body=b"not fetched")
    cfg = run_config(tmp_path, BASE, load_path=f"s3://{BUCKET}/models/mpt", max_duration="2ba", save_interval="2ba")
    _, trainer, _, printed = fit(cfg)
    assert f"downloading 2 files of s3://{BUCKET}/models/mpt into " in printed
    assert f"loaded weights from s3://{BUCKET}/models/mpt (step 0); they stay frozen" in printed
    _, hf_weights, _ = read_hf(str(BASE))
    frozen = lora.split_trainable(trainer.state.params)[1]
    for ours, theirs in zip(jax.tree.leaves(nnx.to_pure_dict(frozen)), jax.tree.leaves(hf_weights)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    record = json.loads((tmp_path / "checkpoints" / "2" / "meta" / "metadata").read_text())["frozen_weights"]
    assert record["path"] == f"s3://{BUCKET}/models/mpt" and record["step"] is None
    assert sorted(record["fingerprint"]) == ["config.json", "model.safetensors", "reference.safetensors"]
    saved = lora.split_trainable(load_checkpoint(str(tmp_path / "checkpoints")).params)[1]
    for ours, theirs in zip(jax.tree.leaves(saved), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    export_hf(str(tmp_path / "checkpoints"), str(tmp_path / "peft"), adapter_only=True)  # names the bucket's folder
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == f"s3://{BUCKET}/models/mpt"
    s3.upload_file(str(BASE / "reference.safetensors"), BUCKET, "models/mpt/model.safetensors")
    with pytest.raises(ConfigError, match=r"s3://jaxtrain-test/models/mpt, have changed since it was saved "
                                          r"\(model.safetensors differs\)"):
        load_checkpoint(str(tmp_path / "checkpoints"))


def test_a_sharded_hugging_face_folder_fetches_the_shards_its_index_lists(s3, tmp_path):
    from safetensors.numpy import load_file

    from jaxtrain.convert.remote_hf import fetch_hf_folder, remote_hf_files
    from jaxtrain.convert.safetensors_io import SafetensorsWriter
    from test_lora import BASE

    folder = tmp_path / "sharded"
    folder.mkdir()
    original = load_file(str(BASE / "model.safetensors"))
    entries = [(name, t.shape, lambda t=t: t) for name, t in sorted(original.items())]
    shards = SafetensorsWriter(str(folder), np.dtype(np.float32), 40_000).write(entries)
    (folder / "config.json").write_bytes((BASE / "config.json").read_bytes())
    (folder / "stray.safetensors").write_bytes((BASE / "model.safetensors").read_bytes())
    _upload(s3, str(folder), "sharded")
    assert remote_hf_files(f"s3://{BUCKET}/sharded") == ["config.json", "model.safetensors.index.json"]
    local = fetch_hf_folder(f"s3://{BUCKET}/sharded", print_fn=lambda line: None)
    assert sorted(os.listdir(local)) == sorted(["config.json", "model.safetensors.index.json", *shards])
    assert remote_hf_files(f"s3://{BUCKET}/nothing-here") is None


def test_the_download_cache_keeps_a_bucket_folder_for_later_runs_and_resumes(s3, tmp_path, monkeypatch):
    """With download_cache a Hugging Face folder downloaded from a bucket is kept under the versions
    of its files: a second run and a resume (reading a LoRA run's frozen weights back) download
    nothing; a file uploaded again is a new version, downloaded anew into a folder of its own."""
    import dataclasses

    import jax

    from jaxtrain.convert.remote_hf import CACHE_ENV, set_download_cache
    from jaxtrain.layers import lora
    from test_lora import BASE, fit, run_config

    monkeypatch.delenv(CACHE_ENV, raising=False)
    _upload(s3, str(BASE), "models/cached")
    cache = tmp_path / "weights"
    url = f"s3://{BUCKET}/models/cached"
    for name in ("one", "two", "three"):
        (tmp_path / name).mkdir()
    first = run_config(tmp_path / "one", BASE, load_path=url, download_cache=str(cache), max_duration="2ba",
                       save_interval="2ba")
    counts = _count_downloads(monkeypatch)
    # downloads cut off before: one by a process of this host that is gone (killed), one by a live
    # process, one by another host's process (its liveness unknown here)
    import shutil
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = socket.gethostname()
    left = {f"a.partial-{gone}@{host}-x1": False, f"b.partial-{os.getpid()}@{host}-x2": True,
            f"c.partial-{gone}@elsewhere.example-x3": True}
    for name in left:
        (cache / name).mkdir(parents=True)
        (cache / name / "model.safetensors").write_bytes(b"\0" * 100)
    _, trainer, _, printed = fit(first)
    assert f"downloading 2 files of {url} into the download cache, {cache}" in printed
    assert {name: (cache / name).exists() for name in left} == left
    assert f"removed {cache / next(iter(left))}, an unfinished download of a process that is gone" in printed
    for name in left:
        shutil.rmtree(cache / name, ignore_errors=True)
    assert counts["model.safetensors"] == 1
    [kept] = [name for name in os.listdir(cache) if ".partial-" not in name]
    assert {"config.json", "model.safetensors", ".complete"} <= set(os.listdir(cache / kept))

    # a longer run resumes from step 2: the frozen weights are read back from the cache
    _, resumed, _, printed = fit(dataclasses.replace(first, max_duration="3ba"))
    assert f"at step 2 (the frozen weights read back from {url})" in printed
    assert counts["model.safetensors"] == 1  # from the cache
    for ours, theirs in zip(jax.tree.leaves(lora.split_trainable(resumed.state.params)[1]),
                            jax.tree.leaves(lora.split_trainable(trainer.state.params)[1])):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

    # the same bytes uploaded again are the same version (S3's ETag is their MD5): still cached
    s3.upload_file(str(BASE / "model.safetensors"), BUCKET, "models/cached/model.safetensors")
    _, _, _, printed = fit(run_config(tmp_path / "two", BASE, load_path=url, download_cache=str(cache),
                                      max_duration="1ba", save_folder=None))
    assert f"reading {url} from the download cache, {cache / kept}" in printed and counts["model.safetensors"] == 1
    # other weights (a retrained model) are another version, downloaded anew into a folder of their own
    from safetensors.numpy import load_file, save_file

    save_file({name: value * 1.01 for name, value in load_file(str(BASE / "model.safetensors")).items()},
              str(tmp_path / "retrained.safetensors"))
    s3.upload_file(str(tmp_path / "retrained.safetensors"), BUCKET, "models/cached/model.safetensors")
    _, _, _, printed = fit(run_config(tmp_path / "two", BASE, load_path=url, download_cache=str(cache),
                                      max_duration="1ba", save_folder=None))
    assert "into the download cache" in printed and counts["model.safetensors"] == 2
    # the older version was read a moment ago (a run that started earlier may still be opening it): kept
    versions = [name for name in os.listdir(cache) if ".partial-" not in name]
    assert len(versions) == 2 and kept in versions and "older version" not in printed
    # retrained again once that copy has been idle for longer than STALE_SECONDS: the idle copy goes
    from jaxtrain.convert.remote_hf import STALE_SECONDS

    [retrained] = [name for name in versions if name != kept]
    idle = time.time() - STALE_SECONDS - 60
    os.utime(cache / kept / ".complete", (idle, idle))
    save_file({name: value * 1.02 for name, value in load_file(str(BASE / "model.safetensors")).items()},
              str(tmp_path / "retrained.safetensors"))
    s3.upload_file(str(tmp_path / "retrained.safetensors"), BUCKET, "models/cached/model.safetensors")
    _, _, _, printed = fit(run_config(tmp_path / "two", BASE, load_path=url, download_cache=str(cache),
                                      max_duration="1ba", save_folder=None))
    assert counts["model.safetensors"] == 3
    assert f"removed {cache / kept}, the download cache's copy of an older version of {url}" in printed
    assert not (cache / kept).exists() and (cache / retrained / ".complete").is_file()

    # without the setting nothing is kept (the run resets what an earlier run of the process set)
    _, _, _, printed = fit(run_config(tmp_path / "three", BASE, load_path=url, max_duration="1ba", save_folder=None))
    assert "(removed when the run ends)" in printed and counts["model.safetensors"] == 4
    set_download_cache(None)

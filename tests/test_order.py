"""The epoch sample order: Streaming's shuffles and stream mixing, elastic slicing, resume, prefetch.

Equality with MosaicML Streaming is checked against the real package in the side environment
/work/main/.venv-ref (skipped only when that environment or the package is absent).
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from jaxtrain.config.schema import Config, ConfigError, DatasetConfig, LoaderConfig
from jaxtrain.data import build as build_module
from jaxtrain.data.build import build_loaders
from jaxtrain.data.loader import BatchLoader
from jaxtrain.data.mds.reader import MDSDataset, mds_datasets
from jaxtrain.data.mds.rows import TokenRows
from jaxtrain.data.mds.writer import MDSWriter
from jaxtrain.data.order import SampleOrder, StreamWeight, order_options, shard_choose, stream_choose
from jaxtrain.data.shuffle import get_shuffle, interleave

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "mds")

REFERENCE_SCRIPT = r"""
import json, sys, warnings
sys.path.insert(0, sys.argv[1])
from reference_streaming import import_streaming
import_streaming()
warnings.simplefilter("ignore")
import numpy as np
from streaming import Stream, StreamingDataset
from streaming.base.sampling import get_sampling
from streaming.base.shuffle import get_shuffle

job = json.load(sys.stdin)
out = {"shuffles": [], "samplings": [], "datasets": []}
for algo, sizes, ncn, seed, epoch, block in job["shuffles"]:
    try:
        out["shuffles"].append(get_shuffle(algo, np.array(sizes, np.int64), ncn, seed, epoch, block).tolist())
    except Exception as error:
        out["shuffles"].append(repr(error))
for sizes, choose, granularity, seed, epoch, use_epoch in job["samplings"]:
    out["samplings"].append(get_sampling(np.array(sizes, np.int64), choose, granularity, seed, epoch,
                                         use_epoch).tolist())
for case in job["datasets"]:
    streams = [Stream(local=path, **weights) for path, weights in case["streams"]]
    dataset = StreamingDataset(streams=streams, batch_size=4, shuffle=True, **case["options"])
    epochs = []
    for _ in range(case["epochs"]):
        epochs.append([[int(v) for v in sample["tokens"][:2]] for sample in dataset])
    out["datasets"].append(epochs)
print(json.dumps(out))
"""


def _write_stream(folder, stream_id: int, rows: int, size_limit: int = 160) -> str:
    """An MDS dataset whose row i holds tokens [stream_id, i, 0, 0], in shards of a few rows."""
    with MDSWriter(str(folder), {"tokens": "ndarray:int32"}, size_limit=size_limit) as writer:
        for index in range(rows):
            writer.write({"tokens": np.array([stream_id, index, 0, 0], np.int32)})
    return str(folder)


def _shard_sizes(path: str) -> np.ndarray:
    return np.array([int(entry["samples"]) for entry in MDSDataset(path).shards], np.int64)


SHUFFLE_CASES = [
    [algo, sizes, ncn, seed, epoch, block]
    for algo in ("py1e", "py1br", "py1s", "py2s", "naive")
    for sizes in ([5], [7, 3, 11, 2, 9], [34, 25, 20, 11, 13, 2, 3, 1, 7, 32, 26, 36, 20, 24, 38], [261, 93, 72, 265, 55])
    for ncn in (1, 3, 8)
    for seed, epoch, block in ((7, 2, 4), (9176, 0, 50), (0, 5, 1 << 18))
]
SAMPLING_CASES = [
    [[7, 3, 11, 2, 9], 20, 1, 3, 0, True], [[7, 3, 11, 2, 9], 20, 1, 3, 1, True], [[7, 3, 11, 2, 9], 20, 4, 3, 1, False],
    [[7, 3, 11, 2, 9], 64, 2, 5, 2, True], [[7, 3, 11, 2, 9], 64, 1, 5, 2, True], [[100, 50, 25], 7, 3, 9, 0, True],
]
# Two streams of 37 and 23 rows; the epoch sizes are multiples of the canonical node count.
DATASET_CASES = [
    {"weights": [{"proportion": 0.7}, {"proportion": 0.3}],
     "options": {"shuffle_algo": "py1e", "num_canonical_nodes": 2, "shuffle_seed": 5, "shuffle_block_size": 16,
                 "epoch_size": 80}},
    {"weights": [{"repeat": 1.5}, {"choose": 13}],
     "options": {"shuffle_algo": "py1s", "num_canonical_nodes": 4, "shuffle_seed": 11, "sampling_granularity": 2}},
    {"weights": [{}, {}], "options": {"shuffle_algo": "py1br", "num_canonical_nodes": 3, "shuffle_seed": 2,
                                      "shuffle_block_size": 10}},
    {"weights": [{"proportion": 2}, {"proportion": 1}],
     "options": {"shuffle_algo": "py2s", "num_canonical_nodes": 1, "shuffle_seed": 4, "sampling_method": "fixed",
                 "epoch_size": 50}},
]


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    return [_write_stream(root / "a", 0, 37), _write_stream(root / "b", 1, 23, size_limit=300)]


@pytest.fixture(scope="module")
def reference(run_streaming, once_per_session):
    """Streaming's orders, computed once for the session's test processes."""

    def compute(folder):
        streams = [_write_stream(folder / "a", 0, 37), _write_stream(folder / "b", 1, 23, size_limit=300)]
        job = {"shuffles": SHUFFLE_CASES, "samplings": SAMPLING_CASES,
               "datasets": [{"streams": [[path, weights] for path, weights in zip(streams, case["weights"])],
                             "options": case["options"], "epochs": 2} for case in DATASET_CASES]}
        result = run_streaming(["-c", REFERENCE_SCRIPT, FIXTURES], input=json.dumps(job),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    return once_per_session("streaming_order_reference", compute)


# ----------------------------------------------------------------------------- equality with Streaming


@pytest.mark.parametrize("algo", ["py1e", "py1br", "py1s", "py2s", "naive"])
def test_get_shuffle_equals_streaming(reference, algo):
    compared = 0
    for case, theirs in zip(SHUFFLE_CASES, reference["shuffles"]):
        if case[0] != algo:
            continue
        if isinstance(theirs, str):  # Streaming refuses: py1e with more canonical nodes than samples
            assert algo == "py1e" and sum(case[1]) < case[2]
            ours = get_shuffle(*case)  # we skip the empty canonical nodes instead
            assert sorted(ours.tolist()) == list(range(sum(case[1])))
            continue
        assert get_shuffle(*case).tolist() == theirs, case
        compared += 1
    assert compared >= 30


def test_shard_sampling_equals_streaming(reference):
    for case, theirs in zip(SAMPLING_CASES, reference["samplings"]):
        assert shard_choose(*case).tolist() == theirs, case


@pytest.mark.parametrize("case", range(len(DATASET_CASES)))
def test_streaming_dataset_order_equals_ours(reference, streams, case):
    """A whole StreamingDataset epoch (mixing, resampling, shuffle, canonical nodes) on one rank."""
    config = DATASET_CASES[case]
    options = dict(config["options"])
    seed = options.pop("shuffle_seed")
    order = SampleOrder([_shard_sizes(path) for path in streams],
                        [StreamWeight(str(i), **weights) for i, weights in enumerate(config["weights"])],
                        seed=seed, **options)
    rows = TokenRows([MDSDataset(path) for path in streams], seq_len=4)
    for epoch, theirs in enumerate(reference["datasets"][case]):
        ours = rows[order(epoch)][:, :2].tolist()
        assert ours == theirs, (case, epoch)
    assert order(0).tolist() != order(1).tolist()


# ----------------------------------------------------------------------------- mixing semantics


def _stream_counts(order: SampleOrder, epoch: int) -> list[int]:
    rows = order(epoch)
    return [int(((rows >= lo) & (rows < hi)).sum()) for lo, hi in zip(order._offsets[:-1], order._offsets[1:])]


def test_proportion_repeat_and_choose_counts():
    shards = [np.array([10, 10, 7]), np.array([5, 5])]
    relative = SampleOrder(shards, [StreamWeight("a", proportion=3), StreamWeight("b", proportion=1)], seed=1,
                           epoch_size=100)
    assert relative.epoch_size == 100 and _stream_counts(relative, 0) == [75, 25] == _stream_counts(relative, 3)
    default_size = SampleOrder(shards, [StreamWeight("a", proportion=1), StreamWeight("b", proportion=1)], seed=1)
    assert default_size.epoch_size == 37 and sorted(_stream_counts(default_size, 0)) == [18, 19]
    absolute = SampleOrder(shards, [StreamWeight("a", repeat=2.5), StreamWeight("b", choose=4)], seed=1)
    assert absolute.epoch_size == 67 + 4 and _stream_counts(absolute, 0) == [67, 4]
    # Whole repeats take every row; the fractional part differs per epoch (balanced) ...
    rows = absolute(0)
    assert all((rows == r).sum() >= 2 for r in range(27))
    picked = [np.unique(absolute(epoch)[absolute(epoch) >= 27]).tolist() for epoch in range(4)]
    assert len({tuple(p) for p in picked}) > 1
    # ... and stays the same every epoch with sampling_method fixed; the order still changes.
    fixed = SampleOrder(shards, [StreamWeight("a", repeat=2.5), StreamWeight("b", choose=4)], seed=1,
                        sampling_method="fixed")
    assert len({tuple(np.sort(fixed(epoch)).tolist()) for epoch in range(4)}) == 1
    assert fixed(0).tolist() != fixed(1).tolist()
    # A pure function of its inputs.
    again = SampleOrder(shards, [StreamWeight("a", repeat=2.5), StreamWeight("b", choose=4)], seed=1)
    assert again(2).tolist() == absolute(2).tolist()
    assert stream_choose([27, 10], [StreamWeight(), StreamWeight()], 10, 0).tolist() == [7, 3]


def test_interleave_visits_canonical_nodes_round_robin():
    assert interleave(7, 3).tolist() == [0, 2, 4, 1, 3, 5, 6]
    assert interleave(5, 1).tolist() == list(range(5))
    assert sorted(interleave(1000, 64).tolist()) == list(range(1000))


def test_defaults_do_not_depend_on_the_process_count():
    for algo, ncn in (("py1e", 1), ("py1br", 1), ("py1s", 64), ("py2s", 64), ("naive", 1)):
        params = SampleOrder([np.array([100])], shuffle_algo=algo).params
        assert params.num_canonical_nodes == ncn and params.shuffle_block_size == max(4_000_000 // ncn, 1 << 18)
    # Small datasets are fully shuffled: no canonical node or shard structure shows.
    order = SampleOrder.over_rows(23, seed=3)
    assert sorted(order(0).tolist()) == list(range(23)) and order(0).tolist() != list(range(23))


# ----------------------------------------------------------------------------- the loader


def _mixed_order(seed: int = 4, **options) -> SampleOrder:
    return SampleOrder([np.full(9, 8), np.array([5, 6, 7])], [StreamWeight("a", proportion=0.6),
                                                              StreamWeight("b", proportion=0.4)],
                       seed=seed, epoch_size=90, **options)


def _rows(num_rows: int = 90, length: int = 3) -> np.ndarray:
    return np.arange(num_rows * length, dtype=np.int32).reshape(num_rows, length)


def _take(loader: BatchLoader, count: int) -> list[np.ndarray]:
    return [next(loader)["input_ids"] for _ in range(count)]


@pytest.mark.parametrize("algo", ["py1e", "py1s", "py1b", "none"])
def test_process_slices_concatenate_to_the_global_order(algo):
    order = _mixed_order(shuffle_algo=algo)
    batches = {}
    for count in (1, 2, 4):
        loaders = [BatchLoader(_rows(), global_batch_size=8, order=_mixed_order(shuffle_algo=algo), process_index=p,
                               process_count=count) for p in range(count)]
        batches[count] = [np.concatenate([next(loader)["input_ids"] for loader in loaders]) for _ in range(25)]
    assert loaders[0].batches_per_epoch == 11
    for step in range(25):
        np.testing.assert_array_equal(batches[1][step], batches[2][step])
        np.testing.assert_array_equal(batches[1][step], batches[4][step])
    expected = np.concatenate([order(0)[:88], order(1)[:88], order(2)[:24]])
    np.testing.assert_array_equal(np.concatenate(batches[1])[:, 0] // 3, expected)


@pytest.mark.parametrize("stop_after", [3, 11, 15])
@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_on_another_process_count(stop_after, workers):
    uninterrupted = _take(BatchLoader(_rows(), global_batch_size=8, order=_mixed_order()), 24)
    first = BatchLoader(_rows(), global_batch_size=8, order=_mixed_order(), num_workers=workers)
    _take(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    assert state["epoch"] == stop_after // 11 and state["num_canonical_nodes"] == 1
    halves = [BatchLoader(_rows(), global_batch_size=8, order=_mixed_order(), process_index=p, process_count=2,
                          num_workers=workers) for p in range(2)]
    for half in halves:
        half.load_state_dict(state)
    for expected in uninterrupted[stop_after:]:
        np.testing.assert_array_equal(np.concatenate([next(half)["input_ids"] for half in halves]), expected)
    for half in halves:
        half.close()


def test_resume_keeps_the_checkpoint_order_when_the_config_changes(capsys):
    original = BatchLoader(_rows(), global_batch_size=8, order=_mixed_order(num_canonical_nodes=4))
    expected = _take(original, 6)
    state = BatchLoader(_rows(), global_batch_size=8, order=_mixed_order(num_canonical_nodes=4)).state_dict()
    resumed = BatchLoader(_rows(), global_batch_size=8, order=_mixed_order(num_canonical_nodes=2, seed=9))
    resumed.load_state_dict(state)
    assert "num_canonical_nodes=4 (configured 2)" in capsys.readouterr().err
    assert resumed.order_params.num_canonical_nodes == 4 and resumed.seed == 4
    for batch, got in zip(expected, _take(resumed, 6)):
        np.testing.assert_array_equal(batch, got)
    legacy = BatchLoader(_rows(), global_batch_size=8, order=_mixed_order())
    legacy.load_state_dict({"epoch": 1, "sample_in_epoch": 16})  # states from before the order was stored
    assert legacy.state_dict()["sample_in_epoch"] == 16 and legacy.order_params.num_canonical_nodes == 1


@pytest.mark.parametrize("workers,factor", [(1, None), (3, 1), (2, 4)])
def test_prefetch_gives_the_same_batches_and_state(workers, factor):
    plain = BatchLoader(_rows(), global_batch_size=8, order=_mixed_order(), process_index=1, process_count=2)
    ahead = BatchLoader(_rows(), global_batch_size=8, order=_mixed_order(), process_index=1, process_count=2,
                        num_workers=workers, prefetch_factor=factor)
    for step in range(30):
        assert ahead.state_dict() == plain.state_dict()
        np.testing.assert_array_equal(next(ahead)["input_ids"], next(plain)["input_ids"])
        if step == 13:  # jumping elsewhere drops what was prefetched
            state = {**plain.state_dict(), "sample_in_epoch": 0}
            plain.load_state_dict(state)
            ahead.load_state_dict(state)
    before = threading.active_count()
    ahead.close()
    assert threading.active_count() <= before - workers


class _FailingRows:
    """Rows whose gather fails for one row: as a corrupt shard or a lost download would."""

    ndim, shape = 2, (90, 3)

    def __init__(self, bad_row: int):
        self.bad_row, self.rows = bad_row, _rows()

    def __getitem__(self, indices):
        if self.bad_row in np.asarray(indices).tolist():
            raise ConfigError(f"shard holding row {self.bad_row} fails its sha1 check: re-write the dataset")
        return self.rows[indices]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_a_worker_error_reaches_the_consumer_with_its_message(workers):
    order = _mixed_order()
    bad_row = int(order(0)[8 * 5 + 2])  # in the sixth batch
    loader = BatchLoader(_FailingRows(bad_row), global_batch_size=8, order=_mixed_order(), num_workers=workers)
    _take(loader, 5)
    with pytest.raises(ConfigError, match=f"shard holding row {bad_row} fails its sha1 check"):
        next(loader)
    assert loader.state_dict()["sample_in_epoch"] == 40  # still the failed batch
    with pytest.raises(ConfigError, match="sha1"):
        next(loader)
    loader.close()


# ----------------------------------------------------------------------------- configuration


def _dataset(**fields) -> DatasetConfig:
    return DatasetConfig(source="mds", **fields)


@pytest.mark.parametrize("streams,extra,pattern", [
    ({"a": {"local": "x", "proportion": 1, "repeat": 2}}, {}, r"streams\.a sets proportion and repeat: give at most one"),
    ({"a": {"local": "x", "choose": -3}}, {}, r"streams\.a\.choose=-3 must be non-negative"),
    ({"a": {"local": "x", "choose": 2.5}}, {}, r"streams\.a\.choose=2\.5 must be a whole number"),
    ({"a": {"local": "x", "repeat": "lots"}}, {}, r"streams\.a\.repeat='lots' is not a number"),
    (None, {"shuffle_algo": "py3x"}, r"extra\.shuffle_algo='py3x' is unknown: use one of py1e, py1br"),
    (None, {"sampling_method": "greedy"}, r"extra\.sampling_method='greedy' is unknown"),
    (None, {"num_canonical_nodes": 0}, r"extra\.num_canonical_nodes=0 must be a positive integer"),
    (None, {"batching_method": "per_stream"}, r"extra\.batching_method='per_stream' is not supported"),
])
def test_bad_order_settings_fail_in_one_line_naming_the_key(streams, extra, pattern):
    dataset = _dataset(streams=streams, extra=extra)
    with pytest.raises(ConfigError, match=pattern) as error:
        if streams:
            mds_datasets(dataset, key="train_loader.dataset")
        else:
            order_options(dataset, key="train_loader.dataset")
    assert "\n" not in str(error.value) and "train_loader.dataset." in str(error.value)


def test_mixing_weights_that_streaming_refuses():
    with pytest.raises(ConfigError, match=r"streams\.b: proportion cannot be mixed"):
        SampleOrder([np.array([4]), np.array([4])], [StreamWeight("a", proportion=1), StreamWeight("b", repeat=1)])
    with pytest.raises(ConfigError, match=r"extra\.epoch_size is set, but streams are weighted by repeat or choose"):
        SampleOrder([np.array([4]), np.array([4])], [StreamWeight("a", repeat=2), StreamWeight("b")], epoch_size=9)
    assert order_options(_dataset(extra={"epoch_size": "2k", "shuffle_algo": "PY1S"}), key="k")["epoch_size"] == 2000


def test_build_loaders_mixes_two_mds_streams(streams, monkeypatch):
    """Two token streams through the config: proportions, the Streaming options in extra, prefetch."""

    class _Tokenizer:
        pad_token_id = 0

    monkeypatch.setattr(build_module, "_pretokenized_tokenizer", lambda cfg, dataset, cache_dir: _Tokenizer())
    dataset = DatasetConfig(source="mds", streams={"a": {"local": streams[0], "proportion": 0.25},
                                                   "b": {"local": streams[1], "proportion": 0.75}},
                            extra={"epoch_size": 48, "shuffle_algo": "py1br", "shuffle_block_size": 8})
    cfg = Config(max_seq_len=4, global_train_batch_size=8, eval_loader=None, seed=3,
                 train_loader=LoaderConfig(dataset=dataset, num_workers=2, prefetch_factor=3))
    train, _, _ = build_loaders(cfg, cache_dir="unused")
    assert train.batches_per_epoch == 6 and train.num_workers == 2
    assert train.state_dict()["shuffle_algo"] == "py1br" and train.state_dict()["shuffle_seed"] == 3
    epoch = np.concatenate([next(train)["input_ids"] for _ in range(6)])
    assert (epoch[:, 0] == 0).sum() == 12 and (epoch[:, 0] == 1).sum() == 36
    assert train.state_dict()["epoch"] == 1
    train.close()
    halves = [build_loaders(cfg, cache_dir="unused", process_index=p, process_count=2)[0] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([next(half)["input_ids"] for half in halves]), epoch[:8])
    for half in halves:
        half.close()

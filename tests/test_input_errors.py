"""Bad input to bench, plan, the MDS reader and fine-tuning data: one `error:` line naming the
file, key or shard and what to do, exit status 2, no traceback."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest

from jaxtrain.config import ConfigError
from jaxtrain.config.schema import DatasetConfig
from jaxtrain.data.finetune import read_examples
from jaxtrain.data.mds import MDSDataset, MDSWriter
from jaxtrain.data.mds.reader import mds_datasets
from jaxtrain.plan.cli import main as plan_main
from jaxtrain.train import bench
from jaxtrain.train.command import _error as trainer_error

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def one_error_line(stderr: str) -> str:
    """The single line on stderr, which must be an error line without a traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "error: " in lines[0] and "Traceback" not in stderr
    return lines[0]


def as_trainer_reports(error: ConfigError, capsys) -> str:
    """The line `jaxtrain train` prints for a ConfigError from building its data, and its exit status 2."""
    assert trainer_error(str(error)) == 2
    return one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- jaxtrain bench


def _no_work(*args, **kwargs):
    raise AssertionError("bench did work before reporting the command-line error")


def test_bench_unknown_hardware_is_one_line_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(bench, "load_config", _no_work)
    assert bench.main(["--config", QUICKSTART, "--hardware", "h900"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: --hardware: unknown hardware 'h900'") and "h100" in line


def test_bench_creates_the_folder_of_out_before_the_run(tmp_path, monkeypatch, capsys):
    import jaxtrain.train.setup as setup

    out = tmp_path / "nodir" / "deeper" / "b.json"

    def build_run(cfg, **kwargs):
        assert out.parent.is_dir(), "the folder of --out must exist before the run"
        raise ConfigError("stopped before the run")

    monkeypatch.setattr(setup, "build_run", build_run)
    code = bench.main(["--config", QUICKSTART, "--hardware", "cpu", "--out", str(out),
                       "--set", f"run_folder={tmp_path}/run"])
    assert code == 2 and out.parent.is_dir()
    assert one_error_line(capsys.readouterr().err) == "error: stopped before the run"


@pytest.mark.parametrize("out", ["a_file/b.json", "."])
def test_bench_out_that_cannot_be_written_is_one_line_before_the_run(out, tmp_path, monkeypatch, capsys):
    import jaxtrain.train.setup as setup

    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setattr(setup, "build_run", _no_work)
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--config", QUICKSTART, "--hardware", "cpu", "--out", out]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --out {out}") and ("folder" in line)


def test_bench_keeps_its_result_when_out_goes_away_during_the_run(tmp_path, monkeypatch, capsys):
    """The folder of --out is deleted while the run is timed: the result is printed, not lost."""
    import shutil

    import jax.numpy as jnp

    import jaxtrain.parallel.mesh as mesh
    import jaxtrain.train.setup as setup

    out = tmp_path / "gone" / "b.json"

    def train_step(state, batch):
        shutil.rmtree(out.parent, ignore_errors=True)
        return state, {"loss": jnp.float32(2.5)}

    class Loader:  # batches of packed rows, as far as counting their tokens goes
        drawn = 0

        def __iter__(self):
            return self

        def __next__(self):
            self.drawn += 1
            return self.drawn

        def state_dict(self):
            return {"epoch": 0, "sample_in_epoch": self.drawn}

    parts = types.SimpleNamespace(train_loader=Loader(), state=None, train_step=train_step, mesh=None,
                                  flops_per_batch=1e9, peak_flops_per_device=1e12, peak_source="test",
                                  num_params=10)
    monkeypatch.setattr(setup, "build_run", lambda cfg, **kwargs: parts)
    monkeypatch.setattr(mesh, "global_batch_from_local", lambda batch, mesh: batch)
    code = bench.main(["--config", QUICKSTART, "--hardware", "cpu", "--steps", "2", "--warmup", "0",
                       "--out", str(out), "--set", f"run_folder={tmp_path}/run"])
    captured = capsys.readouterr()
    assert code == 2 and not out.exists()
    line = one_error_line(captured.err)
    assert line.startswith(f"error: --out {out}: cannot write it") and "printed above" in line
    result = json.loads(captured.out[captured.out.index("{"):captured.out.rindex("}") + 1])
    assert result["final_loss"] == 2.5 and result["hardware"] == "cpu"


# ----------------------------------------------------------------------------- jaxtrain plan


def test_plan_prices_file_with_broken_yaml_names_the_file_and_line(tmp_path, capsys):
    prices = tmp_path / "p.yaml"
    prices.write_text("h100: [1\n")
    assert plan_main(["--budget-usd", "5000", "--prices", str(prices), "--no-plot"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{prices}:2: malformed YAML" in line and "fix the file" in line


@pytest.mark.parametrize("text,problem", [
    ("h100: .nan\n", "price for 'h100' must be a finite, non-negative number"),
    ("h100: .inf\n", "price for 'h100' must be a finite, non-negative number"),
])
def test_plan_prices_file_with_a_non_finite_price(text, problem, tmp_path, capsys):
    prices = tmp_path / "p.yaml"
    prices.write_text(text)
    assert plan_main(["--budget-usd", "5000", "--prices", str(prices), "--no-plot"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(prices) in line and problem in line


@pytest.mark.parametrize("argv,message", [
    (["--budget-usd", "inf"], "--budget-usd 'inf' is not an amount of dollars; use e.g. 50000, 50k or 1.5M"),
    (["--budget-usd", "1e400"], "--budget-usd must be a finite number, got inf"),
    (["--hours", "inf"], "--hours must be a finite number, got inf"),
    (["--budget-usd", "5k", "--rungs", "10000"], "--rungs 10000: at most 40"),
    (["--budget-usd", "5k", "--plot", "p.png"], "--plot and --no-plot: one asks for the plot"),
    (["--budget-usd", "100", "--price-per-hour", "inf"], "--price-per-hour must be a finite number, got inf"),
    (["--budget-usd", "100", "--price-per-hour", "nan"], "--price-per-hour must be a finite number, got nan"),
    (["--budget-flops", "1e400"], "--budget-flops '1e400' is too large"),
    (["--budget-usd", "1e300"], "--budget-usd 1e+300 is too large to plan"),
    (["--hours", "1e305"], "--hours 1e+305 on 8 devices is too large to plan"),
    (["--preset", "7b", "--tokens", "1e300"], "--tokens 1e300 is too large to plan"),
])
def test_plan_rejects_infinite_and_overflowing_numbers(argv, message, capsys):
    assert plan_main([*argv, "--no-plot"]) == 2
    assert message in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flag", ["--seq-len", "--devices", "--rungs", "--global-batch", "--microbatch"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_plan_rejects_counts_below_one(flag, value, capsys):
    assert plan_main(["--budget-usd", "100", "--no-plot", flag, value]) == 2
    assert f"{flag} must be at least 1, got {value}" in one_error_line(capsys.readouterr().err)


def test_plan_rejects_a_zero_mesh_axis(capsys):
    assert plan_main(["--memory", "--preset", "125m", "--mesh", "data=0,fsdp=8,tensor=1"]) == 2
    assert "--mesh 'data=0,fsdp=8,tensor=1'" in one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- MDS index.json


@pytest.fixture
def mds_dataset(tmp_path) -> Path:
    """A valid MDS dataset of several small shards in tmp_path/mds/train."""
    root = tmp_path / "mds" / "train"
    with MDSWriter(str(root), {"text": "str"}, size_limit=120) as writer:
        for i in range(12):
            writer.write({"text": f"sample number {i} " * 3})
    assert len(json.loads((root / "index.json").read_text())["shards"]) >= 2
    return root


def _damage(field, value):
    def damage(shard):
        if value is _DELETE:
            del shard[field]
        else:
            shard[field] = value
    return damage


_DELETE = object()


@pytest.mark.parametrize("damage,problem", [
    (_damage("samples", _DELETE), "has no 'samples' field"),
    (_damage("samples", "x"), "field 'samples' is 'x', not a sample count"),
    (_damage("samples", True), "field 'samples' is True"),
    (_damage("samples", -1), "field 'samples' is -1"),
    (_damage("column_names", _DELETE), "has no 'column_names' field"),
    (_damage("column_names", "text"), "field 'column_names' is 'text', not a list"),
    (_damage("column_encodings", []), "field 'column_encodings' is [], not a list of encoding names, one per"),
    (_damage("column_encodings", [7]), "field 'column_encodings' is [7]"),
    (_damage("column_sizes", _DELETE), "has no 'column_sizes' field"),
    (_damage("column_sizes", ["big"]), "field 'column_sizes' is ['big']"),
    (_damage("compression", 5), "field 'compression' is 5"),
    (_damage("compression", "lz4"), "compression 'lz4' is unknown"),
    (_damage("raw_data", _DELETE), "has no 'raw_data' field"),
    (_damage("raw_data", "shard.00001.mds"), "field 'raw_data' is 'shard.00001.mds', not an object"),
    (_damage("raw_data", {"bytes": 10, "hashes": {}}), "field 'raw_data' is"),
    (_damage("zip_data", "x"), "field 'zip_data' is 'x', not an object"),
])
def test_malformed_index_entry_names_the_file_shard_and_field(mds_dataset, damage, problem, capsys):
    index_path = mds_dataset / "index.json"
    index = json.loads(index_path.read_text())
    damage(index["shards"][1])
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConfigError) as error:
        MDSDataset(str(mds_dataset.parent), "train")
    line = as_trainer_reports(error.value, capsys)
    assert line.startswith(f"error: {index_path} shard 1") and problem in line
    assert "re-write the dataset" in line or "use zstd" in line


def test_index_entry_that_is_not_an_object(mds_dataset, capsys):
    index_path = mds_dataset / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][1] = 42
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConfigError) as error:
        MDSDataset(str(mds_dataset))
    line = as_trainer_reports(error.value, capsys)
    assert line.startswith(f"error: {index_path} shard 1 is int") and "re-write the dataset" in line


def test_undamaged_dataset_still_reads(mds_dataset):
    dataset = MDSDataset(str(mds_dataset))
    assert len(dataset) == 12 and dataset[11]["text"].startswith("sample number 11")


# ----------------------------------------------------------------------------- streams keys


def test_stream_key_typo_suggests_the_key(capsys):
    dataset = DatasetConfig(source="mds", streams={"web": {"local": "x", "proportoin": 0.5}})
    with pytest.raises(ConfigError) as error:
        mds_datasets(dataset, key="train_loader.dataset")
    line = as_trainer_reports(error.value, capsys)
    assert line == ("error: unknown key 'train_loader.dataset.streams.web.proportoin'; "
                    "did you mean 'train_loader.dataset.streams.web.proportion'?")


def test_stream_key_far_from_any_lists_the_valid_keys(capsys):
    dataset = DatasetConfig(source="mds", streams={"web": {"local": "x", "zzz": 1}})
    with pytest.raises(ConfigError) as error:
        mds_datasets(dataset, key="train_loader.dataset")
    line = as_trainer_reports(error.value, capsys)
    assert "'train_loader.dataset.streams.web.zzz'" in line and "valid keys: local, split, proportion" in line


def test_streaming_stream_keys_are_still_not_supported_yet():
    dataset = DatasetConfig(source="mds", streams={"web": {"local": "x", "remote": "s3://b/web"}})
    with pytest.raises(ConfigError, match=r"streams\.web: remote not supported yet"):
        mds_datasets(dataset, key="train_loader.dataset")


def test_stream_that_is_not_a_mapping(capsys):
    dataset = DatasetConfig(source="mds", streams={"web": "/data/web"})
    with pytest.raises(ConfigError) as error:
        mds_datasets(dataset, key="train_loader.dataset")
    assert "train_loader.dataset.streams.web is '/data/web'" in as_trainer_reports(error.value, capsys)


# ----------------------------------------------------------------------------- fine-tuning JSONL


def test_finetune_line_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "ft.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(ConfigError) as error:
        read_examples([str(path)])
    line = as_trainer_reports(error.value, capsys)
    assert line.startswith(f"error: {path}:2 is not UTF-8 text") and line.endswith("fix or remove that line")


def test_finetune_good_lines_still_read(tmp_path):
    path = tmp_path / "ft.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\r\n\n{"prompt": "c", "response": "d"}\n')
    examples = read_examples([str(path)])
    assert [(e.prompt, e.response, e.where) for e in examples] == [("a", "b", f"{path}:1"), ("c", "d", f"{path}:3")]
    assert os.path.basename(examples[0].where).startswith("ft.jsonl")

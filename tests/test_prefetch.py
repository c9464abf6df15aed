"""The training command's data prefetch: a child forked before JAX is imported fills the run's data cache."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtrain.config import load_config
from jaxtrain.train.data_prefetch import can_fork, start_prefetch, worth_prefetching

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "variables.max_seq_len=64",
    "model.vocab_size=1024",
    "tokenizer.kwargs.vocab_size=1024",
    "train_loader.dataset.max_files=60",
    "eval_loader.dataset.max_files=200",
]

# Runs in a fresh interpreter (no JAX imported, one thread), as `python -m jaxtrain.main` does.
PREFETCH_THEN_READ = """
import json, os, sys
from jaxtrain.config import load_config
from jaxtrain.train.data_prefetch import can_fork, start_prefetch
from jaxtrain.train.paths import data_cache_dir, expand_run_paths

overrides, run_folder, mode = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = expand_run_paths(load_config("configs/quickstart.yaml", [*overrides, f"run_folder={run_folder}"]), "quickstart")
forkable = can_fork()
prefetch = start_prefetch(cfg)
if mode == "close":  # the run ended before it read its data
    prefetch.close()
    print(json.dumps({"forkable": forkable, "exit_code": prefetch.exit_code, "left": os.path.exists(run_folder)}))
    sys.exit(0)
code = prefetch.wait()
cached = sorted(os.path.relpath(os.path.join(d, f), run_folder) for d, _, fs in os.walk(run_folder) for f in fs)

import numpy as np
from jaxtrain.data import build_loaders, packing, tokenizer

def refuse(*args, **kwargs):
    raise AssertionError("the run trained or tokenized again")

train_bpe, pack_documents = tokenizer._train_bpe, packing.pack_documents
tokenizer._train_bpe = packing.pack_documents = refuse
train, evaluation, tok = build_loaders(cfg, cache_dir=data_cache_dir(cfg))
tokenizer._train_bpe, packing.pack_documents = train_bpe, pack_documents
fresh_train, fresh_eval, fresh_tok = build_loaders(cfg, cache_dir=os.path.join(run_folder, "fresh"))
print(json.dumps({
    "forkable": forkable, "exit_code": code, "cached": cached,
    "same_rows": bool(np.array_equal(train.rows, fresh_train.rows) and np.array_equal(evaluation.rows, fresh_eval.rows)),
    "same_tokenizer": tok.fingerprint == fresh_tok.fingerprint,
}))
"""


def _script(tmp_path: Path, mode: str) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, "-c", PREFETCH_THEN_READ, json.dumps(SMALL), str(tmp_path / "run"), mode],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # the child prints nothing
    return json.loads(lines[0]), result.stderr


def test_the_forked_child_fills_the_cache_the_run_then_reads(tmp_path):
    report, stderr = _script(tmp_path, "wait")
    assert report["forkable"] and report["exit_code"] == 0
    assert stderr == ""
    assert [path.split("/")[1] for path in report["cached"]] == ["packed", "packed", "tokenizers"]
    assert report["same_rows"] and report["same_tokenizer"]


def test_a_run_that_stops_before_its_data_leaves_no_folder_behind(tmp_path):
    report, _ = _script(tmp_path, "close")
    assert report["forkable"]
    assert report["exit_code"] in (0, -9)  # killed, or done already on a fast machine
    assert report["left"] is False


def test_prefetch_only_where_it_is_safe_and_saves_time(monkeypatch):
    quickstart = load_config(str(ROOT / "configs" / "quickstart.yaml"), SMALL)
    assert worth_prefetching(quickstart)
    train = quickstart.train_loader
    mds = dataclasses.replace(train, dataset=dataclasses.replace(train.dataset, source="mds"))
    assert not worth_prefetching(dataclasses.replace(quickstart, train_loader=mds))
    remote = dataclasses.replace(train, dataset=dataclasses.replace(train.dataset, source="text", remote="s3://b/d"))
    assert not worth_prefetching(dataclasses.replace(quickstart, train_loader=remote))
    hub = dataclasses.replace(quickstart.tokenizer, name="EleutherAI/gpt-neox-20b")
    assert not worth_prefetching(dataclasses.replace(quickstart, tokenizer=hub))
    # Here JAX is imported (and pytest runs threads): never fork.
    assert "jax" in sys.modules and not can_fork()
    assert start_prefetch(quickstart) is None
    monkeypatch.setenv("JAXTRAIN_DATA_PREFETCH", "0")
    monkeypatch.setattr("jaxtrain.train.data_prefetch.can_fork", lambda: True)
    assert start_prefetch(quickstart) is None


def test_a_child_that_makes_no_progress_is_stopped(tmp_path):
    # A stopped process uses no CPU: wait() gives up on it after stall_seconds, so a stuck child
    # cannot hold the run's start-up forever (the run then builds its data itself).
    import signal
    import time

    from jaxtrain.train.data_prefetch import DataPrefetch

    cache = tmp_path / "run" / "cache"
    cache.mkdir(parents=True)
    (cache / "rows.npy").write_bytes(b"whole")
    # the child starts writing a cache file as the cache writers do, then stops making progress
    script = ("import os, signal, sys\nfrom jaxtrain.tempfiles import temp_path\n"
              "open(temp_path(sys.argv[1], '.npy'), 'w').write('partial')\nos.kill(os.getpid(), signal.SIGSTOP)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(cache / "more.npy")])
    deadline = time.monotonic() + 60
    while len(list(cache.iterdir())) < 2:
        assert child.poll() is None and time.monotonic() < deadline, "the child wrote no temporary file"
        time.sleep(0.01)
    prefetch = DataPrefetch(child.pid, str(cache), stall_seconds=1.5)
    started = time.monotonic()
    assert prefetch.wait() == -signal.SIGKILL
    assert prefetch.stalled and 1.0 <= time.monotonic() - started < 30
    assert sorted(path.name for path in cache.iterdir()) == ["rows.npy"]  # its partial file removed
    prefetch.close()  # used by the run: the cache stays
    assert (cache / "rows.npy").exists()


def test_the_entry_point_starts_the_data_before_jax_and_hands_it_to_the_run(monkeypatch):
    # `python -m jaxtrain.main`: the prefetch is forked first (nothing imported that runs
    # threads), then the host allocator is set up (it imports JAX), then the run gets the handle.
    from jaxtrain import main as entry

    calls = []
    monkeypatch.setattr("jaxtrain.train.data_prefetch.prefetch_for_command",
                        lambda config, overrides: calls.append(("prefetch", config, list(overrides))) or "handle")
    monkeypatch.setattr("jaxtrain.train.host_allocator.retain_freed_memory", lambda: calls.append(("allocator",)))
    monkeypatch.setattr("jaxtrain.train.command.train_command",
                        lambda config, overrides, data_prefetch=None: calls.append(("train", data_prefetch)) or 0)
    for name in ("JAXTRAIN_COORDINATOR_ADDRESS", "JAXTRAIN_NUM_PROCESSES", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    entry.FLAGS(["jaxtrain", "--config", "configs/quickstart.yaml", "--set", "seed=3"])
    try:
        with pytest.raises(SystemExit) as exited:
            entry.main(["jaxtrain"])
    finally:
        entry.FLAGS.unparse_flags()
    assert exited.value.code == 0
    assert calls == [("prefetch", "configs/quickstart.yaml", ["seed=3"]), ("allocator",), ("train", "handle")]

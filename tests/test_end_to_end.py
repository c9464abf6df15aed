"""End to end, as a user runs it: the README's quickstart command, Ctrl-C and kill -9 then resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ["python", "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"]

# Shrinks the quickstart to seconds: a 2-layer model on 60 standard-library files.
TINY = [
    "variables.max_seq_len=64",
    "model.d_model=64",
    "model.n_layers=2",
    "model.vocab_size=1024",
    "tokenizer.kwargs.vocab_size=1024",
    "train_loader.dataset.max_files=60",
    "eval_loader.dataset.max_files=200",
    "global_train_batch_size=8",
    "device_train_microbatch_size=4",
    "device_eval_batch_size=8",
    "eval_subset_num_batches=4",
    "progress_bar=false",
]


def command(tmp_path: Path, *overrides: str, entry: list[str] = QUICKSTART) -> list[str]:
    args = [sys.executable if part == "python" else part for part in entry]
    sets = [*TINY, f"run_folder={tmp_path}/run", f"save_folder={tmp_path}/checkpoints", *overrides]
    for item in sets:
        args += ["--set", item]
    return args


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def step_losses(run_folder: Path) -> dict[int, float]:
    """Per-step training loss from metrics.jsonl; a step logged twice keeps its last value."""
    losses = {}
    for line in (run_folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            losses[record["step"]] = record["train/loss"]
    return losses


def test_readme_quickstart_command_trains_and_loss_falls(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert "python -m jaxtrain.main --config configs/quickstart.yaml" in readme
    assert "python -m pytest" in readme
    # with Foundry's in-context-learning tasks scored after every held-out evaluation
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [
        {"query": "def add(a, b):\n    return", "choices": [" a + b", " ]]]]"], "gold": 0},
        {"query": "import", "choices": [" os", " }}}}"], "gold": 0},
        {"query": "for i in", "choices": [" range(10):", " ((((("], "gold": 0}]))
    (tmp_path / "tasks.yaml").write_text(
        "icl_tasks:\n- label: mc\n  dataset_uri: mc.jsonl\n  icl_task_type: multiple_choice\n"
        "  continuation_delimiter: ''\n  batch_size: 2\n")
    result = run(command(tmp_path, "max_duration=24ba", "eval_interval=12ba", "save_interval=12ba",
                         f"icl_tasks={tmp_path}/tasks.yaml", "icl_subset_num_batches=1",
                         "callbacks.speed_monitor.window_size=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Every step after the first has a rate over its own time (a one-step window): the steps
    # before an evaluation and the first step after it included. A step timed when the next
    # one's metrics are read, on the CPU, would show a near-zero interval at the eval steps.
    rates = {record["step"]: record["train/tokens_per_second"] for record in records
             if "train/tokens_per_second" in record}
    assert sorted(rates) == list(range(2, 25))
    # packed text rows: every position is a token (8 rows of 64 per batch), in the total and the rates
    train = {record["step"]: record for record in records if "train/loss" in record}
    assert [train[step]["train/time/token"] for step in range(1, 25)] == [512 * step for step in range(1, 25)]
    assert all(train[step]["train/tokens_per_second"] / train[step]["train/batches_per_second"] == pytest.approx(512)
               for step in range(2, 25))
    median = sorted(rates.values())[len(rates) // 2]
    assert max(rates.values()) < 3 * median, rates
    icl = {record["step"]: record["icl/mc/0-shot"] for record in records if "icl/mc/0-shot" in record}
    assert sorted(icl) == [0, 12, 24] and all(value in (0.0, 1.0) for value in icl.values())  # 1 of 3 scored
    # (a batch of 2 rows holds one question of 2 choices, as Foundry batches multiple choice)
    assert result.stdout.count("ICL: icl/mc/0-shot") == 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 24
    assert summary["eval_loss"] < summary["first_eval_loss"] - 1.0
    assert summary["tokens_per_second"] > 0 and 0 < summary["mfu"] < 1
    # the run's mean: every step but the first (compiling), the one after an evaluation included
    assert summary["timed_steps"] == 23 and summary["window_steps"] == 1
    assert 0 < summary["mean_mfu"] < 1
    assert min(rates.values()) <= summary["mean_tokens_per_second"] <= max(rates.values())
    assert "(mean of 23 steps; compiling and evaluating left out)" in result.stdout
    assert "held-out loss" in result.stdout and "MFU" in result.stdout
    assert (tmp_path / "run" / "config.yaml").exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "24", "tokenizer.json", "tokenizer_config.json"]
    assert list((tmp_path / "run" / "tensorboard").iterdir())

    # load_path: a new run starts from these weights with a fresh optimizer.
    finetune = tmp_path / "finetune"
    result = run(
        command(finetune, "max_duration=2ba", "eval_interval=0", f"load_path={tmp_path}/checkpoints", "eval_first=false")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded weights from" in result.stdout
    fresh_first, loaded_first = step_losses(tmp_path / "run")[1], step_losses(finetune / "run")[1]
    assert loaded_first < fresh_first - 1.0


def test_ctrl_c_saves_and_the_same_command_continues(tmp_path):
    """SIGINT stops after the current step with a checkpoint (exit 130); rerunning resumes and
    reproduces an uninterrupted run's per-step losses exactly, via the console script."""
    reference_dir = tmp_path / "reference"
    overrides = ("max_duration=40ba", "eval_interval=0", "save_interval=100ba")
    reference = run(command(reference_dir, *overrides))
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = step_losses(reference_dir / "run")

    console = [str(Path(sys.executable).with_name("jaxtrain")), "train", "--config", "configs/quickstart.yaml"]
    args = command(tmp_path, *overrides, entry=console)
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-3000:]
    assert "run the same command to continue" in out
    saved = [int(name) for name in os.listdir(tmp_path / "checkpoints") if name.isdigit()]
    assert saved and max(saved) < 40

    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert step_losses(tmp_path / "run") == expected


def test_ctrl_c_while_the_run_is_built_is_one_line(tmp_path):
    """Ctrl-C before training starts (the run's own handlers not yet in place): one line and status
    130, no traceback, and no "interrupted twice"."""
    # as from a terminal: a test process may run with SIGINT ignored, which a child would inherit;
    # with a handler here, the child starts with the default
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(command(tmp_path, "max_duration=4ba"), cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    for line in process.stdout:  # printed once the config is read, before JAX starts
        if line.startswith("resolved config"):
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-3000:]
    assert err.strip() == "interrupted before training started: nothing was saved; earlier checkpoints are intact"
    assert not (tmp_path / "checkpoints").exists() or not any(
        name.isdigit() for name in os.listdir(tmp_path / "checkpoints"))


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    reference_dir = tmp_path / "reference"
    overrides = ("max_duration=12ba", "eval_interval=0", "save_interval=3ba")
    reference = run(command(reference_dir, *overrides))
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = step_losses(reference_dir / "run")
    assert len(expected) == 12

    args = command(tmp_path, *overrides)
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [n for n in os.listdir(checkpoints) if n.isdigit()] if checkpoints.exists() else []
        if any(int(n) >= 6 for n in done):
            break
        time.sleep(0.1)
    process.kill()
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert step_losses(tmp_path / "run") == expected
    final = json.loads((tmp_path / "run" / "summary.json").read_text())
    reference_final = json.loads((reference_dir / "run" / "summary.json").read_text())
    assert final["eval_loss"] == reference_final["eval_loss"]

    # the same command once more: the run is complete (its last checkpoint holds the final
    # evaluation), so nothing is trained, evaluated or logged again and its summary is kept
    logged = (tmp_path / "run" / "metrics.jsonl").read_text()
    summary = (tmp_path / "run" / "summary.json").read_text()
    again = run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the run is already complete: its checkpoint is at the last step (12)" in again.stdout
    assert f"final train loss: {final['train_loss']:.4f}" in again.stdout
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == logged
    assert (tmp_path / "run" / "summary.json").read_text() == summary


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.learning_rate=1e-3"], "optimizer.lr"),
        (["model.d_model=abc"], "model.d_model"),
        (["optimizer.lr=-0.1"], "optimizer.lr"),
        (["global_train_batch_size=12", "device_train_microbatch_size=8"], "global_train_batch_size"),
        (["max_seq_len=4096"], "max_seq_len"),
        (["parallelism.fsdp=2"], "parallelism"),  # found after the data prefetch has started
        (["max_seq_len=-5"], "max_seq_len: must be positive"),
        (["model.name=gpt9"], "model.name: unknown name 'gpt9'"),
        (["model.ffn_config.ffn_act_fn={name: swish}"], "model.ffn_config.ffn_act_fn: name='swish'"),
        (["model.init_config.name=xavier"], "model.init_config.name='xavier'"),
        (["load_path=/nonexistent/ckpt"], "load_path: /nonexistent/ckpt: no such folder"),
    ],
)
def test_config_errors_exit_2_with_one_line_and_write_nothing(tmp_path, overrides, message):
    args = [sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"]
    for item in [f"run_folder={tmp_path}/run", f"save_folder={tmp_path}/ckpt", *overrides]:
        args += ["--set", item]
    result = run(args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("args, message", [
    (["-m", "jaxtrain.main", "--config", "configs/quickstart.yaml", "--sett", "max_duration=3ba"],
     "Unknown command line flag 'sett'. Did you mean: set ?"),
    (["-c", "import sys; from jaxtrain.cli import run; run(sys.argv[1:])", "train", "--config", "configs/quickstart.yaml", "--max-restarts", "abc"],
     "flag --max_restarts=abc"),
])
def test_flag_mistakes_exit_2_with_one_line(args, message):
    result = run([sys.executable, *args])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_a_schedule_shorter_than_the_run_is_one_line(tmp_path):
    """Known only once the run's length is (after the data): still one line, status 2, no traceback."""
    args = [sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"]
    for item in [f"run_folder={tmp_path}/run", f"save_folder={tmp_path}/ckpt", "max_duration=4ba",
                 "scheduler.t_max=1ba", "train_loader.dataset.max_files=20", "eval_interval=0"]:
        args += ["--set", item]
    result = run(args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "scheduler.t_max: '1ba' is 1 batches, shorter than the run (4 batches)" in errors[0]


@pytest.mark.parametrize("content", [None, "model: [unclosed\n"])
def test_missing_or_malformed_config_file(tmp_path, content):
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content)
    result = run([sys.executable, "-m", "jaxtrain.main", "--config", str(path)])
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_summary_says_when_no_step_was_trained():
    """A run that resumes at its last step trains nothing; its summary says so."""
    from jaxtrain.train.summary import FitResult, format_summary

    result = FitResult(step=150, interrupted=False, stop_signal=None, stopped_unhealthy=None, incidents={},
                       train_loss=None, eval_loss=5.2, first_eval_loss=5.2, tokens_per_second=None, mfu=None,
                       wall_seconds=3.0, seconds_to_first_step=None)  # fmt: skip
    assert "  wall time: 3.0s (no step trained)" in format_summary(result, 3.0).splitlines()
    trained = dataclasses.replace(result, seconds_to_first_step=5.34, train_loss=5.0)
    assert "  wall time: 9.0s (first step done 5.3s after start)" in format_summary(trained, 9.0).splitlines()
    assert "  throughput: n/a tokens/s, MFU n/a" in format_summary(trained, 9.0).splitlines()
    timed = dataclasses.replace(trained, tokens_per_second=9000.0, mfu=0.25, window_steps=10,
                                mean_tokens_per_second=14512.4, mean_mfu=0.318, timed_steps=148)
    assert format_summary(timed, 9.0).splitlines()[-2:] == [
        "  throughput: 9,000 tokens/s, MFU 25.00% (last 10 steps)",
        "              14,512 tokens/s, MFU 31.80% (mean of 148 steps; compiling and evaluating left out)"]

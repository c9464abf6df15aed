"""Every command the README shows is run by a test: the cheap ones here, literally; the long
ones by the tests named in COVERED, which run the same entry point with a shortened config."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# command prefix -> the test that runs it
COVERED = {
    "python3.12 -m venv .venv": ".ci/run (creates the environment and installs the project)",
    "python -m jaxtrain.main --config configs/quickstart.yaml": "test_end_to_end.py::test_readme_quickstart_command_trains_and_loss_falls",
    "python -m jaxtrain.main --config configs/finetune/lora.yaml": "test_lora.py::test_the_example_config_fine_tunes_a_hugging_face_folder",
    "python -m pytest": ".ci/run",
    "python -m jaxtrain.main --help_config": "test_readme.py::test_help_config",
    "jaxtrain data prepare": "test_prepare.py::test_cli_writes_and_reports_errors_in_one_line",
    "jaxtrain train --config configs/quickstart.yaml --max-restarts": "test_readme.py::test_dashed_max_restarts_reaches_the_supervisor",
    "jaxtrain train --config": "test_end_to_end.py::test_ctrl_c_saves_and_the_same_command_continues (console script)",
    "python launch/local.py": "test_multihost.py::test_two_processes_train_and_checkpoint",
    "launch/tpu_pod.sh": "test_multihost.py::test_cluster_launchers_parse_and_agree_on_the_process_count",
    "sbatch --nodes=4 launch/slurm.sbatch": "test_multihost.py::test_cluster_launchers_parse_and_agree_on_the_process_count",
    "kubectl apply -f launch/k8s-jobset.yaml": "test_multihost.py::test_cluster_launchers_parse_and_agree_on_the_process_count",
    "jaxtrain convert path/to/hf-mpt runs/imported-lora --adapter": "test_lora.py::imported (every test of it)",
    "jaxtrain convert runs/lora/checkpoints runs/adapter --to peft": "test_lora.py::test_exports_are_pefts_adapter_and_merged_model",
    "jaxtrain convert": "test_convert.py::test_trained_model_exports_to_transformers",
    "jaxtrain generate": "test_generate.py::test_generate_command",
    "jaxtrain eval --checkpoint": "test_eval.py::test_cli_end_to_end",
    "jaxtrain plan --budget-usd 50000 --hardware h100": "test_readme.py::test_plan_budget_command",
    "jaxtrain plan --config configs/mpt/7b.yaml": "test_plan.py::test_memory_cli",
    "jaxtrain plan --memory": "test_plan.py::test_memory_cli; with LoRA, test_lora.py::test_the_memory_estimate_counts_gradients_and_moments_of_the_adapters_alone; quantized, test_quantize_frozen.py::test_the_planner_counts_quantized_weights_and_their_scales",
    "jaxtrain bench --config": "test_bench_command.py::test_bench_writes_a_file_the_planner_reads",
    "jaxtrain plan --budget-usd 50000 --hardware cpu --mfu from:": "test_bench_command.py::test_bench_writes_a_file_the_planner_reads",
}


def readme_commands() -> list[str]:
    commands, in_block = [], False
    for line in README.splitlines():
        if line.strip().startswith("```"):
            in_block = not in_block
        elif in_block and re.match(r"\s*(python\S* |jaxtrain )", line):
            commands.append(line.strip())
    commands += re.findall(r"`((?:python |jaxtrain |launch/\S+\.sh |sbatch |kubectl )[^`]*)`", README)
    return commands


def test_every_readme_command_is_exercised():
    commands = readme_commands()
    assert len(commands) >= 10
    for command in commands:
        assert any(command.startswith(prefix) for prefix in COVERED), f"README command not covered by a test: {command}"


def test_help_config():
    result = subprocess.run([sys.executable, "-m", "jaxtrain.main", "--help_config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "optimizer.lr" in result.stdout and "health.nan_policy" in result.stdout


def test_plan_budget_command(tmp_path):
    jaxtrain = shutil.which("jaxtrain", path=str(Path(sys.executable).parent))
    assert jaxtrain, "the jaxtrain console script is installed with the package"
    result = subprocess.run([jaxtrain, "plan", "--budget-usd", "50000", "--hardware", "h100"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "compute-optimal model" in result.stdout and "ladder" in result.stdout
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dashed_max_restarts_reaches_the_supervisor(tmp_path):
    """The dashed spelling is accepted; the supervisor refuses a run that could not resume."""
    jaxtrain = shutil.which("jaxtrain", path=str(Path(sys.executable).parent))
    result = subprocess.run(
        [jaxtrain, "train", "--config", "configs/quickstart.yaml", "--max-restarts", "5", "--set", "autoresume=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "--max-restarts needs save_folder and autoresume: true" in result.stderr


@pytest.mark.parametrize("args", [["--help"], ["nonsense"]])
def test_jaxtrain_usage(args):
    jaxtrain = shutil.which("jaxtrain", path=str(Path(sys.executable).parent))
    result = subprocess.run([jaxtrain, *args], capture_output=True, text=True, timeout=60)
    assert ("commands:" in result.stdout + result.stderr) and result.returncode == (0 if args == ["--help"] else 2)

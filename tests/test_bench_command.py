"""`jaxtrain bench` measures the real train step and writes what `jaxtrain plan --mfu from:FILE` reads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from test_end_to_end import ROOT, TINY


def test_bench_writes_a_file_the_planner_reads(tmp_path):
    jaxtrain = shutil.which("jaxtrain", path=str(Path(sys.executable).parent))
    args = [jaxtrain, "bench", "--config", str(ROOT / "configs/quickstart.yaml"), "--steps", "3", "--out", str(tmp_path / "bench.json")]
    for item in [*TINY, f"run_folder={tmp_path}/run"]:
        args += ["--set", item]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["hardware"] == "cpu" and 0 < bench["mfu"] < 1
    expected_tokens_per_second = bench["global_batch"] * bench["seq_len"] / bench["step_seconds_median"]
    assert abs(bench["tokens_per_second"] - expected_tokens_per_second) < 1e-6 * expected_tokens_per_second
    assert bench["step_seconds_spread"][0] <= bench["step_seconds_median"] <= bench["step_seconds_spread"][1]

    plan = subprocess.run([jaxtrain, "plan", "--budget-usd", "100", "--hardware", "cpu", "--mfu", f"from:{tmp_path / 'bench.json'}", "--no-plot"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert f"{100 * bench['mfu']:.1f}% (measured by jaxtrain bench" in plan.stdout

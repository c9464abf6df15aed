"""The README's Python examples run as written and do what they say.

Each ```python block of README.md runs verbatim in a fresh interpreter, in a folder laid out like
the repository root (``configs/`` linked in), so that what the examples write under ``runs/``
stays out of the checkout and every run starts cold (no cached tokenizer or data from earlier).
A block that loads ``runs/quickstart/checkpoints`` finds there a small model's checkpoint, laid
out as the quickstart command saves it.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
QUICKSTART_CHECKPOINTS = "runs/quickstart/checkpoints"

def python_blocks(text: str) -> list[str]:
    """The code of every ```python block in ``text`` (fences at the start of a line)."""
    return re.findall(r"^```python\n(.*?)^```\s*$", text, flags=re.MULTILINE | re.DOTALL)


def run_python(code: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def repo_like(tmp_path: Path) -> Path:
    """An empty folder with the repository's ``configs`` linked in."""
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    return tmp_path


def save_quickstart_checkpoint(cwd: Path) -> None:
    """A checkpoint where the quickstart saves its own: a one-layer model's weights, written as
    training writes them (step folders and the tokenizer beside them), made in this process."""
    import shutil

    from flax import nnx

    from jaxtrain.config.schema import ModelConfig
    from jaxtrain.convert.hf_mpt import save_model
    from jaxtrain.models import build_model

    model_cfg = ModelConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=32, vocab_size=128)
    params = nnx.to_pure_dict(nnx.state(build_model(model_cfg, rngs=nnx.Rngs(0)), nnx.Param))
    folder = cwd / QUICKSTART_CHECKPOINTS
    save_model(str(folder), model_cfg, params, step=1)
    shutil.copyfile(ROOT / "tests" / "fixtures" / "generate_hf" / "tokenizer.json", folder / "tokenizer.json")


def check_training_loop(stdout: str) -> None:
    """The own-loop example: a loss per step, finite and falling, then logits over the vocabulary."""
    losses = [float(value) for value in re.findall(r"^step \d+: loss (\S+)$", stdout, flags=re.MULTILINE)]
    assert len(losses) == 20, stdout
    assert all(math.isfinite(loss) for loss in losses), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, f"the loss did not fall: {losses}"
    shape = re.search(r"^logits \((\d+), (\d+), (\d+)\) next token: '", stdout, flags=re.MULTILINE)
    assert shape, stdout
    assert int(shape[1]) == 1 and int(shape[2]) >= 1 and int(shape[3]) == 8192  # the quickstart's vocabulary


def check_checkpoint_logits(stdout: str) -> None:
    """The loading example: the saved step and logits over the checkpoint's vocabulary."""
    found = re.search(r"^step 1: logits \(1, (\d+), 128\)$", stdout, flags=re.MULTILINE)
    assert found and int(found[1]) >= 1, stdout


BLOCKS = python_blocks(README)


def test_readme_has_the_library_examples():
    section = README.split("## As a library", 1)[1].split("\n## ", 1)[0]
    assert len(python_blocks(section)) == 2
    assert any("build_run(" in block and "train_step(" in block for block in BLOCKS)
    assert any("load_checkpoint(" in block for block in BLOCKS)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code, repo_like):
    if QUICKSTART_CHECKPOINTS in code:
        save_quickstart_checkpoint(repo_like)
    result = run_python(code, repo_like)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if "train_step(" in code:
        check_training_loop(result.stdout)
    if "load_checkpoint(" in code:
        check_checkpoint_logits(result.stdout)

"""Bad input to ``jaxtrain generate``, ``eval`` and ``convert``: one ``error:`` line naming the file,
step or flag and what to do, exit status 2, no traceback, and nothing existing harmed."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx

from jaxtrain.checkpoint.load import load_checkpoint
from jaxtrain.convert import save_model
from jaxtrain.convert.cli import main as convert_main
from jaxtrain.eval import cli as eval_cli
from jaxtrain.eval.cli import main as eval_main
from jaxtrain.inference.cli import main as generate_main
from jaxtrain.models import build_model
from test_eval import char_tokenizer, model_cfg, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
HF_FIXTURE = ROOT / "tests" / "fixtures" / "hf_mpt" / "mha"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model's checkpoint folder holding steps 3 and 5, with tokenizer.json beside them."""
    root = tmp_path_factory.mktemp("checkpoint")
    char_tokenizer().save(str(root / "tokenizer.json"))
    cfg = model_cfg()
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    for step in (3, 5):
        save_model(str(root / f"s{step}"), cfg, params, tokenizer_path=str(root / "tokenizer.json"), step=step)
    folder = root / "ck"
    shutil.copytree(root / "s3", folder)
    shutil.copytree(root / "s5" / "5", folder / "5")
    return folder


@pytest.fixture
def ck(checkpoint, tmp_path):
    """A copy of the checkpoint this test may damage."""
    return shutil.copytree(checkpoint, tmp_path / "ck")


@pytest.fixture
def tasks(tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", [{"query": "ab", "choices": ["c", "d"], "gold": 0}])
    path = tmp_path / "tasks.yaml"
    path.write_text("icl_tasks:\n- label: mc\n  dataset_uri: mc.jsonl\n  icl_task_type: multiple_choice\n"
                    "  num_fewshot: [0]\n")
    return path


def one_error(capsys, *needles) -> str:
    """The single ``error:`` line on stderr, which holds every needle; returns stdout."""
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
    return out


# ----------------------------------------------------------------------------- checkpoint steps


def test_missing_step_lists_the_steps_there(ck, tasks, tmp_path, capsys):
    assert generate_main(["--checkpoint", str(ck), "--prompt", "ab", "--step", "99"]) == 2
    one_error(capsys, ck, "step 99", "3, 5", "--step")
    assert eval_main(["--checkpoint", str(ck), "--tasks", str(tasks), "--step", "99"]) == 2
    one_error(capsys, ck, "step 99", "3, 5")
    assert convert_main([str(ck), str(tmp_path / "hf"), "--to", "hf", "--step", "99"]) == 2
    one_error(capsys, ck, "step 99", "3, 5")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("item", ["meta", "state"])
def test_step_missing_an_item_is_named_with_the_other_steps(ck, item, capsys):
    shutil.rmtree(ck / "5" / item)
    assert generate_main(["--checkpoint", str(ck), "--prompt", "ab", "--max-new-tokens", "1"]) == 2
    one_error(capsys, os.path.join(str(ck), "5"), "incomplete or damaged", item, "read another step instead: 3 (its folder, e.g.", "or --step 3)")


def truncate_state(step_folder: Path, *, over: int = 10_000) -> None:
    damaged = [path for path in (step_folder / "state").rglob("*") if path.is_file() and path.stat().st_size > over]
    assert damaged
    for path in damaged:
        with open(path, "r+b") as handle:
            handle.truncate(100)


def test_truncated_state_is_named(ck, capsys):
    truncate_state(ck / "5")
    assert generate_main(["--checkpoint", str(ck), "--prompt", "ab", "--max-new-tokens", "1"]) == 2
    one_error(capsys, os.path.join(str(ck), "5"), "incomplete or damaged", "read another step instead: 3 (its folder, e.g.", "or --step 3)")


def test_truncated_state_metadata_is_named(ck, capsys):
    truncate_state(ck / "5", over=1000)  # the JSON files of the state item too
    assert generate_main(["--checkpoint", str(ck), "--prompt", "ab", "--max-new-tokens", "1", "--step", "5"]) == 2
    one_error(capsys, os.path.join(str(ck), "5"), "incomplete or damaged", "read another step instead: 3 (its folder, e.g.", "or --step 3)")


def test_damaged_step_from_the_console_script_prints_one_line(ck):
    truncate_state(ck / "5")
    run = subprocess.run([sys.executable, "-c", "from jaxtrain.cli import run; run()", "generate", "--checkpoint",
                          str(ck), "--prompt", "ab", "--max-new-tokens", "1"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and os.path.join(str(ck), "5") in lines[0], run.stderr


def test_an_argument_that_is_not_utf8_is_one_line_from_the_console_script(capsys):
    """Bytes that are not UTF-8 reach Python as lone surrogates, which the tokenizer, YAML and the
    file system would each fail on with a traceback: every command refuses them first."""
    from jaxtrain.cli import run

    undecodable = os.fsdecode(b"ab\xffcd")
    for argv in (["generate", "--checkpoint", "c", "--prompt", undecodable], ["eval", "--checkpoint", "c",
                 "--continuation-delimiter", undecodable], ["data", "prepare", "x.txt", "--out", "o", "--eos-text",
                 undecodable]):
        with pytest.raises(SystemExit) as exit_:
            run(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err == "error: the argument b'ab\\xffcd' is not valid UTF-8 text; pass it " \
                                                "in UTF-8\n", err


def test_a_step_folder_reads_that_step_and_a_file_is_one_line(ck, capsys):
    """A step's own folder (``<save_folder>/3``) reads that step, as ``--step 3`` does; a file is
    not taken for a folder."""
    assert generate_main(["--checkpoint", str(ck / "3"), "--prompt", "ab", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert generate_main(["--checkpoint", str(ck / "3"), "--prompt", "ab", "--step", "5"]) == 2
    one_error(capsys, ck / "3", "the folder of step 3, but step 5 was asked for", str(ck))
    assert load_checkpoint(str(ck / "3")).step == 3
    (ck / "notes.txt").write_text("x")
    assert generate_main(["--checkpoint", str(ck / "notes.txt"), "--prompt", "ab"]) == 2
    one_error(capsys, ck / "notes.txt", "a file, not a checkpoint folder")


def test_hugging_face_folder_says_to_convert_first(tmp_path, capsys):
    hf = shutil.copytree(HF_FIXTURE, tmp_path / "hf")
    assert generate_main(["--checkpoint", str(hf), "--prompt", "ab"]) == 2
    one_error(capsys, hf, "jaxtrain convert")


# ----------------------------------------------------------------------------- eval --out


def test_eval_creates_the_out_folder(ck, tasks, tmp_path, capsys):
    out = tmp_path / "nodir" / "results.json"
    assert eval_main(["--checkpoint", str(ck), "--tasks", str(tasks), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["step"] == 5
    assert "mc/0-shot" in capsys.readouterr().out


def test_eval_refuses_an_unwritable_out_before_evaluating(ck, tasks, tmp_path, capsys):
    (tmp_path / "file").write_text("kept")
    out = tmp_path / "file" / "results.json"
    assert eval_main(["--checkpoint", str(ck), "--tasks", str(tasks), "--out", str(out)]) == 2
    assert one_error(capsys, "--out", out, f"{tmp_path / 'file'} is a file, not a folder") == ""  # nothing evaluated
    assert (tmp_path / "file").read_text() == "kept"
    assert eval_main(["--checkpoint", str(ck), "--tasks", str(tasks), "--out", str(tmp_path)]) == 2
    one_error(capsys, "--out", "is a folder")


def test_eval_keeps_the_results_when_out_cannot_be_written(ck, tasks, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_cli, "check_output_file", lambda path: None)  # the folder goes away during the evaluation
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    out = tmp_path / "gone" / "results.json"
    assert eval_main(["--checkpoint", str(ck), "--tasks", str(tasks), "--out", str(out)]) == 2
    assert "mc/0-shot" in one_error(capsys, "--out", out, "saved to")
    saved = list(tmp_path.glob("jaxtrain-eval-*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["tasks"][0]["label"] == "mc"


# ----------------------------------------------------------------------------- tokenizer and numeric flags


def test_missing_tokenizer_is_named(ck, tasks, tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert generate_main(["--checkpoint", str(ck), "--prompt", "ab", "--tokenizer", str(missing)]) == 2
    one_error(capsys, "--tokenizer", missing, "not found")
    assert eval_main(["--checkpoint", str(ck), "--tasks", str(tasks), "--tokenizer", str(missing)]) == 2
    one_error(capsys, "--tokenizer", missing, "not found")
    (tmp_path / "bad.json").write_text("{not json")
    assert generate_main(["--checkpoint", str(ck), "--prompt", "ab", "--tokenizer", str(tmp_path / "bad.json")]) == 2
    one_error(capsys, "--tokenizer", tmp_path / "bad.json", "is not a readable tokenizer.json")


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--seq-len", "0"), ("--num-fewshot", "-1"),
                                         ("--step", "-1")])
def test_eval_numeric_flags(ck, tasks, flag, value, capsys):
    assert eval_main(["--checkpoint", str(ck), "--tasks", str(tasks), flag, value]) == 2
    one_error(capsys, f"{flag} {value}", "must")


@pytest.mark.parametrize("flag, value", [("--max-new-tokens", "0"), ("--temperature", "-1"), ("--top-k", "-2"),
                                         ("--top-p", "0"), ("--top-p", "1.5"), ("--step", "-1")])
def test_generate_numeric_flags(ck, flag, value, capsys):
    assert generate_main(["--checkpoint", str(ck), "--prompt", "ab", flag, value]) == 2
    one_error(capsys, f"{flag} {value}", "must")


def test_eval_perplexity_data_without_the_text_field_names_the_flag(ck, tmp_path, capsys):
    data = tmp_path / "texts.jsonl"
    data.write_text(json.dumps({"text": "abc"}) + "\n")
    assert eval_main(["--checkpoint", str(ck), "--perplexity-data", str(data), "--text-field", "body"]) == 2
    one_error(capsys, f"{data}:1 has no field 'body': set --text-field to the field holding the text")


def test_eval_type_is_the_kind_of_task_files_and_their_errors_name_it(ck, tasks, tmp_path, capsys):
    assert eval_main(["--checkpoint", str(ck), "--tasks", str(tasks), "--type", "schema"]) == 2
    one_error(capsys, "--type schema: it is the kind of --task files")
    lm = tmp_path / "lm.jsonl"
    write_jsonl(lm, [{"context": "a", "continuation": "b"}])
    assert eval_main(["--checkpoint", str(ck), "--task", str(lm)]) == 2
    one_error(capsys, f"{lm}:1 has no field 'query'", "or pass --type (now multiple_choice)")


def test_eval_refuses_a_gauntlet_it_cannot_score_before_evaluating(ck, tasks, tmp_path, capsys, monkeypatch):
    """A benchmark field of the wrong type, or one no task evaluates, is one line naming the
    gauntlet file and line, before the checkpoint is read or any task scored."""
    gauntlet = tmp_path / "gauntlet.yaml"
    monkeypatch.setattr("jaxtrain.checkpoint.load.load_checkpoint", lambda *a, **k: pytest.fail("read the checkpoint"))
    for benchmark, needle in (("{name: mc, num_fewshot: 0, random_baseline: [1]}", "random_baseline=[1] must be"),
                              ("{name: mc, num_fewshot: 5, random_baseline: 0.25}", "mc (5-shot) was not evaluated")):
        gauntlet.write_text(f"eval_gauntlet:\n  categories:\n  - name: c\n    benchmarks:\n    - {benchmark}\n")
        assert eval_main(["--checkpoint", str(ck), "--tasks", str(tasks), "--gauntlet", str(gauntlet)]) == 2
        one_error(capsys, f"{gauntlet}:5", needle)


def test_eval_and_generate_out_of_memory_is_one_line(ck, tasks, tmp_path, capsys):
    """The device running out of memory while evaluating or generating is one line naming the
    flags that size the work (here rows of 2**22 x 4096 and a KV cache for 2**29 new tokens)."""
    assert eval_main(["--checkpoint", str(ck), "--tasks", str(tasks), "--batch-size", str(2**22),
                      "--seq-len", "4096"]) == 2
    one_error(capsys, "the device ran out of memory", "--batch-size (now 4194304)", "--seq-len (now 4096)")
    cfg = dataclasses.replace(model_cfg(), max_seq_len=2**30, learned_pos_emb=False)  # ALiBi: no table of positions
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    save_model(str(tmp_path / "long"), cfg, params, tokenizer_path=str(ck / "tokenizer.json"), step=1)
    assert generate_main(["--checkpoint", str(tmp_path / "long"), "--prompt", "ab", "--max-new-tokens",
                          str(2**29)]) == 2
    one_error(capsys, "the device ran out of memory", "--max-new-tokens (now 536870912)", "--precision bf16")


# ----------------------------------------------------------------------------- convert


@pytest.fixture
def hf(tmp_path):
    return shutil.copytree(HF_FIXTURE, tmp_path / "hf")


def test_convert_config_that_is_not_json(hf, tmp_path, capsys):
    (hf / "config.json").write_text("{not json")
    assert convert_main([str(hf), str(tmp_path / "out")]) == 2
    one_error(capsys, hf / "config.json", "not valid JSON", "line 1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_convert_damaged_safetensors(hf, tmp_path, damage, capsys):
    weights = hf / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"random": np.random.default_rng(0).bytes(1000), "truncated": data[: len(data) // 2],
                         "empty": b""}[damage])
    assert convert_main([str(hf), str(tmp_path / "out")]) == 2
    one_error(capsys, weights, "damaged or incomplete")
    assert not (tmp_path / "out").exists()


def test_convert_damaged_index(hf, tmp_path, capsys):
    (hf / "model.safetensors.index.json").write_text('{"weight_map": ')
    assert convert_main([str(hf), str(tmp_path / "out")]) == 2
    one_error(capsys, hf / "model.safetensors.index.json", "not valid JSON")


def test_convert_of_a_jaxtrain_checkpoint_without_to_hf_says_so(ck, tmp_path, capsys):
    assert convert_main([str(ck), str(tmp_path / "out")]) == 2
    one_error(capsys, f"{ck}: no config.json; expected a Hugging Face MPT folder; it holds a jaxtrain checkpoint: "
                      f"add --to hf to export it")
    assert convert_main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    one_error(capsys, f"{tmp_path / 'missing'}: no such folder")
    for size, problem in (("abc", "use a number of bytes or e.g. 5GB"), ("0", "must be at least one byte")):
        assert convert_main([str(ck), str(tmp_path / "out"), "--to", "hf", "--max-shard-size", size]) == 2
        one_error(capsys, f"--max-shard-size '{size}': {problem}")
    assert not (tmp_path / "out").exists()


def test_convert_options_of_the_other_direction_are_refused_not_ignored(hf, ck, tmp_path, capsys):
    for source, argv, flag in ((hf, ["--dtype", "bfloat16"], "--dtype"), (hf, ["--step", "3"], "--step"),
                               (hf, ["--max-shard-size", "1GB"], "--max-shard-size"),
                               (ck, ["--to", "hf", "--no-scan-layers"], "--no-scan-layers"),
                               (ck, ["--to", "peft", "--max-shard-size", "1GB"], "--max-shard-size")):
        assert convert_main([str(source), str(tmp_path / "out"), *argv]) == 2
        one_error(capsys, f"{flag}: it has no effect with --to {argv[1] if argv[0] == '--to' else 'jaxtrain'}")
    assert not (tmp_path / "out").exists()


def test_convert_to_an_existing_file_leaves_it_alone(hf, ck, tmp_path, capsys):
    existing = tmp_path / "existing.yaml"
    existing.write_text("model: {}\n")
    assert convert_main([str(hf), str(existing)]) == 2
    one_error(capsys, existing, "not a folder")
    assert convert_main([str(ck), str(existing), "--to", "hf"]) == 2
    one_error(capsys, existing, "not a folder")
    assert convert_main([str(hf), str(existing / "sub")]) == 2
    one_error(capsys, existing, "not a folder")
    assert existing.read_text() == "model: {}\n"


def test_convert_that_cannot_write_its_output_is_one_line(ck, tmp_path, capsys, monkeypatch):
    import errno

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "hf" / "model.safetensors"))

    monkeypatch.setattr("jaxtrain.convert.hf_mpt.SafetensorsWriter", disk_full)
    assert convert_main([str(ck), str(tmp_path / "hf"), "--to", "hf"]) == 2
    one_error(capsys, tmp_path / "hf" / "model.safetensors", "No space left on device", "convert again")


# ----------------------------------------------------------------------------- credentials in configs


def test_credentials_read_from_the_environment_are_never_printed(tmp_path, monkeypatch):
    from jaxtrain.config import dump_yaml, load_config
    from jaxtrain.config.interpolate import mask

    secret, bucket = "hf_Zq8rT2wLmP4kX9", "team-bucket-7"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("DATA_BUCKET", bucket)
    config = tmp_path / "run.yaml"
    config.write_text("variables:\n  token: ${oc.env:HF_TOKEN}\n  bucket: ${oc.env:DATA_BUCKET}\n"
                      "metadata:\n  hub: ${variables.token}\n  where: s3://${variables.bucket}/data\n")
    secrets = []
    cfg = load_config(str(config), secrets=secrets)
    assert cfg.metadata["hub"] == secret  # the run itself has the value
    shown = mask(dump_yaml(cfg), secrets)
    assert secret not in shown and "hub: <hidden>" in shown and f"s3://{bucket}/data" in shown  # only credentials
    assert yaml.safe_load(shown)["metadata"]["hub"] == "<hidden>"
    # the train command prints what it was given masked, errors included
    config.write_text("variables:\n  token: ${oc.env:HF_TOKEN}\nprecision: ${variables.token}\n")
    result = subprocess.run([sys.executable, "-m", "jaxtrain.main", "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_TOKEN=secret))
    assert result.returncode == 2 and secret not in result.stdout + result.stderr, result.stderr
    assert "precision: unknown name '<hidden>'" in result.stderr, result.stderr
    # and so are errors found once the config is read (a load_path that is not there)
    config.write_text("variables:\n  token: ${oc.env:DB_PASSWORD}\nload_path: ${variables.token}\n")
    result = subprocess.run([sys.executable, "-m", "jaxtrain.main", "--config", str(config), "--set",
                             f"run_folder={tmp_path}/run"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, DB_PASSWORD=secret))
    assert result.returncode == 2 and secret not in result.stdout + result.stderr, result.stderr
    assert "load_path: <hidden>: no such folder" in result.stderr, result.stderr


def test_a_run_or_save_folder_that_is_a_file_is_one_line_before_anything_is_built(tmp_path, capsys):
    from jaxtrain.train.command import train_command

    existing = tmp_path / "notes.txt"
    existing.write_text("kept\n")
    cases = [(f"run_folder={existing}", f"run_folder: {existing}: a file, not a folder"),
             (f"save_folder={existing}", f"save_folder: {existing}: a file, not a folder"),
             (f"save_folder={existing}/checkpoints", f"save_folder: {existing}/checkpoints: {existing} is a file, not a "
                                                    "folder")]
    for override, start in cases:
        run_folder = [] if override.startswith("run_folder") else [f"run_folder={tmp_path}/run"]
        assert train_command(str(ROOT / "configs" / "quickstart.yaml"), [override, *run_folder]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {start}; give a folder path") and err.count("\n") == 1, err
    assert existing.read_text() == "kept\n" and not (tmp_path / "run").exists()


def test_training_without_a_config_or_out_of_memory_is_one_line(tmp_path):
    """No --config is refused (the defaults alone are a 1.3B model); a device out of memory while
    the run is built or trained is one line saying what to lower."""
    result = subprocess.run([sys.executable, "-m", "jaxtrain.main"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: no config: pass --config PATH")
    assert len(result.stderr.strip().splitlines()) == 1
    # an embedding of 2**30 x 64 float32 (256 GiB) cannot be allocated
    sets = ["variables.max_seq_len=64", "model.d_model=64", "model.n_layers=1", "model.vocab_size=1073741824",
            "train_loader.dataset.max_files=20", "eval_loader.dataset.max_files=20", f"run_folder={tmp_path}/run",
            "save_folder=null", "max_duration=1ba"]
    result = subprocess.run([sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml",
                             *[arg for item in sets for arg in ("--set", item)]], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the device ran out of memory"), result.stderr[-3000:]
    assert "lower device_train_microbatch_size (now 16)" in lines[0]

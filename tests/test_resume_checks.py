"""Autoresume and load_path against the checkpoint they read: an unreadable newest checkpoint is
moved aside and saved again, a config the checkpoint would be misread under is one line, other
changed settings are one notice, and weights of another model are one line naming parameters."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxtrain.checkpoint.load import load_checkpoint
from jaxtrain.config import Config, ConfigError, config_to_dict
from test_end_to_end import ROOT, TINY, command, run

# The tiny model but 4 layers of width 256: big enough that a failed restore leaves reads behind.
WIDER = [item for item in TINY if not item.startswith(("model.d_model=", "model.n_layers="))]
NOISE = ("Traceback", "Event loop is closed", "Exception ignored")


def wider_command(tmp_path: Path, *overrides: str) -> list[str]:
    args = [sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"]
    for item in [*WIDER, f"run_folder={tmp_path}/run", f"save_folder={tmp_path}/checkpoints", *overrides]:
        args += ["--set", item]
    return args


def params_of(folder) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(load_checkpoint(str(folder)).params)]


def truncate_largest_array_file(step_folder: Path) -> None:
    files = [path for path in (step_folder / "state").rglob("*") if path.is_file() and "/d/" in str(path)]
    largest = max(files, key=lambda path: path.stat().st_size)
    with open(largest, "r+b") as handle:
        handle.truncate(1000)


def error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert not any(noise in result.stderr + result.stdout for noise in NOISE), result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def tree_listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*"))}


# ----------------------------------------------------------------------------- the unreadable newest step


def test_unreadable_newest_checkpoint_is_moved_aside_and_saved_again_quietly(tmp_path):
    args = wider_command(tmp_path, "max_duration=2ba", "save_interval=1ba", "eval_interval=0")
    first = run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    trained = params_of(checkpoints)  # step 2, as the uninterrupted run left it
    truncate_largest_array_file(checkpoints / "2")

    again = run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert not any(noise in output for noise in NOISE), output[-3000:]
    assert f"checkpoint {checkpoints}/2 cannot be restored" in again.stdout
    assert "moved aside to" in again.stdout and "at step 1" in again.stdout
    assert "notice: autoresume" not in again.stdout  # the same config: nothing to note
    aside = [path.name for path in checkpoints.iterdir() if path.name.startswith("2.unreadable-")]
    assert len(aside) == 1 and (checkpoints / aside[0] / "state").is_dir()  # kept, not deleted
    # Step 2 is saved again: it reads back, equal to the uninterrupted run's.
    assert load_checkpoint(str(checkpoints)).step == 2
    for ours, reference in zip(params_of(checkpoints), trained):
        np.testing.assert_array_equal(ours, reference)


def change_one_number(step_folder: Path) -> str:
    """Rewrite one element of a weight in a step's state, as a flipped bit on disk would leave it:
    the files stay complete and decode. Returns the array's name."""
    import tensorstore as ts

    base = f"file://{step_folder / 'state'}/"
    keys = [key.decode() for key in ts.KvStore.open({"driver": "ocdbt", "base": base}).result().list().result()]
    name = next(key.split("/")[0] for key in keys if key.startswith("params.") and "Wqkv.kernel" in key)
    array = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base, "path": f"{name}/"}}).result()
    value = array[(0,) * array.rank].read().result()
    array[(0,) * array.rank].write(value * 1.5 + 0.25).result()
    return name.removesuffix(".value")


def test_a_number_changed_on_disk_is_caught_and_the_step_passed_over(tmp_path):
    """Every array's checksum is saved with the checkpoint: a step whose bytes changed but still
    decode is refused by readers in one line naming the array, and autoresume goes on from the
    step before it, then saves that step again equal to the uninterrupted run's."""
    args = command(tmp_path, "max_duration=2ba", "save_interval=1ba", "eval_interval=0")
    first = run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    trained = params_of(checkpoints)
    name = change_one_number(checkpoints / "2")
    with pytest.raises(ConfigError) as err:
        load_checkpoint(str(checkpoints))
    assert f"array {name} does not match the checksum saved with it" in str(err.value)
    assert "\n" not in str(err.value) and f"read another step instead: 1 (its folder, e.g. {checkpoints}/1, or --step 1)" in str(err.value)

    again = run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not any(noise in again.stdout + again.stderr for noise in NOISE), again.stderr[-3000:]
    assert f"checkpoint {checkpoints}/2 cannot be restored ({checkpoints}/2: array {name} does not match" in again.stdout
    assert "at step 1" in again.stdout
    for ours, reference in zip(params_of(checkpoints), trained):
        np.testing.assert_array_equal(ours, reference)


def test_unreadable_remote_step_falls_back_to_an_older_remote_one_and_is_uploaded_again(tmp_path, s3_checkpoints):
    client, bucket, url = s3_checkpoints
    # every checkpoint kept (the default): no pruning deletes the unreadable copy before it is saved again
    args = command(tmp_path, f"save_folder={url}", "max_duration=6ba", "save_interval=3ba", "eval_interval=0",
                   "save_num_checkpoints_to_keep=-1")
    first = run(args)
    assert first.returncode == 0, first.stderr[-3000:]
    trained = params_of(url)  # step 6
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket)["Contents"]]
    arrays = [key for key in keys if key.startswith("run/checkpoints/6/state/") and "/d/" in key]
    largest = max(arrays, key=lambda key: client.head_object(Bucket=bucket, Key=key)["ContentLength"])
    body = client.get_object(Bucket=bucket, Key=largest)["Body"].read()
    client.put_object(Bucket=bucket, Key=largest, Body=body[:1000])  # damaged in the bucket
    stale = "run/checkpoints/6/state/d/left-by-an-earlier-save"
    client.put_object(Bucket=bucket, Key=stale, Body=b"not part of the step saved again")

    again = run(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "cannot be restored" in again.stdout and "moved aside to" in again.stdout
    assert "at step 3" in again.stdout
    aside = tmp_path / "run" / "checkpoint-staging.unreadable"
    assert [path.name.split(".")[0] for path in aside.iterdir()] == ["6"]
    from jaxtrain.checkpoint.remote import RemoteSteps

    assert RemoteSteps(url).complete_steps() == [3, 6]  # step 3 was not pruned on the way
    for ours, reference in zip(params_of(url), trained):  # step 6, uploaded again
        np.testing.assert_array_equal(ours, reference)
    # the step saved again is what the bucket holds under it: Orbax names data files at random, and
    # the earlier copy's (and the stray one) are gone, so a download fetches one copy, not two
    listed = {item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix="run/checkpoints/6/")["Contents"]}
    assert stale not in listed and "run/checkpoints/6/_JAXTRAIN_UPLOADED" in listed
    assert not listed & set(arrays)


# ----------------------------------------------------------------------------- the config on resume


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step tiny run, checkpoints at steps 1 and 2; tests resume copies of it."""
    folder = tmp_path_factory.mktemp("trained")
    result = run(command(folder, "max_duration=2ba", "save_interval=1ba", "eval_interval=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def copy_of(trained_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained_run / "checkpoints", tmp_path / "checkpoints")
    shutil.copytree(trained_run / "run", tmp_path / "run")
    return tmp_path


def test_a_model_shape_change_on_resume_is_one_line_and_touches_no_checkpoint(trained_run, tmp_path):
    copy_of(trained_run, tmp_path)
    before = tree_listing(tmp_path / "checkpoints")
    result = run(command(tmp_path, "max_duration=2ba", "save_interval=1ba", "eval_interval=0", "model.n_layers=1"))
    line = error_line(result)
    assert line.startswith(f"error: autoresume: the checkpoint at {tmp_path}/checkpoints/2 was saved with "
                           f"model.n_layers=2 (the config says 1)"), line
    assert "set it back" in line and "another save_folder" in line and "move it aside" not in line
    assert "cannot be restored" not in result.stdout
    assert tree_listing(tmp_path / "checkpoints") == before
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "unreadable_checkpoint" not in metrics


@pytest.mark.parametrize("override, named", [
    ("variables.max_seq_len=32", "max_seq_len=64 (the config says 32)"),  # re-packs the data
    ("train_loader.dataset.max_files=50", "train_loader.dataset.max_files=60 (the config says 50)"),
    ("optimizer.name=decoupled_lionw", "optimizer.name=decoupled_adamw (the config says decoupled_lionw)"),
])
def test_a_setting_the_checkpoint_would_be_misread_under_is_refused(trained_run, tmp_path, override, named):
    copy_of(trained_run, tmp_path)
    result = run(command(tmp_path, "max_duration=2ba", "save_interval=1ba", "eval_interval=0", override))
    line = error_line(result)
    assert line.startswith(f"error: autoresume: the checkpoint at {tmp_path}/checkpoints/2 was saved with"), line
    assert named in line and "back to the checkpoint's value" in line, line
    assert "parameters;" not in result.stdout  # refused before the model is built and its step compiled


def test_changed_hyperparameters_are_one_notice_and_the_run_continues(trained_run, tmp_path):
    copy_of(trained_run, tmp_path)
    result = run(command(tmp_path, "max_duration=3ba", "save_interval=1ba", "eval_interval=0", "optimizer.lr=0.01",
                         "console_log_interval=2ba", "seed=5", "health.watchdog_min=100"))
    assert result.returncode == 0, result.stderr[-3000:]
    notices = [line for line in result.stdout.splitlines() if line.startswith("notice: autoresume")]
    assert len(notices) == 1, result.stdout[-3000:]
    assert "optimizer.lr (0.003 -> 0.01)" in notices[0] and "max_duration (2ba -> 3ba)" in notices[0]
    assert "neither config" in notices[0]
    for quiet in ("console_log_interval", "seed", "health"):  # cannot change the numbers (or said elsewhere)
        assert quiet not in notices[0]
    assert "resuming in the checkpoint's data order" in result.stderr  # the changed seed: the loader's own note
    assert "resumed from" in result.stdout and json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 3


def _leaf_keys(doc: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in doc.items():
        if isinstance(value, dict) and value:
            keys += _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_every_setting_has_an_explicit_resume_class():
    from jaxtrain.train.resume_settings import IGNORE, NOTICE, REFUSE_DATA, REFUSE_MODEL, REFUSE_STATE, RESUME_KEYS, compare_configs

    for key in _leaf_keys(config_to_dict(Config())):
        parts = key.split(".")
        assert any(".".join(parts[:end]) in RESUME_KEYS for end in range(len(parts), 0, -1)), key
    base = config_to_dict(Config())

    def classes(**changes) -> dict[str, str]:
        current = json.loads(json.dumps(base))
        for key, value in changes.items():
            node = current
            *parents, last = key.split("__")
            for part in parents:
                node = node[part]
            node[last] = value
        refused, noticed = compare_configs(base, current)
        return {**{key: kind for key, _, _, kind in refused}, **{key: NOTICE for key, _, _ in noticed}}

    assert classes(model__n_layers=3) == {"model.n_layers": REFUSE_MODEL}
    assert classes(model__attn_config__alibi=True) == {"model.attn_config.alibi": REFUSE_MODEL}
    assert classes(max_seq_len=16) == {"max_seq_len": REFUSE_DATA}
    assert classes(tokenizer__kwargs={"vocab_size": 10}) == {"tokenizer.kwargs.vocab_size": REFUSE_DATA}
    assert classes(health__spike_window=5) == {"health.spike_window": REFUSE_STATE}
    assert classes(algorithms__gradient_clipping={"clipping_type": "norm", "clipping_threshold": 1.0}) == {
        "algorithms.gradient_clipping": REFUSE_STATE}
    assert classes(algorithms__ema={"half_life": "10ba"}) == {"algorithms.ema": REFUSE_STATE}  # one more tree
    with_ema = json.loads(json.dumps(base))
    with_ema["algorithms"]["ema"] = {"half_life": "10ba", "smoothing": None, "ema_start": "0.0dur",
                                     "update_interval": None}
    changed = json.loads(json.dumps(with_ema))
    changed["algorithms"]["ema"]["half_life"] = "20ba"
    assert compare_configs(with_ema, changed) == ([], [("algorithms.ema.half_life", "10ba", "20ba")])
    assert classes(optimizer__name="adamw") == {"optimizer.name": NOTICE}
    assert classes(optimizer__lr=1.0, precision="fp32", global_train_batch_size=3, scheduler__alpha_f=0.5) == {
        "optimizer.lr": NOTICE, "precision": NOTICE, "global_train_batch_size": NOTICE, "scheduler.alpha_f": NOTICE}
    assert classes(run_name="x", save_interval="5ba", eval_interval="1ba", progress_bar=False, seed=1,
                   faults__crash_at_step=3, health__watchdog_timeout=5.0, model__init_config__init_std=0.1) == {}
    assert RESUME_KEYS["train_loader.dataset.shuffle"] == IGNORE  # the loader state's order wins
    # The same data moved to another folder: listed, not refused; another subset of it: refused.
    assert classes(train_loader__dataset__local="/moved/data") == {"train_loader.dataset.local": NOTICE}
    assert classes(train_loader__dataset__max_files=3) == {"train_loader.dataset.max_files": REFUSE_DATA}
    # A checkpoint of another version: settings only one side has are not compared.
    assert compare_configs(dict(base, retired_setting=1), base, both_have=True) == ([], [])


# ----------------------------------------------------------------------------- load_path of another model


def test_load_path_of_a_model_with_other_parameters_is_one_line(tmp_path):
    from flax import nnx

    from jaxtrain.config import load_config
    from jaxtrain.convert.hf_mpt import save_model
    from jaxtrain.models.mpt import MPTForCausalLM

    # No ALiBi (a learned position embedding, wpe) and tied embeddings (no lm_head).
    sets = [item for item in TINY if item.startswith(("variables.", "model."))] + ["model.attn_config.alibi=false"]
    model_cfg = load_config(str(ROOT / "configs" / "quickstart.yaml"), sets, notices=[]).model
    params = nnx.to_pure_dict(nnx.state(MPTForCausalLM(model_cfg, rngs=nnx.Rngs(0)), nnx.Param))
    source = tmp_path / "source"
    save_model(str(source), model_cfg, jax.tree.map(np.asarray, params))

    # The quickstart model with untied embeddings: it needs lm_head and has no wpe.
    result = run(command(tmp_path, "max_duration=1ba", "eval_interval=0", f"load_path={source}",
                         "model.tie_word_embeddings=false"))
    line = error_line(result)
    assert line.startswith(f"error: load_path: {source}: "), line
    assert "the model has lm_head.kernel, which the checkpoint lacks" in line, line
    assert "the checkpoint has wpe.embedding, which the model lacks" in line, line
    assert "model.tie_word_embeddings=true (the config says false)" in line, line
    assert "model.attn_config.alibi=false (the config says true)" in line, line
    assert line.endswith("make the model section match the checkpoint's"), line


def test_a_weights_only_checkpoint_in_the_save_folder_is_one_line(trained_run, tmp_path):
    from flax import nnx

    from jaxtrain.convert.hf_mpt import save_model

    loaded = load_checkpoint(str(trained_run / "checkpoints"))
    save_model(str(tmp_path / "checkpoints"), loaded.model_cfg, nnx.to_pure_dict(loaded.params))
    result = run(command(tmp_path, "max_duration=2ba", "eval_interval=0"))
    line = error_line(result)
    assert line == (f"error: autoresume: the checkpoint at {tmp_path}/checkpoints/0 holds weights only (converted or "
                    f"saved outside training), no optimizer state or data position to resume from; start from its "
                    f"weights with load_path: {tmp_path}/checkpoints and another save_folder"), line
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["0"]
    assert "parameters;" not in result.stdout


def test_a_tokenizer_file_moved_elsewhere_resumes_and_another_one_is_refused(tmp_path):
    """tokenizer.name changes when the data folder holding it moves: the same tokenizer (its
    fingerprint and special tokens, as the checkpoint's meta records them) resumes; another does not."""
    import tokenizers

    from jaxtrain.config import ConfigError, load_config_dict
    from jaxtrain.data.tokenizer import Tokenizer
    from jaxtrain.train.resume_settings import refuse_to_resume, tokenizer_record

    def save(folder: Path, vocab: dict) -> Path:
        backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
        backend.add_special_tokens(["<|endoftext|>"])
        return Path(Tokenizer(backend).save(str(folder / "tokenizer.json"))[0])

    vocab = {"a": 0, "b": 1, "<|endoftext|>": 2}
    trained_with = save(tmp_path / "data", vocab)
    cfg = load_config_dict({"tokenizer": {"name": str(trained_with)}})
    meta = {"config": config_to_dict(cfg), "loader": {"epoch": 0, "sample_in_epoch": 0},
            "tokenizer": tokenizer_record(Tokenizer(tokenizers.Tokenizer.from_file(str(trained_with))))}
    moved = save(tmp_path / "moved" / "data", vocab)
    assert refuse_to_resume(load_config_dict({"tokenizer": {"name": str(moved)}}), "ck", 3, meta) == []
    other = save(tmp_path / "other", {"a": 0, "c": 1, "<|endoftext|>": 2})
    with pytest.raises(ConfigError, match=r"autoresume: the checkpoint at ck/3 was saved with tokenizer.name="):
        refuse_to_resume(load_config_dict({"tokenizer": {"name": str(other)}}), "ck", 3, meta)
    # the same file read with another EOS makes other rows
    with pytest.raises(ConfigError, match="tokenizer.name="):
        refuse_to_resume(load_config_dict({"tokenizer": {"name": str(moved), "kwargs": {"eos_token": "a"}}}),
                         "ck", 3, dict(meta, config=config_to_dict(load_config_dict(
                             {"tokenizer": {"name": str(trained_with), "kwargs": {"eos_token": "a"}}}))))
    meta.pop("tokenizer")  # a checkpoint that does not record its tokenizer: a new path is refused
    with pytest.raises(ConfigError, match="tokenizer.name="):
        refuse_to_resume(load_config_dict({"tokenizer": {"name": str(moved)}}), "ck", 3, meta)


def test_a_run_with_load_path_or_resuming_builds_placeholders_and_takes_every_weight(trained_run, tmp_path):
    """The weights of a run with load_path (or resuming from its save folder) are replaced right
    after its state is built, so its linear layers and embeddings start as zeros instead of
    drawn: the program that builds the state holds no float copies of the stacked kernels, and
    after loading every parameter equals the checkpoint's (none is left a placeholder)."""
    import contextlib
    import io

    import optax
    from flax import nnx

    from jaxtrain.config import load_config
    from jaxtrain.config.schema import ParallelismConfig
    from jaxtrain.parallel.logical import DEFAULT_RULES
    from jaxtrain.parallel.mesh import build_mesh
    from jaxtrain.train import state as train_state
    from jaxtrain.train.loop import Trainer
    from jaxtrain.train.setup import build_run

    # the programs that build the state, drawn and as placeholders, of a model wide enough that
    # its kernels dominate
    cfg = load_config(str(ROOT / "configs" / "quickstart.yaml"),
                      ["model.d_model=512", "model.n_heads=8", "model.n_layers=4", "model.vocab_size=1024"]).model
    mesh = build_mesh(ParallelismConfig(data=1))
    temps, shapes = {}, {}
    for loaded in (False, True):
        init, shardings, _ = train_state._state_plan(cfg, optax.adamw(1e-3), mesh, DEFAULT_RULES, 100,
                                                     weights_loaded=loaded)
        temps[loaded] = jax.jit(init, out_shardings=shardings).lower(jax.random.key(0)).compile(
            ).memory_analysis().temp_size_in_bytes
        shapes[loaded] = jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(init, jax.random.key(0)))
    kernels = 4 * 4 * (512 * 1536 + 512 * 512 + 2 * 512 * 2048)  # the blocks' kernels in float32
    assert temps[True] < kernels / 8 < temps[False]
    assert shapes[True] == shapes[False]  # the same state, dtypes and all

    run_cfg = load_config(str(ROOT / "configs" / "quickstart.yaml"), [
        *TINY, "max_duration=1ba", "eval_interval=0", f"run_folder={tmp_path}/run",
        f"save_folder={tmp_path}/checkpoints", f"load_path={trained_run}/checkpoints", "log_to_console=false"])
    with contextlib.redirect_stdout(out := io.StringIO()):
        parts = build_run(run_cfg)
        built = nnx.to_pure_dict(parts.state.params)
        trainer = Trainer(parts)
        trainer.maybe_resume()
    parts.train_loader.close()
    assert "loaded weights from" in out.getvalue()
    assert not np.asarray(built["wte"]["embedding"]).any()
    assert not any(np.asarray(leaf).any() for leaf in jax.tree.leaves(built["blocks"]["ffn"]))
    loaded = load_checkpoint(f"{trained_run}/checkpoints")
    assert loaded.step == 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 trainer.state.params, loaded.params)

    # so does a run that resumes from its save folder (autoresume), and it takes the checkpoint's
    # weights; without autoresume (the run would start over) they are drawn
    resumed = copy_of(trained_run, tmp_path / "resumed")
    for autoresume in (False, True):
        run_cfg = load_config(str(ROOT / "configs" / "quickstart.yaml"), [
            *TINY, "max_duration=3ba", "eval_interval=0", f"run_folder={resumed}/run", "log_to_console=false",
            f"save_folder={resumed}/checkpoints", f"autoresume={str(autoresume).lower()}", "save_overwrite=true"])
        with contextlib.redirect_stdout(out := io.StringIO()):
            parts = build_run(run_cfg)
            built = nnx.to_pure_dict(parts.state.params)
            if autoresume:
                trainer = Trainer(parts)
                trainer.maybe_resume()
        parts.train_loader.close()
        assert np.asarray(built["wte"]["embedding"]).any() != autoresume
    assert "resumed from" in out.getvalue() and trainer.step == 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 trainer.state.params, loaded.params)


@pytest.mark.parametrize("error", [NameError, RuntimeError])
def test_a_defect_in_reading_is_not_taken_for_a_damaged_checkpoint(trained_run, monkeypatch, error):
    """An error only a defect in the code raises (a NameError, say) while a step is read comes out
    as itself; any other is the step's "incomplete or damaged" line, which sends a resume on to
    older steps."""
    import orbax.checkpoint as ocp

    from jaxtrain.config import ConfigError

    def failing(**_):
        raise error("while reading")

    monkeypatch.setattr(ocp, "ArrayRestoreArgs", failing)
    expected = NameError if error is NameError else ConfigError
    with pytest.raises(expected) as raised:
        load_checkpoint(str(trained_run / "checkpoints"))
    if expected is ConfigError:
        assert "checkpoint step 2 is incomplete or damaged (its state item cannot be read)" in str(raised.value)


def test_a_run_resuming_from_a_bucket_builds_placeholders_and_never_trains_on_them(trained_run, tmp_path,
                                                                                   s3_checkpoints):
    """A run whose save folder in a bucket holds an uploaded step builds its weights as zeros too
    (one listing before the build) and takes the checkpoint's; a run whose checkpoints are gone
    between the build and the resume stops in one line instead of training on the zeros."""
    import contextlib
    import io

    from flax import nnx

    from jaxtrain.checkpoint.manager import holds_checkpoint
    from jaxtrain.config import ConfigError, load_config
    from jaxtrain.train.loop import Trainer
    from jaxtrain.train.setup import build_run

    _, bucket, url = s3_checkpoints
    first = run(command(tmp_path / "first", f"save_folder={url}", "max_duration=2ba", "save_interval=1ba",
                        "eval_interval=0"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert holds_checkpoint(url)
    assert not holds_checkpoint(f"s3://{bucket}/elsewhere") and not holds_checkpoint("s3://no-such-bucket-here/run")

    def build(save_folder, run_folder):
        cfg = load_config(str(ROOT / "configs" / "quickstart.yaml"), [
            *TINY, "max_duration=3ba", "eval_interval=0", f"run_folder={run_folder}", "log_to_console=false",
            f"save_folder={save_folder}"])
        with contextlib.redirect_stdout(io.StringIO()):
            parts = build_run(cfg)
        parts.train_loader.close()
        return parts, nnx.to_pure_dict(parts.state.params)

    parts, built = build(url, tmp_path / "again")
    assert parts.weights_placeholders and not np.asarray(built["wte"]["embedding"]).any()
    with contextlib.redirect_stdout(out := io.StringIO()):
        trainer = Trainer(parts)
        trainer.maybe_resume()
    assert "resumed from" in out.getvalue() and trainer.step == 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 trainer.state.params, load_checkpoint(url).params)

    local = copy_of(trained_run, tmp_path / "local")
    parts, built = build(local / "checkpoints", local / "run")
    assert parts.weights_placeholders
    shutil.rmtree(local / "checkpoints")
    with pytest.raises(ConfigError, match="held a checkpoint when this run started but none now"):
        Trainer(parts).maybe_resume()

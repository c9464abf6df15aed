"""LoRA checkpoints without the frozen weights (``save_frozen_weights``).

A LoRA run that read its frozen weights from a local folder saves only what it trains (adapters,
their moments and average, the data position) with a fingerprinted record of that folder; every
reader of the checkpoint reads the frozen weights back from there and gets what a checkpoint
holding them would give, bit for bit. A folder changed or gone since is refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file, save_file

from jaxtrain.checkpoint.load import load_checkpoint
from jaxtrain.config import ConfigError, load_config_dict
from jaxtrain.convert.hf_mpt import export_hf
from jaxtrain.layers import lora
from jaxtrain.train.loop import Trainer
from test_lora import BASE, fit, run_config


def saved_names(folder: Path, step: int) -> list[str]:
    """The parameter names a checkpoint step holds, from its state item's metadata."""
    tree = ocp.PyTreeCheckpointer().metadata(str(folder / str(step) / "state")).item_metadata["params"]
    names = [".".join(str(getattr(key, "key", key)) for key in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(dict(tree))[0]]
    return [name.removesuffix(".value") for name in names]


def leaves(params) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_checkpoints_hold_the_adapters_and_read_the_frozen_weights_back(tmp_path, monkeypatch):
    """Two runs, adapters-only (the default) and save_frozen_weights: true, through a NaN rollback
    and a resume, train the same adapters; their checkpoints read back the same weights."""
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    (tmp_path / "small").mkdir()
    (tmp_path / "full").mkdir()
    health = {"nan_policy": "rollback"}
    faults = {"nan_at_steps": [5]}
    small = run_config(tmp_path / "small", base, health=health, faults=faults)
    full = run_config(tmp_path / "full", base, health=health, faults=faults, save_frozen_weights=True)
    _, trainer, _, printed = fit(small)
    assert "checkpoints hold the adapters and read the frozen weights back from there" in printed
    assert "rolled back to step 3" in printed
    _, reference, _, _ = fit(full)
    for ours, theirs in zip(leaves(trainer.state.params), leaves(reference.state.params)):
        np.testing.assert_array_equal(ours, theirs)

    small_ckpt, full_ckpt = tmp_path / "small" / "checkpoints", tmp_path / "full" / "checkpoints"
    names = saved_names(small_ckpt, 6)
    assert names and all(name.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for name in names)
    assert any(name.endswith("kernel") for name in saved_names(full_ckpt, 6))
    meta = json.loads((small_ckpt / "6" / "meta" / "metadata").read_text())
    assert meta["frozen_weights"]["path"] == str(base) and meta["frozen_weights"]["step"] is None
    assert "frozen_weights" not in json.loads((full_ckpt / "6" / "meta" / "metadata").read_text())
    # what generate, eval and convert read: the same weights both ways
    for ours, theirs in zip(leaves(load_checkpoint(str(small_ckpt)).params),
                            leaves(load_checkpoint(str(full_ckpt)).params)):
        np.testing.assert_array_equal(ours, theirs)

    # a resume in a fresh trainer (its frozen weights random until read back) ends where it did
    shutil.rmtree(small_ckpt / "6")
    _, again, _, printed = fit(small)
    assert f"resumed from {small_ckpt} at step 3 (the frozen weights read back from {base})" in printed
    for ours, theirs in zip(leaves(again.state.params), leaves(trainer.state.params)):
        np.testing.assert_array_equal(ours, theirs)

    # another LoRA run starting from this checkpoint reads through its record too, and records it
    chained = dataclasses.replace(small, load_path=str(small_ckpt), save_folder=str(tmp_path / "chained" / "ckpt"),
                                  run_folder=str(tmp_path / "chained" / "run"), autoresume=False)
    _, follower, _, _ = fit(dataclasses.replace(chained, max_duration="1ba", save_interval="1ba"))
    record = json.loads((tmp_path / "chained" / "ckpt" / "1" / "meta" / "metadata").read_text())["frozen_weights"]
    assert record["path"] == str(small_ckpt) and record["step"] == 6
    frozen = lora.split_trainable(follower.state.params)[1]
    for ours, theirs in zip(leaves(frozen), leaves(lora.split_trainable(trainer.state.params)[1])):
        np.testing.assert_array_equal(ours, theirs)

    # its resume follows the chain (its record names the first run's checkpoint, whose record names
    # the base folder), reading every checkpoint on the way into the run's shardings, never whole
    # onto one device, and ends where an uninterrupted run does
    from jaxtrain.checkpoint import load as load_module

    reads, read = [], load_module.load_checkpoint

    def reading(folder, step=None, **kwargs):
        reads.append((Path(folder).name, kwargs.get("like") is not None))
        return read(folder, step, **kwargs)

    _, straight, _, _ = fit(dataclasses.replace(chained, max_duration="2ba", save_interval="1ba",
                                                save_folder=str(tmp_path / "straight" / "ckpt"),
                                                run_folder=str(tmp_path / "straight" / "run")))
    monkeypatch.setattr(load_module, "load_checkpoint", reading)
    _, resumed, _, printed = fit(dataclasses.replace(chained, max_duration="2ba", save_interval="1ba",
                                                     autoresume=True))
    assert f"at step 1 (the frozen weights read back from {small_ckpt}, step 6)" in printed
    assert ("checkpoints", True) in reads and all(like for _, like in reads)
    for ours, theirs in zip(leaves(resumed.state.params), leaves(straight.state.params)):
        np.testing.assert_array_equal(ours, theirs)


def test_frozen_weights_changed_or_gone_are_refused_in_one_line(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    cfg = run_config(tmp_path, base, max_duration="3ba")
    fit(cfg)
    checkpoints = tmp_path / "checkpoints"
    # the weights file re-saved with other values (a retrained model) under the same name
    tensors = load_file(str(base / "model.safetensors"))
    save_file({name: value * 1.01 for name, value in tensors.items()}, str(base / "model.safetensors"))
    for read in (lambda: load_checkpoint(str(checkpoints)),
                 lambda: Trainer.restore_newest_readable(_trainer(dataclasses.replace(cfg, max_duration="6ba")),
                                                         check_config=True)):
        with pytest.raises(ConfigError) as err:
            read()
        message = str(err.value)
        assert "\n" not in message and f"{base}, have changed since it was saved (model.safetensors differs)" in message
        assert "holds LoRA adapters only" in message and str(checkpoints / "3") in message
    shutil.rmtree(base)
    with pytest.raises(ConfigError, match="the frozen weights they adapt, .* are not there; restore them there"):
        load_checkpoint(str(checkpoints))
    # the adapters alone need no frozen weights: a PEFT export still works
    export_hf(str(checkpoints), str(tmp_path / "peft"), adapter_only=True)
    adapter = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 2 * 2 and all("lora_" in name for name in adapter)  # 2 blocks, Wqkv and up_proj, A and B


def _trainer(cfg):
    from jaxtrain.train.setup import build_run

    parts = build_run(cfg)
    parts.train_loader.close()
    return Trainer(parts)


@pytest.mark.parametrize("settings,message", [
    ({"load_path": None}, "save_frozen_weights: false needs load_path (a Hugging Face folder or a jaxtrain checkpoint)"),
    ({"peft": False}, "save_frozen_weights: only a LoRA run (model.peft_config) has frozen weights"),
])
def test_leaving_out_frozen_weights_that_cannot_be_read_back_is_refused(tmp_path, settings, message):
    cfg = dataclasses.asdict(run_config(tmp_path, BASE))
    cfg["save_frozen_weights"] = False
    if settings.pop("peft", True) is False:
        cfg["model"]["peft_config"] = None
    cfg.update(settings)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config_dict(cfg)


MERGED_LOAD = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxtrain.checkpoint import load as load_module
from jaxtrain.checkpoint.load import load_checkpoint, param_names
from jaxtrain.config import load_config_dict
from jaxtrain.train.state import abstract_model
import json

def check(folder, model, reference):
    _, abstract = abstract_model(load_config_dict({"model": model, "max_seq_len": 16}).model)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec(x))),
                        abstract)
    reads.clear()
    loaded = load_checkpoint(folder, like=like, merge_adapters=True)
    assert loaded.model_cfg.peft_config is None and loaded.model_cfg.quantize_frozen is None
    got, wanted = param_names(loaded.params), param_names(like)
    assert sorted(got) == sorted(wanted) == sorted(reference.files)
    for name, value in got.items():
        assert value.sharding == wanted[name].sharding and value.dtype == wanted[name].dtype, name
        np.testing.assert_array_equal(np.asarray(value), reference[name], err_msg=name)
    # every weight the checkpoint holds was read in parts on the mesh, never whole onto one device;
    # only the small adapters are replicated
    whole = [name for name, x in reads if x.ndim >= 2 and x.sharding.shard_shape(x.shape) == x.shape]
    assert reads and all(name.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for name in whole), whole


mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2), ("a", "b"))  # as jaxtrain builds meshes
spec = lambda x: P(*[None] * (x.ndim - 2), "a", "b") if x.ndim >= 2 else P()
reads, restore = [], load_module.restore_state
load_module.restore_state = lambda manager, step, target, *a, **k: (
    reads.extend(param_names(target).items()) or restore(manager, step, target, *a, **k))
for folder, model, reference in json.loads(sys.argv[1]):
    check(folder, model, np.load(reference))
print(len(reads))
"""


def test_a_full_fine_tune_merges_a_lora_checkpoint_on_its_own_devices(tmp_path):
    """A model without adapters on a 2x2 mesh takes a LoRA checkpoint (adapters only, its frozen
    weights read back through its record) and an NF4 one (its packed kernels held in it): each
    weight is read in parts into the mesh, the adapters merged there, and the result equals the
    checkpoint read whole onto one device and merged, bit for bit. A full fine-tune may start from
    the NF4 one."""
    import subprocess
    import sys

    from conftest import cpu_devices_env

    from jaxtrain.config import config_to_dict
    from jaxtrain.checkpoint.load import param_names
    from test_quantize_frozen import _quantized

    (tmp_path / "float").mkdir()
    (tmp_path / "nf4").mkdir()
    float_run = run_config(tmp_path / "float", BASE, max_duration="2ba", save_interval="2ba")
    nf4_run = _quantized(run_config(tmp_path / "nf4", BASE, max_duration="2ba", save_interval="2ba",
                                    save_frozen_weights=True), "nf4")
    cases = []
    for cfg in (float_run, nf4_run):
        fit(cfg)
        saved = load_checkpoint(cfg.save_folder)
        merged = lora.merge_adapters(saved.params, saved.model_cfg)
        reference = str(tmp_path / f"reference-{len(cases)}.npz")
        np.savez(reference, **{name: np.asarray(value.astype(np.float32)) for name, value in param_names(merged).items()})
        cases.append((cfg.save_folder, config_to_dict(lora.without_adapters(cfg.model)), reference))
    out = subprocess.run([sys.executable, "-c", MERGED_LOAD, json.dumps(cases)], env=cpu_devices_env(4),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) > 0
    # a full fine-tune goes on from the NF4 checkpoint (its packed kernels read back and merged)
    follow = dataclasses.replace(nf4_run, model=lora.without_adapters(nf4_run.model), load_path=nf4_run.save_folder,
                                 save_folder=None, run_folder=str(tmp_path / "follow"), max_duration="1ba")
    _, trainer, _, printed = fit(follow)
    assert "with their LoRA adapters merged into them" in printed
    for name, value in param_names(trainer.state.params).items():
        assert value.dtype == np.float32 and not name.endswith(("lora_a", "lora_b", "kernel_scale")), name

"""Sharding changes where numbers live, never what they are.

On 8 simulated CPU devices, FSDP, tensor-parallel and mixed (data x fsdp x tensor) meshes train a
tiny MPT to the same per-step losses as one device, with parameters split as the logical rules say.
The device count must be fixed before JAX starts, so the layouts run in one child process
(this file run as a script) and the tests read its JSON report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from conftest import cpu_devices_env

# Pure data parallelism over 8 devices is the layout of the two-process runs in test_multihost.
LAYOUTS = {"single": (1, 1, 1), "fsdp": (1, 8, 1), "tensor": (2, 1, 4), "mixed": (2, 2, 2)}
FP8_LAYOUTS = ("single", "mixed")  # also trained in amp_fp8 (bf16 compute, fp8 layer products)
NF4_LAYOUTS = ("single", "mixed")  # also trained as LoRA on NF4 frozen weights (quantize_frozen: nf4)
STEPS = 4
VOCAB = 128


def _train_layouts() -> dict:
    """Run every layout for STEPS steps on the same batches; report losses and shardings."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxtrain.config import load_config_dict
    from jaxtrain.config.schema import AttnConfig, ModelConfig, ParallelismConfig
    from jaxtrain.parallel.layout import describe_shardings
    from jaxtrain.parallel.logical import DEFAULT_RULES
    from jaxtrain.parallel.mesh import batch_sharding, build_mesh
    from jaxtrain.train.state import create_train_state
    from jaxtrain.train.step import compile_train_step, make_train_step

    model_cfg = ModelConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=VOCAB,
                            attn_config=AttnConfig(), scan_layers=True)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, VOCAB, size=(16, 16), dtype=np.int32) for _ in range(STEPS)]
    report = {}
    peft = load_config_dict({"model": {"peft_config": {"r": 4, "target_modules": "all-linear"}}}).model.peft_config
    qlora_cfg = dataclasses.replace(model_cfg, peft_config=peft, quantize_frozen="nf4")
    runs = ([(name, "") for name in LAYOUTS] + [(name, "fp8") for name in FP8_LAYOUTS]
            + [(name, "nf4") for name in NF4_LAYOUTS])
    for name, variant in runs:
        fp8 = variant == "fp8"
        data, fsdp, tensor = LAYOUTS[name]
        tx = optax.adamw(3e-3, weight_decay=0.1)
        devices = jax.devices()[: data * fsdp * tensor]
        mesh = build_mesh(ParallelismConfig(data=data, fsdp=fsdp, tensor=tensor), devices)
        state, model_def, shardings = create_train_state(qlora_cfg if variant == "nf4" else model_cfg, tx, seed=0,
                                                         mesh=mesh, rules=DEFAULT_RULES)
        wqkv = state.params["blocks"]["attn"]["Wqkv"]["kernel"]
        mu = state.opt_state[0].mu["blocks"]["attn"]["Wqkv"]
        moment = mu["lora_a" if variant == "nf4" else "kernel"]  # LoRA: the adapters' moments alone
        entry = {
            "wqkv_spec": [axis for axis in wqkv.sharding.spec],
            "wqkv_shard_shape": list(wqkv.addressable_shards[0].data.shape),
            "moment_spec": [axis for axis in moment.sharding.spec],
            "describe": describe_shardings(state),
            "losses": [],
            "grad_norms": [],
        }
        step = compile_train_step(
            make_train_step(model_def, tx, lambda count: jnp.asarray(3e-3), num_microbatches=2,
                            compute_dtype=jnp.bfloat16 if fp8 else jnp.float32, fp8_products=fp8),
            shardings,
            batch_sharding(mesh),
        )
        for ids in batches:
            batch = {"input_ids": jax.device_put(ids, batch_sharding(mesh))}
            state, metrics = step(state, batch)
            entry["losses"].append(float(metrics["loss"]))
            entry["grad_norms"].append(float(metrics["grad_norm"]))
        report[f"{name}-{variant}" if variant else name] = entry
    return report


def _run_layouts(_folder) -> dict:
    env = cpu_devices_env(8)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def layouts(once_per_session) -> dict:
    return once_per_session("parallel-layouts", _run_layouts)


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "single"])
def test_every_layout_gives_the_single_device_losses(layouts, name):
    reference = layouts["single"]
    assert len(layouts[name]["losses"]) == STEPS
    assert reference["losses"][-1] < reference["losses"][0]  # it trains, so later steps depend on updates
    assert layouts[name]["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert layouts[name]["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-4)


def test_fp8_products_give_the_same_losses_sharded(layouts):
    """Each fp8 scale is its tensor's global maximum (all devices agree on it), so a sharded amp_fp8
    step quantises as one device does. What differs is where bf16 partial sums of a product split
    over devices round, and an fp8 rounding that such a difference tips: on this mesh about
    1e-4 of the first loss, 1e-3 after three updates (bf16 without fp8: 0 and 2e-4)."""
    reference, mixed = layouts["single-fp8"], layouts["mixed-fp8"]
    assert reference["losses"][-1] < reference["losses"][0]
    assert mixed["losses"][0] == pytest.approx(reference["losses"][0], rel=2e-4)
    assert mixed["losses"] == pytest.approx(reference["losses"], rel=5e-3)
    assert mixed["grad_norms"] == pytest.approx(reference["grad_norms"], rel=2e-2)
    assert reference["losses"] != pytest.approx(layouts["single"]["losses"], rel=1e-5)  # fp8 is in effect


def test_lora_on_nf4_weights_gives_the_same_losses_sharded(layouts):
    """NF4 codes and scales are sharded as the kernels they stand for (the packed input rows over
    fsdp, the columns over tensor); each device reads back its part: the losses are one device's."""
    reference, mixed = layouts["single-nf4"], layouts["mixed-nf4"]
    assert reference["losses"][-1] < reference["losses"][0]
    assert mixed["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert mixed["wqkv_spec"] == [None, "fsdp", "tensor"] and mixed["wqkv_shard_shape"] == [2, 8, 48]
    assert reference["losses"] != pytest.approx(layouts["single"]["losses"], rel=1e-3)  # LoRA on nf4 weights


def test_wqkv_kernel_is_sharded_as_the_rules_say(layouts):
    # Wqkv kernel [layers=2, embed=32, heads=96]: (layers, embed, heads) -> (None, fsdp, tensor);
    # each device holds the slice the sizes of those axes imply.
    for name in LAYOUTS:
        assert layouts[name]["wqkv_spec"] == [None, "fsdp", "tensor"]
    assert layouts["single"]["wqkv_shard_shape"] == [2, 32, 96]
    assert layouts["fsdp"]["wqkv_shard_shape"] == [2, 4, 96]
    assert layouts["tensor"]["wqkv_shard_shape"] == [2, 32, 24]
    assert layouts["mixed"]["wqkv_shard_shape"] == [2, 16, 48]
    # Adam's moments lie exactly where their parameters do.
    assert layouts["mixed"]["moment_spec"] == layouts["mixed"]["wqkv_spec"]


def test_describe_shardings_lists_each_parameter_with_its_bytes_per_device(layouts):
    lines = layouts["mixed"]["describe"].splitlines()
    wqkv = next(line for line in lines if line.startswith("blocks/attn/Wqkv/kernel "))
    # 2 * 16 * 48 float32 values per device = 6144 bytes = 6.0 KiB
    assert wqkv.split() == ["blocks/attn/Wqkv/kernel", "[2,", "32,", "96]", "(layers,", "embed,", "heads)",
                            "(-,", "fsdp,", "tensor)", "6.0", "KiB/device"]
    embedding = next(line for line in lines if line.startswith("wte/embedding "))
    assert "(vocab, embed)" in embedding and "(tensor, fsdp)" in embedding
    assert lines[-1].startswith("total: ") and "per device" in lines[-1]
    single = layouts["single"]["describe"].splitlines()
    assert len(single) == len(lines)
    assert "24.0 KiB/device" in next(line for line in single if line.startswith("blocks/attn/Wqkv/kernel "))


def test_bad_layouts_fail_with_the_numbers():
    env = cpu_devices_env(8)
    code = """
import optax
from jaxtrain.config.schema import AttnConfig, ModelConfig, ParallelismConfig
from jaxtrain.parallel.layout import check_model_for_mesh
from jaxtrain.parallel.logical import DEFAULT_RULES
from jaxtrain.parallel.mesh import MeshError, build_mesh
from jaxtrain.train.state import create_train_state
def error(fn):
    try:
        fn()
    except MeshError as err:
        return str(err)
    return "no error"
print(error(lambda: build_mesh(ParallelismConfig(data=3, fsdp=1, tensor=1))))
print(error(lambda: build_mesh(ParallelismConfig(data=-1, fsdp=3, tensor=1))))
model = ModelConfig(d_model=48, n_heads=6, n_layers=1, max_seq_len=16, vocab_size=128, attn_config=AttnConfig())
print(error(lambda: check_model_for_mesh(model, build_mesh(ParallelismConfig(data=2, fsdp=1, tensor=4)))))
odd_vocab = ModelConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=16, vocab_size=97, attn_config=AttnConfig())
mesh = build_mesh(ParallelismConfig(data=2, fsdp=1, tensor=4))
print(error(lambda: create_train_state(odd_vocab, optax.sgd(0.1), seed=0, mesh=mesh, rules=DEFAULT_RULES)))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    not_eight, fsdp_three, heads, vocab = proc.stdout.strip().splitlines()
    assert not_eight == "parallelism: mesh data=3 x fsdp=1 x tensor=1 needs 3 devices but 8 are available"
    assert "(3 devices) do not divide the 8 devices" in fsdp_three
    assert heads == "model.n_heads 6 is not divisible by parallelism.tensor 4; use a tensor size that divides 6"
    assert vocab.startswith("parameter wte/embedding [97, 32]: dimension 0 ('vocab') of size 97 does not split")
    assert "tensor = 4 devices" in vocab


@pytest.mark.parametrize("overrides, message", [
    (["parallelism.data=3"], "error: parallelism: mesh data=3 x fsdp=1 x tensor=1 needs 3 devices but 8 are available"),
    (["parallelism.tensor=8"],
     "error: model.n_heads 4 is not divisible by parallelism.tensor 8; use a tensor size that divides 4"),
    (["global_train_batch_size=12", "device_train_microbatch_size=1"],
     "error: global_train_batch_size 12 is not divisible by 8 devices x device_train_microbatch_size 1 = 8; "
     "use 8 or 16"),
])
def test_cli_rejects_layouts_that_do_not_fit(tmp_path, overrides, message):
    env = cpu_devices_env(8)
    args = [sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml",
            "--set", f"run_folder={tmp_path}", "--set", "save_folder=null"]
    for override in overrides:
        args += ["--set", override]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == message


if __name__ == "__main__":
    print(json.dumps(_train_layouts()))

"""LoRA on quantized frozen weights (``model.quantize_frozen: int8 | nf4``).

The blocks' linear weights are kept as int8 with a float32 scale per output column, or as
QLoRA's NF4 codes with a scale per block of 64, quantized as they are loaded; the adapters train
on the float weights they stand for. Checked here: the rounding bound, NF4 against bitsandbytes,
that the backward pass keeps the quantized weights (not a float copy), that a run loads, trains,
resumes exactly and merges into a plain float model, and what the planner counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from jaxtrain.checkpoint.load import load_checkpoint, param_names
from jaxtrain.config import ConfigError, load_config_dict
from jaxtrain.convert.hf_mpt import read_hf
from jaxtrain.layers import lora, quant
from jaxtrain.layers.linear import Dense
from jaxtrain.plan.memory import estimate_memory
from jaxtrain.train.state import abstract_model
from conftest import REFERENCE_PYTHON
from test_lora import BASE, fit, run_config
from test_lora_checkpoints import leaves, saved_names


def test_int8_kernels_read_back_within_half_a_step():
    w = np.asarray(jax.random.normal(jax.random.key(0), (3, 64, 24)), np.float32) * np.linspace(0.01, 5, 24)
    w[1, :, 5] = 0.0  # a column of zeros
    w[2, 7, 3] = -40.0  # an outlier sets its column's step
    q, scale = quant.quantize(jnp.asarray(w))
    assert q.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == (3, 24)
    q, scale = np.asarray(q), np.asarray(scale)
    np.testing.assert_array_equal(np.abs(q).max(axis=1)[w.any(axis=1)], 127)  # each column uses the full range
    assert q[1, :, 5].tolist() == [0] * 64 and scale[1, 5] == 1.0
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1).clip(min=0) / 127 + (~w.any(axis=1)), rtol=1e-7)
    error = np.abs(np.asarray(quant.dequantize(q, scale)) - w)
    assert np.all(error <= scale[:, None, :] / 2 * (1 + 1e-6))
    assert quant.dequantize(q, scale, jnp.bfloat16).dtype == jnp.bfloat16


BNB_NF4 = """
import sys, numpy as np, torch, bitsandbytes.functional as F
w = np.load(sys.argv[1])  # [in, out], jaxtrain's layout; torch's Linear weight is its transpose
q, state = F.quantize_4bit(torch.from_numpy(np.ascontiguousarray(w.T)), blocksize=64, quant_type="nf4")
np.savez(sys.argv[2], packed=q.numpy().reshape(w.shape[1], -1).T, absmax=state.absmax.numpy().reshape(w.shape[1], -1).T,
         dequantized=F.dequantize_4bit(q, state).numpy().T)
"""


def test_nf4_codes_scales_and_values_are_bitsandbytes(tmp_path):
    """``quantize(w, "nf4")`` gives bitsandbytes' ``quantize_4bit(quant_type="nf4", blocksize=64)``
    bit for bit: the packed codes, the block scales and the values read back (a block of zeros too)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((192, 24)) * np.linspace(0.01, 3, 24)).astype(np.float32)
    w[64:128, 5] = 0.0
    w[3, 7] = 30.0  # an outlier coarsens its own block only
    q, scale = quant.quantize(jnp.asarray(w), "nf4")
    assert (q.dtype, q.shape, scale.shape) == (jnp.uint8, (96, 24), (3, 24))
    back = np.asarray(quant.dequantize(q, scale))
    assert back[64:128, 5].tolist() == [0.0] * 64 and np.asarray(scale)[1, 5] == 0.0
    levels = np.asarray(quant.NF4_LEVELS, np.float32)
    for block in range(3):  # each value is the level nearest to it, times its block's scale
        rows = slice(64 * block, 64 * block + 64)
        normalized = w[rows] / np.where(np.abs(w[rows]).max(0) > 0, np.abs(w[rows]).max(0), 1)
        nearest = levels[np.abs(normalized[..., None] - levels).argmin(-1)]
        np.testing.assert_allclose(back[rows], nearest * np.abs(w[rows]).max(0), rtol=1e-6)
    # quantizing takes a small fraction of the float kernel in temporaries (a layer of MPT-70B
    # drawn and quantized on its device must not hold copies of it)
    kernel = jax.ShapeDtypeStruct((1024, 512), jnp.float32)
    memory = jax.jit(lambda w: quant.quantize(w, "nf4")).lower(kernel).compile().memory_analysis()
    assert memory.temp_size_in_bytes < 1024 * 512 * 4 / 8
    if not shutil.which(REFERENCE_PYTHON) or subprocess.run(
            [REFERENCE_PYTHON, "-c", "import bitsandbytes"], capture_output=True).returncode:
        pytest.skip(f"bitsandbytes is not installed in {REFERENCE_PYTHON} (built by .ci/reference-env)")
    np.save(tmp_path / "w.npy", w)
    subprocess.run([REFERENCE_PYTHON, "-c", BNB_NF4, str(tmp_path / "w.npy"), str(tmp_path / "ref.npz")], check=True,
                   capture_output=True)
    ref = np.load(tmp_path / "ref.npz")
    np.testing.assert_array_equal(np.asarray(q), ref["packed"])
    np.testing.assert_array_equal(np.asarray(scale), ref["absmax"])
    np.testing.assert_array_equal(back, ref["dequantized"])


def test_the_backward_pass_keeps_the_quantized_weights_not_a_float_copy():
    """The kernel is read back inside a rematerialised function: what the forward pass leaves for
    the backward pass is ``q`` and its scales, not the ``[in, out]`` float kernel."""
    spec = lora.LoraSpec(r=2, scaling=1.0, dropout=0.0)
    for quantize in (None, "int8", "nf4"):
        layer = Dense(64, 48, use_bias=True, kernel_std=0.02, axes=(None, None), rngs=nnx.Rngs(0), lora=spec,
                      quantize=quantize)
        graph, adapters, rest = nnx.split(layer, nnx.LoRAParam, ...)

        def loss(adapters, x):
            return nnx.merge(graph, adapters, rest)(x, compute_dtype=jnp.bfloat16).astype(jnp.float32).sum()

        kept = [(aval.shape, str(aval.dtype)) for aval, _ in saved_residuals(loss, adapters, jnp.ones((4, 64),
                                                                                                     jnp.bfloat16))]
        floats = [shape for shape, dtype in kept if shape == (64, 48) and dtype != "int8"]
        if quantize == "int8":
            assert ((64, 48), "int8") in kept and ((48,), "float32") in kept and not floats
        elif quantize == "nf4":
            assert ((32, 48), "uint8") in kept and ((1, 48), "float32") in kept and not floats
        else:
            assert floats  # without quantization the (frozen) kernel itself is what is kept


@pytest.mark.parametrize("kind,dora,dropout", [("int8", False, 0.0), ("int8", True, 0.0), ("int8", True, 0.5),
                                               ("nf4", False, 0.0), ("nf4", True, 0.5)])
def test_a_quantized_layer_computes_what_its_float_layer_computes_on_the_weights_read_back(kind, dora, dropout):
    """LoRA and DoRA (with and without dropout's second product), with a bias: the quantized
    layer's output and adapter gradients are the float layer's whose kernel is the one read back."""
    spec = lora.LoraSpec(r=3, scaling=2.0, dropout=dropout, dora=dora)
    make = lambda quantize: Dense(32, 24, use_bias=True, kernel_std=0.3, axes=(None, None), rngs=nnx.Rngs(1),
                                  lora=spec, quantize=quantize)  # noqa: E731
    ours, theirs = make(kind), make(None)
    theirs.kernel[...] = ours.weight()
    # trained adapters, so that B and the magnitudes are not their starting values
    ours.lora_b[...] = theirs.lora_b[...] = jax.random.normal(jax.random.key(2), ours.lora_b[...].shape) * 0.1
    if dora:
        ours.lora_magnitude[...] = theirs.lora_magnitude[...] = ours.lora_magnitude[...] * 1.1
    x = jax.random.normal(jax.random.key(3), (2, 5, 32))
    rng = jax.random.key(4) if dropout else None

    def run(layer):
        graph, adapters, rest = nnx.split(layer, nnx.LoRAParam, ...)
        loss = lambda a: (nnx.merge(graph, a, rest)(x, lora_rng=rng) ** 2).sum()  # noqa: E731
        return jax.value_and_grad(loss)(adapters)

    (ours_loss, ours_grads), (theirs_loss, theirs_grads) = run(ours), run(theirs)
    np.testing.assert_allclose(ours_loss, theirs_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(theirs_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _quantized(cfg, kind="int8"):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantize_frozen=kind))


def _losses(run_folder) -> list[float]:
    records = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


def test_lora_on_quantized_weights_loads_trains_resumes_and_merges(tmp_path, monkeypatch):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    for name in ("float", "int8", "full", "nf4"):
        (tmp_path / name).mkdir()
    plain = run_config(tmp_path / "float", base)
    small = _quantized(run_config(tmp_path / "int8", base))
    full = _quantized(run_config(tmp_path / "full", base, save_frozen_weights=True))
    _, reference, _, _ = fit(plain)
    _, trainer, _, printed = fit(small)
    from jaxtrain.train.command import _adapters  # what the command's "model:" line says of the run

    assert _adapters(small).endswith("(rank 4; frozen weights in int8)")

    # the frozen kernels are the Hugging Face weights quantized, bit for bit; the rest as loaded
    params = trainer.state.params
    kernels = {name: leaf for name, leaf in param_names(params).items() if name.endswith(".kernel")}
    assert {str(leaf.dtype) for name, leaf in kernels.items() if name.startswith("blocks.")} == {"int8"}
    hf = read_hf(str(base))[1]
    for module in ("Wqkv", "out_proj"):
        q, scale = quant.quantize(hf["blocks"]["attn"][module]["kernel"])
        layer = nnx.to_pure_dict(params)["blocks"]["attn"][module]
        np.testing.assert_array_equal(np.asarray(layer["kernel"]), np.asarray(q))
        np.testing.assert_array_equal(np.asarray(layer[quant.SCALE]), np.asarray(scale))
    assert str(param_names(params)["wte.embedding"].dtype) == "float32"  # fp32 run: the rest as it was

    # training on q·scale follows training on the float weights closely, and learns
    ours, theirs = _losses(tmp_path / "int8" / "run"), _losses(tmp_path / "float" / "run")
    assert len(ours) == 6 and ours[-1] < ours[0]
    np.testing.assert_allclose(ours, theirs, rtol=2e-2)
    assert ours != theirs
    # so does training on NF4 codes, less closely (16 levels per block of 32 rows in this model)
    _, four, _, _ = fit(_quantized(run_config(tmp_path / "nf4", base, save_folder=None), "nf4"))
    layer = nnx.to_pure_dict(four.state.params)["blocks"]["ffn"]["up_proj"]
    q, scale = quant.quantize(hf["blocks"]["ffn"]["up_proj"]["kernel"], "nf4")
    np.testing.assert_array_equal(np.asarray(layer["kernel"]), np.asarray(q))
    np.testing.assert_array_equal(np.asarray(layer[quant.SCALE]), np.asarray(scale))
    nf4 = _losses(tmp_path / "nf4" / "run")
    assert nf4[-1] < nf4[0]
    np.testing.assert_allclose(nf4, theirs, rtol=5e-2)

    # checkpoints hold the adapters alone; a resume reads and quantizes the weights again, exactly
    checkpoints = tmp_path / "int8" / "checkpoints"
    assert all(name.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for name in saved_names(checkpoints, 6))
    shutil.rmtree(checkpoints / "6")
    _, again, _, printed = fit(small)
    assert "resumed from" in printed and "at step 3 (the frozen weights read back from" in printed
    for a, b in zip(leaves(again.state.params), leaves(trainer.state.params)):
        np.testing.assert_array_equal(a, b)

    # with save_frozen_weights the checkpoint holds the int8 kernels and scales themselves
    _, kept, _, _ = fit(full)
    names = saved_names(tmp_path / "full" / "checkpoints", 6)
    assert "blocks.attn.Wqkv.kernel_scale" in names
    from_record = load_checkpoint(str(checkpoints))
    from_itself = load_checkpoint(str(tmp_path / "full" / "checkpoints"))
    assert quant.is_quantized(from_record.params) and quant.is_quantized(from_itself.params)
    for a, b in zip(leaves(from_record.params), leaves(from_itself.params)):
        np.testing.assert_array_equal(a, b)

    # generate and eval run the quantized model as it is (merging would make it the float model);
    # generation works on it
    assert from_record.merged() is from_record
    from jaxtrain.inference.cli import main as generate_main

    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert generate_main(["--checkpoint", str(checkpoints), "--prompt", "ab", "--max-new-tokens", "3"]) == 0
    assert out.getvalue().strip()
    # merged (what convert exports): a float model without adapters or scales, giving the logits of
    # the adapted int8 model
    merged = dataclasses.replace(from_record, params=lora.merge_adapters(from_record.params, from_record.model_cfg),
                                 model_cfg=lora.without_adapters(from_record.model_cfg))
    assert merged.model_cfg.quantize_frozen is None and merged.model_cfg.peft_config is None
    assert not quant.is_quantized(merged.params) and not lora.has_adapters(merged.params)
    tokens = jnp.asarray([[1, 5, 9, 2, 7, 3]])
    np.testing.assert_allclose(np.asarray(merged.module()(tokens)), np.asarray(from_record.module()(tokens)),
                               atol=1e-4, rtol=0)

    # a full fine-tune may start from it: the adapters merged, the kernels float32 again
    follow = dataclasses.replace(plain, model=lora.without_adapters(plain.model), load_path=str(checkpoints),
                                 save_folder=str(tmp_path / "follow" / "ckpt"), run_folder=str(tmp_path / "follow" / "run"),
                                 max_duration="1ba", autoresume=False)
    _, follower, _, printed = fit(follow)
    assert "with their LoRA adapters merged into them" in printed
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(follower.state.params)} == {"float32"}

    # and NF4 LoRA may start from that float checkpoint: each kernel read alone and quantized
    again = _quantized(dataclasses.replace(small, load_path=str(tmp_path / "follow" / "ckpt"), max_duration="1ba",
                                           save_folder=None, run_folder=str(tmp_path / "again")), "nf4")
    quantized_shapes = []
    original = quant.quantize_array
    monkeypatch.setattr(quant, "quantize_array", lambda value, kernel, scale: (
        quantized_shapes.append(value.shape) or original(value, kernel, scale)))
    _, adapted, _, _ = fit(again)
    # each stacked kernel read alone (into host memory) and quantized one layer at a time: the
    # devices never hold more than one layer's float kernel
    assert again.model.scan_layers
    assert len(quantized_shapes) == 4 * again.model.n_layers  # Wqkv, out_proj, up_proj, down_proj
    assert all(len(shape) == 2 for shape in quantized_shapes)
    float_weights = nnx.to_pure_dict(load_checkpoint(str(tmp_path / "follow" / "ckpt")).params)["blocks"]["ffn"]
    layer = nnx.to_pure_dict(adapted.state.params)["blocks"]["ffn"]["down_proj"]
    q, scale = quant.quantize(float_weights["down_proj"]["kernel"], "nf4")
    np.testing.assert_array_equal(np.asarray(layer["kernel"]), np.asarray(q))
    np.testing.assert_array_equal(np.asarray(layer[quant.SCALE]), np.asarray(scale))

    # an NF4 LoRA run may go on from the float LoRA run's checkpoint (adapters only): its adapters
    # taken, its frozen weights read through its record and quantized as read, a layer at a time
    onward = _quantized(dataclasses.replace(plain, load_path=str(tmp_path / "float" / "checkpoints"),
                                            max_duration="1ba", save_folder=None,
                                            run_folder=str(tmp_path / "onward")), "nf4")
    quantized_shapes.clear()
    _, onward_trainer, _, printed = fit(onward)
    assert "with their LoRA adapters;" in printed
    assert quantized_shapes and all(len(shape) == 2 for shape in quantized_shapes)
    layer = nnx.to_pure_dict(onward_trainer.state.params)["blocks"]["ffn"]["up_proj"]
    q, scale = quant.quantize(hf["blocks"]["ffn"]["up_proj"]["kernel"], "nf4")
    np.testing.assert_array_equal(np.asarray(layer["kernel"]), np.asarray(q))
    np.testing.assert_array_equal(np.asarray(layer[quant.SCALE]), np.asarray(scale))


def test_quantize_frozen_needs_a_lora_run_and_a_known_format():
    model = dataclasses.asdict(read_hf(str(BASE))[0])
    for extra, expected in (({"quantize_frozen": "int8"}, "model.quantize_frozen: only a LoRA run (model.peft_config)"),
                            ({"quantize_frozen": "int4", "peft_config": {"r": 2}},
                             "model.quantize_frozen: 'int4' is not supported; use int8, nf4 or null"),
                            ({"quantize_frozen": "nf4", "peft_config": {"r": 2}, "d_model": 33, "n_heads": 3},
                             "model.quantize_frozen: nf4 packs two input rows to a byte: d_model 33")):
        with pytest.raises(ConfigError) as err:
            load_config_dict({"model": {**model, **extra}, "max_seq_len": 16})
        assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_hugging_face_folder_stored_quantized_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "bnb"
    shutil.copytree(BASE, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as err:
        read_hf(str(folder))
    message = str(err.value)
    assert "\n" not in message and str(folder / "config.json") in message
    assert "quantization_config (bitsandbytes): its weights are stored quantized" in message
    assert "model.quantize_frozen" in message


def test_the_planner_counts_quantized_weights_and_their_scales():
    """The estimate's parameter bytes are the parameter tree's: int8 or packed nf4 kernels, float32
    scales and adapters, the rest (embedding, norms) in the compute dtype."""
    model = dataclasses.replace(read_hf(str(BASE))[0], peft_config=load_config_dict(
        {"model": {"peft_config": {"r": 4, "target_modules": "all-linear"}}}).model.peft_config)
    common = dict(global_batch=2, microbatch=2, seq_len=16, precision="amp_bf16", mesh_shape={"data": 1})
    estimates = {}
    for quantize in (None, "int8", "nf4"):
        cfg = dataclasses.replace(model, quantize_frozen=quantize)
        names = param_names(abstract_model(cfg)[1])
        # adapters and scales float32, kernels a byte per int8 or per two nf4 codes, the rest bf16
        # (as lora.cast_frozen keeps them)
        exact = sum(leaf.size * (4 if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b", quant.SCALE) else
                                 1 if leaf.dtype in (jnp.int8, jnp.uint8) else 2) for name, leaf in names.items())
        estimates[quantize] = estimate_memory(cfg, **common).params_bytes
        assert estimates[quantize] == exact, quantize
    assert estimates["nf4"] < estimates["int8"] < estimates[None]


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_a_lora_model_to_load_is_built_without_float_temporaries(quantize):
    """With load_path the frozen weights are replaced right after the state is built, so its
    linear layers start as zeros (quantized: the codes of zeros) instead of drawn: the program
    that builds the state holds no float copies of the stacked kernels (drawing and quantizing
    them takes 25 GiB of temporaries for MPT-7B in bf16 and 6.8 GiB in nf4)."""
    import optax

    from jaxtrain.config.schema import ModelConfig
    from jaxtrain.parallel.logical import DEFAULT_RULES
    from jaxtrain.parallel.mesh import build_mesh
    from jaxtrain.config.schema import ParallelismConfig
    from jaxtrain.train import state as train_state

    peft = load_config_dict({"model": {"peft_config": {"r": 4, "target_modules": "all-linear"}}}).model.peft_config
    cfg = ModelConfig(d_model=512, n_heads=8, n_layers=4, vocab_size=1024, max_seq_len=64, peft_config=peft,
                      quantize_frozen=quantize)
    mesh = build_mesh(ParallelismConfig(data=1))
    temps, params = {}, {}
    for loaded in (False, True):
        init, shardings, _ = train_state._state_plan(cfg, optax.adamw(1e-3), mesh, DEFAULT_RULES, 100,
                                                     frozen_dtype=jnp.bfloat16, weights_loaded=loaded)
        temps[loaded] = jax.jit(init, out_shardings=shardings).lower(jax.random.key(0)).compile(
            ).memory_analysis().temp_size_in_bytes
        params[loaded] = jax.eval_shape(init, jax.random.key(0)).params
    kernels = 4 * (512 * 1536 + 512 * 512 + 2 * 512 * 2048) * 2  # the blocks' kernels in bf16
    # drawn: more than the kernels' bf16 size (float32 draws, one layer at a time; quantized, the
    # codes and scales made from them too); as placeholders, less than half of it (the embedding's
    # draw, the adapters')
    assert temps[True] < kernels / 2 < kernels < temps[False]
    # the same parameters, dtypes and shardings either way
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params[True]) == jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                                    params[False])
    # the adapters are drawn as before: A from the kernels' keys, B zero
    built = {loaded: jax.jit(train_state._state_plan(cfg, optax.adamw(1e-3), mesh, DEFAULT_RULES, 100,
                                                     frozen_dtype=jnp.bfloat16, weights_loaded=loaded)[0])(
        jax.random.key(0)).params for loaded in (False, True)}
    for a, b in zip(jax.tree.leaves(lora.split_trainable(built[True])[0]),
                    jax.tree.leaves(lora.split_trainable(built[False])[0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    frozen = lora.split_trainable(built[True])[1]
    read_back = quant.dequantized(frozen, jnp.float32) if quantize else frozen
    kernel = nnx.to_pure_dict(read_back)["blocks"]["ffn"]["up_proj"]["kernel"]
    assert not np.asarray(kernel, np.float32).any()  # zeros, read back as zeros


def test_a_kernel_to_quantize_is_read_into_host_memory_as_it_was_saved(tmp_path):
    """The whole stacked kernel a checkpoint's float weights are quantized from is read into host
    memory in the dtype it was saved in (bf16: half the memory of its float32 values); each layer
    is made float32 only as it is quantized."""
    import orbax.checkpoint as ocp

    from jaxtrain.checkpoint import orbax_reads

    kernel = jnp.arange(2 * 4 * 6, dtype=jnp.float32).reshape(2, 4, 6).astype(jnp.bfloat16) / 7
    with ocp.CheckpointManager(str(tmp_path)) as manager:
        manager.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave({"params": {"kernel": kernel}})))
        manager.wait_until_finished()
    with contextlib.closing(orbax_reads.read_only_manager(str(tmp_path))) as manager:
        like = {"params": {"kernel": jax.ShapeDtypeStruct(kernel.shape, jnp.float32)}}
        host = orbax_reads.restore_state(manager, 1, like, ConfigError, to_host=True)["params"]["kernel"]
    assert isinstance(host, np.ndarray) and host.dtype == jnp.bfloat16
    np.testing.assert_array_equal(host.astype(np.float32), np.asarray(kernel, np.float32))


def test_a_kernel_quantized_as_it_is_read_is_checked_against_its_checksum(tmp_path):
    """The float kernels a LoRA run quantizes are read into host memory one at a time, apart from
    the other weights; their checksums are checked there too: a number changed on disk is one line
    naming the array, not quantized weights that differ from what was trained."""
    from jaxtrain.config.schema import ModelConfig
    from jaxtrain.convert import save_model
    from jaxtrain.models import build_model
    from test_resume_checks import change_one_number

    cfg = ModelConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=64, max_seq_len=16)
    save_model(str(tmp_path / "ck"), cfg, nnx.to_pure_dict(nnx.state(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param)),
               step=1)
    peft = load_config_dict({"model": {"peft_config": {"r": 4, "target_modules": "all-linear"}}}).model.peft_config
    _, abstract = abstract_model(dataclasses.replace(cfg, peft_config=peft, quantize_frozen="nf4"))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        lora.split_trainable(abstract)[1])  # the frozen weights, as a LoRA run reads them
    assert quant.is_quantized(like)
    intact = load_checkpoint(str(tmp_path / "ck"), like=like).params
    name = change_one_number(tmp_path / "ck" / "1")
    assert name.endswith("Wqkv.kernel")
    with pytest.raises(ConfigError) as err:
        load_checkpoint(str(tmp_path / "ck"), like=like)
    assert f"array {name} does not match the checksum saved with it" in str(err.value)
    assert "\n" not in str(err.value)
    assert param_names(intact)  # the intact checkpoint was read

"""LoRA fine-tuning (``model.peft_config``) against Hugging Face PEFT.

The reference is PEFT 0.21 itself on transformers' MptForCausalLM: ``tests/fixtures/lora`` holds
two PEFT adapters for the tiny model ``tests/fixtures/hf_mpt/mha`` (plain and rank-stabilised) and
what PEFT computed with them
(logits, the loss's gradients of the adapters, the merged weights); ``make_reference.py`` there
rebuilds them. ``check_export.py`` loads jaxtrain's exports with PEFT and transformers live when
the reference environment (.venv-ref) has PEFT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxtrain.checkpoint.load import load_checkpoint
from jaxtrain.config import ConfigError, ParallelismConfig, load_config_dict
from jaxtrain.config.schema import PeftConfig
from jaxtrain.convert.cli import main as convert_main
from jaxtrain.convert.hf_mpt import export_hf, read_hf
from jaxtrain.convert.peft_lora import tensor_name
from jaxtrain.layers import lora
from jaxtrain.layers.linear import Dense
from jaxtrain.models import build_model
from jaxtrain.parallel.logical import DEFAULT_RULES
from jaxtrain.parallel.mesh import batch_sharding, build_mesh
from jaxtrain.train.loop import Trainer
from jaxtrain.train.loss import batch_targets
from jaxtrain.train.setup import build_run
from jaxtrain.train.state import abstract_model, count_params, create_train_state, trainable_params
from jaxtrain.train.step import compile_train_step, make_train_step
from conftest import REFERENCE_PYTHON

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "lora"
BASE = ROOT / "tests" / "fixtures" / "hf_mpt" / "mha"
REF = load_file(str(FIXTURE / "reference.safetensors"))
CASES = {"adapter": "lora_logits", "adapter_rslora": "rslora_logits", "adapter_patterns": "patterns_logits",
         "adapter_dora": "dora_logits"}


def imported(tmp_path: Path, case: str = "adapter", *, scan_layers: bool = True):
    """The fixture's base model with a PEFT adapter, converted into a jaxtrain checkpoint and read back."""
    folder = tmp_path / f"{case}-{scan_layers}"
    argv = [str(BASE), str(folder), "--adapter", str(FIXTURE / case)] + ([] if scan_layers else ["--no-scan-layers"])
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert convert_main(argv) == 0
    assert "LoRA adapters of rank 4" in out.getvalue()
    return folder, load_checkpoint(str(folder))


@pytest.mark.parametrize("case,scan_layers", [("adapter", True), ("adapter_rslora", True), ("adapter", False),
                                             ("adapter_patterns", True), ("adapter_dora", True),
                                             ("adapter_dora", False)])
def test_adapters_give_the_logits_peft_gives(tmp_path, case, scan_layers):
    _, loaded = imported(tmp_path, case, scan_layers=scan_layers)
    logits = loaded.module()(jnp.asarray(REF["input_ids"]))
    np.testing.assert_allclose(np.asarray(logits), REF[CASES[case]], atol=2e-5, rtol=0)
    merged = loaded.merged()  # what generate and eval run: the adapters merged into the weights
    assert merged.model_cfg.peft_config is None and not lora.has_adapters(merged.params)
    np.testing.assert_allclose(np.asarray(merged.module()(jnp.asarray(REF["input_ids"]))), REF[CASES[case]], atol=2e-5)
    # the adapters matter: without them the logits are the base model's
    merged_away = nnx.merge(abstract_model(lora.without_adapters(loaded.model_cfg))[0],
                            lora.split_trainable(loaded.params)[1])
    np.testing.assert_allclose(np.asarray(merged_away(jnp.asarray(REF["input_ids"]))), REF["base_logits"], atol=2e-5)


def test_ranks_and_alphas_per_layer_are_pefts_and_export_as_they_came(tmp_path):
    """rank_pattern and alpha_pattern: each layer's rank and scale as PEFT gives them (the logits are
    checked above); the adapter exports bit for bit with the same patterns."""
    folder, loaded = imported(tmp_path, "adapter_patterns")
    cfg = loaded.model_cfg
    assert {name: (lora.module_rank(cfg, name), lora.module_scaling(cfg, name)) for name in lora.targeted_modules(cfg)} \
        == {"Wqkv": (2, 4.0), "up_proj": (4, 4.0), "down_proj": (6, 8 / 6)}
    assert lora.adapter_param_count(cfg) == 2 * (2 * (32 + 96) + 4 * (32 + 128) + 6 * (128 + 32))
    with contextlib.redirect_stdout(io.StringIO()):
        assert convert_main([str(folder), str(tmp_path / "peft"), "--to", "peft"]) == 0
    ours, theirs = (load_file(str(path / "adapter_model.safetensors"))
                    for path in (tmp_path / "peft", FIXTURE / "adapter_patterns"))
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"Wqkv": 2, r"ffn\.down_proj": 6} and config["alpha_pattern"] == {"up_proj": 16}


@pytest.mark.parametrize("case,prefix", [("adapter", ""), ("adapter_dora", "dora_")])
def test_the_loss_and_its_adapter_gradients_are_pefts(tmp_path, case, prefix):
    """The loss and the gradient of every adapter tensor (DoRA's magnitudes too) equal PEFT's."""
    _, loaded = imported(tmp_path, case)
    graphdef, _ = abstract_model(loaded.model_cfg)
    adapters, frozen = lora.split_trainable(loaded.params)
    ids = jnp.asarray(REF["input_ids"])

    def loss(adapters):
        model = nnx.merge(graphdef, lora.merge_trainable(adapters, frozen))
        loss_sum, _, count = model.lm_loss(ids, batch_targets({"input_ids": ids}))
        return loss_sum / count

    value, grads = jax.value_and_grad(loss)(adapters)
    np.testing.assert_allclose(float(value), float(REF[f"{prefix}loss"]), rtol=1e-6)
    grads = nnx.to_pure_dict(grads)
    compared = 0
    tensors = [("A", "lora_a"), ("B", "lora_b")] + ([("magnitude", "lora_magnitude")] if prefix else [])
    for block in range(2):
        for module in lora.targeted_modules(loaded.model_cfg):
            part = "attn" if module in lora.ATTENTION_MODULES else "ffn"
            for which, key in tensors:
                ours = np.asarray(grads["blocks"][part][module][key][block]).T
                expected = REF[f"{prefix}grad/{tensor_name(block, module, which)}"]
                np.testing.assert_allclose(ours, expected, atol=2e-6, rtol=1e-4)
                compared += 1
    assert compared == 8 * len(tensors)


@pytest.mark.parametrize("case,prefix", [("adapter", ""), ("adapter_dora", "dora_")])
def test_exports_are_pefts_adapter_and_merged_model(tmp_path, case, prefix):
    folder, _ = imported(tmp_path, case)
    with contextlib.redirect_stdout(io.StringIO()):
        assert convert_main([str(folder), str(tmp_path / "peft"), "--to", "peft"]) == 0
    export_hf(str(folder), str(tmp_path / "hf"))
    # the adapter round-trips bit for bit, and the merged weights are PEFT's merge_and_unload
    ours, theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), load_file(
        str(FIXTURE / case / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and sorted(config["target_modules"]) == [
        "Wqkv", "down_proj", "out_proj", "up_proj"] and config["use_dora"] == bool(prefix)
    merged = load_file(str(tmp_path / "hf" / "model.safetensors"))
    compared = 0
    for key, value in REF.items():
        if key.startswith(f"{prefix}merged/"):
            np.testing.assert_allclose(merged[key.removeprefix(f"{prefix}merged/")], value, atol=1e-6)
            compared += 1
    assert compared == 8
    assert not any("lora" in name for name in merged)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "peft_config" not in json.dumps(hf_config)
    if not Path(REFERENCE_PYTHON).exists():
        pytest.skip("the live PEFT check needs .venv-ref; jaxtrain's half passed")
    run = subprocess.run(
        [REFERENCE_PYTHON, str(FIXTURE / "check_export.py"), "--base", str(BASE), "--input-ids",
         json.dumps(REF["input_ids"].tolist()), "--adapter", str(tmp_path / "peft"), "--merged", str(tmp_path / "hf")],
        capture_output=True, text=True, timeout=300)
    if run.returncode != 0 and "No module named 'peft'" in run.stderr:
        pytest.skip("the live PEFT check needs peft in .venv-ref; jaxtrain's half passed")
    assert run.returncode == 0, run.stderr[-2000:]
    live = json.loads(run.stdout)
    np.testing.assert_allclose(live["adapter_logits"], REF[CASES[case]], atol=1e-5)
    np.testing.assert_allclose(live["merged_logits"], REF[CASES[case]], atol=1e-5)


def tiny(**peft) -> object:
    cfg = load_config_dict({"model": {"d_model": 32, "n_heads": 4, "n_layers": 2, "vocab_size": 64, "max_seq_len": 16,
                                      "no_bias": True, "attn_config": {"alibi": True},
                                      "peft_config": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **peft}},
                            "max_seq_len": 16})
    return cfg.model


def test_only_the_adapters_train_and_the_optimizer_keeps_nothing_else():
    model_cfg = tiny()
    mesh = build_mesh(ParallelismConfig())
    tx = optax.adamw(1e-2, weight_decay=0.1)
    state, model_def, shardings = create_train_state(model_cfg, tx, seed=0, mesh=mesh, rules=DEFAULT_RULES)
    adapters, frozen = lora.split_trainable(state.params)
    # the base weights are the model's without adapters, drawn from the same seed
    plain, _, _ = create_train_state(lora.without_adapters(model_cfg), tx, seed=0, mesh=mesh, rules=DEFAULT_RULES)
    for ours, theirs in zip(jax.tree.leaves(frozen), jax.tree.leaves(plain.params)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * count_params(adapters) == 2 * count_params(trainable_params(state.params))
    frozen_before = [np.asarray(x) for x in jax.tree.leaves(frozen)]
    adapters_before = [np.asarray(x) for x in jax.tree.leaves(adapters)]
    step = compile_train_step(make_train_step(model_def, tx, lambda count: jnp.asarray(1e-2)), shardings,
                              batch_sharding(mesh))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(3):
        batch = {"input_ids": jnp.asarray(rng.integers(0, 64, size=(4, 16), dtype=np.int32))}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    adapters, frozen = lora.split_trainable(state.params)
    for before, after in zip(frozen_before, jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(before, np.asarray(after))
    assert all(not np.array_equal(before, np.asarray(after))
               for before, after in zip(adapters_before, jax.tree.leaves(adapters)))
    assert all(np.isfinite(losses))


def test_adapter_dropout_draws_from_its_key_and_is_off_without_one():
    spec = lora.LoraSpec(r=4, scaling=2.0, dropout=0.5)
    layer = Dense(32, 16, use_bias=False, kernel_std=0.1, axes=("embed", "mlp"), rngs=nnx.Rngs(0), lora=spec)
    layer.lora_b = nnx.LoRAParam(jnp.ones((4, 16)))  # so the adapter's term shows
    x = jnp.ones((2, 3, 32))
    plain = layer.adapter(x)
    np.testing.assert_allclose(plain, 2.0 * (x @ layer.lora_a[...]) @ layer.lora_b[...], rtol=1e-6)
    first, second = layer.adapter(x, lora_rng=jax.random.key(1)), layer.adapter(x, lora_rng=jax.random.key(2))
    assert not np.allclose(first, plain) and not np.allclose(first, second)
    np.testing.assert_array_equal(first, layer.adapter(x, lora_rng=jax.random.key(1)))
    np.testing.assert_allclose(layer(x), x @ layer.kernel[...] + plain, rtol=1e-6)


def test_dora_with_dropout_applies_it_to_both_of_its_products_as_peft_does():
    """PEFT's DoRA in training with dropout: y = x·W + (g - 1)·(x'·W) + g·s·(x'·A)·B, x' = dropout(x),
    g = m / ||W + s·A·B|| per column (the dropped input's extra product instead of reusing x·W)."""
    from jaxtrain.layers.dropout import dropout

    spec = lora.LoraSpec(r=4, scaling=2.0, dropout=0.5, dora=True)
    layer = Dense(32, 16, use_bias=True, kernel_std=0.1, axes=("embed", "mlp"), rngs=nnx.Rngs(0), lora=spec)
    layer.lora_b = nnx.LoRAParam(0.1 * jax.random.normal(jax.random.key(3), (4, 16)))
    layer.bias = nnx.Param(jnp.full((16,), 0.3))
    x = jax.random.normal(jax.random.key(4), (2, 3, 32))
    w, a, b, m = (np.asarray(v[...], np.float64) for v in (layer.kernel, layer.lora_a, layer.lora_b, layer.lora_magnitude))
    np.testing.assert_allclose(m, np.linalg.norm(w, axis=0), rtol=1e-6)  # it starts at W's column norms
    layer.lora_magnitude = nnx.LoRAParam(jnp.asarray(m * 1.3, jnp.float32))
    g = 1.3 * m / np.linalg.norm(w + 2.0 * a @ b, axis=0)
    dropped = np.asarray(dropout(x, 0.5, jax.random.key(5)), np.float64)
    xs = np.asarray(x, np.float64)
    expected = xs @ w + 0.3 + (g - 1) * (dropped @ w) + g * 2.0 * ((dropped @ a) @ b)
    np.testing.assert_allclose(layer(x, lora_rng=jax.random.key(5)), expected, rtol=2e-5, atol=2e-6)
    no_dropout = g * (xs @ w + 2.0 * (xs @ a) @ b) + 0.3  # without it, (g - 1)·x·W + x·W = g·x·W
    np.testing.assert_allclose(layer(x), no_dropout, rtol=2e-5, atol=2e-6)


def run_config(tmp_path: Path, base: Path, **run):
    from test_finetune import char_tokenizer, write_lines

    data = write_lines(tmp_path / "ft.jsonl", [{"prompt": p, "response": r} for p, r in
                                               [("ab", "cd"), ("efg", "h"), ("abc", "defg"), ("k", "lm")] * 4])
    char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    model = dataclasses.asdict(read_hf(str(base))[0])
    model["peft_config"] = {"r": 4, "lora_alpha": 8, "target_modules": ["Wqkv", "up_proj"]}
    return load_config_dict({
        "max_seq_len": 16, "global_train_batch_size": 4, "device_train_microbatch_size": 4, "precision": "fp32",
        "model": model, "tokenizer": {"name": str(tmp_path / "tokenizer.json")}, "load_path": str(base),
        "train_loader": {"dataset": {"source": "finetune_jsonl", "local": str(data), "shuffle": False}},
        "run_folder": str(tmp_path / "run"), "max_duration": "6ba", "eval_interval": 0, "progress_bar": False,
        "log_to_console": False, "optimizer": {"lr": 3e-2}, "scheduler": {"t_warmup": "0ba"},
        "save_folder": str(tmp_path / "checkpoints"), "save_interval": "3ba", "autoresume": True, **run,
    })


def fit(cfg, parts=None):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        parts = parts or build_run(cfg)
        trainer = Trainer(parts)
        try:
            result = trainer.fit()
        finally:
            parts.train_loader.close()
    return parts, trainer, result, out.getvalue()


def test_lora_run_adapts_a_model_resumes_exactly_and_merges_into_a_plain_one(tmp_path):
    """load_path is the Hugging Face folder itself; its weights stay as they were, bit for bit. The
    run keeps a moving average of the adapters, which its checkpoints are read with."""
    cfg = run_config(tmp_path, BASE, algorithms={"ema": {"smoothing": 0.5}})
    parts, trainer, result, printed = fit(cfg)
    trained = [np.asarray(x) for x in jax.tree.leaves(lora.split_trainable(trainer.state.params)[0])]
    average = [np.asarray(x) for x in jax.tree.leaves(trainer.state.ema)]
    assert len(average) == len(trained) and not all(np.array_equal(a, t) for a, t in zip(average, trained))
    assert "LoRA adapters train on them" in printed
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    moments = sum(x.size for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim > 0)
    assert moments == 2 * count_params(trainable_params(trainer.state.params))
    # the frozen weights are the loaded model's, bit for bit
    saved = load_checkpoint(str(tmp_path / "checkpoints"))
    adapters, frozen = lora.split_trainable(saved.params)
    assert saved.averaged
    for ours, theirs in zip(jax.tree.leaves(adapters), average):  # read with the average of the adapters
        np.testing.assert_array_equal(np.asarray(ours), theirs)
    _, hf_weights, _ = read_hf(str(BASE))
    for ours, theirs in zip(jax.tree.leaves(nnx.to_pure_dict(frozen)), jax.tree.leaves(hf_weights)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    # its PEFT export names that folder as the model the adapters apply to
    export_hf(str(tmp_path / "checkpoints"), str(tmp_path / "peft"), adapter_only=True)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(BASE) and config["target_modules"] == ["Wqkv", "up_proj"]
    # killed after its last save but one: the resumed run ends with the same adapters
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "6")
    _, again, _, printed = fit(cfg, parts)
    assert "resumed from" in printed
    for ours, theirs in zip(jax.tree.leaves(lora.split_trainable(again.state.params)[0]), trained):
        np.testing.assert_array_equal(np.asarray(ours), theirs)
    for ours, theirs in zip(jax.tree.leaves(again.state.ema), average):
        np.testing.assert_array_equal(np.asarray(ours), theirs)
    # a model without adapters starting from this checkpoint gets them merged into its weights
    plain = dataclasses.replace(cfg, model=lora.without_adapters(cfg.model), load_path=str(tmp_path / "checkpoints"),
                                save_folder=None, run_folder=str(tmp_path / "plain"))
    plain_parts = build_run(plain)
    try:
        trainer = Trainer(plain_parts)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            trainer.load_weights(plain.load_path)
    finally:
        plain_parts.train_loader.close()
    assert "LoRA adapters merged into them" in out.getvalue()
    for ours, theirs in zip(jax.tree.leaves(trainer.state.params),
                            jax.tree.leaves(lora.merge_adapters(saved.params, saved.model_cfg))):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_dora_starts_from_the_loaded_weights_and_trains(tmp_path):
    """DoRA on a Hugging Face load_path: each magnitude starts at its loaded column's norm, as PEFT
    starts it, so the first loss is the base model's (the plain LoRA run's); then the loss falls."""
    (tmp_path / "plain").mkdir()
    plain = run_config(tmp_path / "plain", BASE, max_duration="4ba", save_folder=None)
    peft = dict(plain.model.peft_config.__dict__, use_dora=True)
    dora = dataclasses.replace(plain, run_folder=str(tmp_path / "dora"),
                               model=dataclasses.replace(plain.model, peft_config=PeftConfig(**peft)))
    losses = {}
    for name, cfg in (("plain", plain), ("dora", dora)):
        parts, trainer, _, _ = fit(cfg)
        records = [json.loads(line) for line in (Path(cfg.run_folder) / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses["dora"][0] == pytest.approx(losses["plain"][0], rel=1e-6) and losses["dora"][-1] < losses["dora"][0]
    assert losses["dora"][1:] != pytest.approx(losses["plain"][1:], rel=1e-4)  # the magnitudes train too
    params = nnx.to_pure_dict(trainer.state.params)["blocks"]["attn"]["Wqkv"]
    assert params["lora_magnitude"].shape == (2, 96)
    assert lora.adapter_param_count(dora.model) == lora.adapter_param_count(plain.model) + 2 * (96 + 128)


@pytest.mark.parametrize("peft,message", [
    ({"target_modules": ["q_proj", "v_proj"]}, "MPT projects queries, keys and values in one layer, Wqkv"),
    ({"target_modules": ["up_poj"]}, "did you mean 'up_proj'?"),
    ({"target_modules": ["gate_proj"]}, "gate_proj exists with model.ffn_config.ffn_type: mptglu"),
    ({"target_modules": r".*blocks\.0\.attn\.Wqkv"}, "selects other layers in block 1 than in block 0"),
    ({"r": 0}, "model.peft_config.r: expected a whole number >= 1"),
    ({"lora_dropout": 1.0}, "model.peft_config.lora_dropout: must be in [0, 1)"),
    ({"bias": "all"}, "model.peft_config.bias: 'all' is not supported"),
    ({"peft_type": "IA3"}, "jaxtrain trains LORA adapters"),
    ({"init_lora_weights": "pissa"}, "model.peft_config.init_lora_weights: 'pissa' is not supported"),
    ({"rank_pattern": {r"blocks\.0\.attn\.Wqkv": 2}}, "model.peft_config.rank_pattern: "
                                                       r"'blocks\.0\.attn\.Wqkv' selects Wqkv in block 0 but not in block 1"),
    ({"alpha_pattern": {"up_proj": 0}}, "model.peft_config.alpha_pattern: 'up_proj': expected a positive number, got 0"),
])
def test_settings_jaxtrain_cannot_run_as_peft_would_are_one_line(peft, message):
    with pytest.raises(ConfigError) as error:
        load_config_dict({"model": {"n_layers": 2, "peft_config": peft}})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_foundry_peft_keys_without_effect_are_accepted_and_others_refused(tmp_path):
    from jaxtrain.config import load_config

    path = tmp_path / "lora.yaml"
    path.write_text("model:\n  n_layers: 2\n  peft_config:\n    peft_type: LORA\n    task_type: CAUSAL_LM\n    r: 16\n"
                    "    lora_alpha: 32\n    lora_dropout: 0.05\n    target_modules: [Wqkv]\n"
                    "    inference_mode: false\n    modules_to_save: null\n")
    cfg = load_config(str(path))
    assert cfg.model.peft_config == PeftConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["Wqkv"])
    path.write_text(path.read_text() + "    use_dora: true\n")
    assert load_config(str(path)).model.peft_config.use_dora
    path.write_text(path.read_text() + "    layers_to_transform: [0]\n")
    with pytest.raises(ConfigError, match=r"model.peft_config.layers_to_transform: \[0\] is not supported by jaxtrain's LoRA"):
        load_config(str(path))


def test_the_memory_estimate_counts_gradients_and_moments_of_the_adapters_alone():
    from jaxtrain.plan.memory import estimate_memory

    model_cfg = tiny(r=8)
    common = dict(global_batch=8, microbatch=8, seq_len=16, mesh_shape={"data": 1}, optimizer="adam",
                  precision="amp_bf16", ema=True)
    adapted = estimate_memory(model_cfg, **common)
    full = estimate_memory(lora.without_adapters(model_cfg), **common)
    adapters = lora.adapter_param_count(model_cfg)
    params = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)[1]
    assert adapters == count_params(lora.split_trainable(params)[0]) > 0
    # frozen weights in bf16 (no working copy), adapters in fp32; the rest is the adapters' alone
    assert adapted.params_bytes == full.params_bytes / 2 + 4 * adapters and adapted.working_weights_bytes == 0
    assert adapted.grads_bytes == 4 * adapters and adapted.optimizer_bytes == 2 * 4 * adapters
    assert adapted.ema_bytes == 4 * adapters


def test_in_bf16_the_frozen_weights_are_kept_in_bf16_and_the_average_is_the_adapters():
    """amp_bf16: frozen weights stored in bf16 (they are only read in it), adapters, their moments and
    their moving average in float32; evaluation takes the average's adapters with the frozen weights."""
    from jaxtrain.algorithms.ema import EMAPlan, evaluation_params

    model_cfg = tiny()
    mesh = build_mesh(ParallelismConfig())
    tx = optax.adamw(1e-2)
    state, model_def, shardings = create_train_state(model_cfg, tx, seed=0, mesh=mesh, rules=DEFAULT_RULES, ema=True,
                                                     frozen_dtype=jnp.bfloat16)
    adapters, frozen = lora.split_trainable(state.params)
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}
    assert count_params(state.ema) == count_params(adapters)
    train_step = make_train_step(model_def, tx, lambda count: jnp.asarray(1e-2), compute_dtype=jnp.bfloat16,
                                 ema=EMAPlan(smoothing=0.5, start=0, every=1))
    step = compile_train_step(train_step, shardings, batch_sharding(mesh))
    frozen_before = [np.asarray(x) for x in jax.tree.leaves(frozen)]
    batch = {"input_ids": jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(4, 16), dtype=np.int32))}
    for _ in range(2):
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    adapters, frozen = lora.split_trainable(state.params)
    for before, after in zip(frozen_before, jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(before, np.asarray(after))
    evaluated = evaluation_params(state)
    averaged, evaluated_frozen = lora.split_trainable(evaluated)
    for ours, theirs in zip(jax.tree.leaves(averaged), jax.tree.leaves(state.ema)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(adapters)))
    for before, after in zip(frozen_before, jax.tree.leaves(evaluated_frozen)):
        np.testing.assert_array_equal(before, np.asarray(after))


def test_accelerators_three_query_key_value_products_take_the_adapter_too():
    """On GPUs and TPUs Wqkv runs as three products with column slices of its kernel; with an
    adapter, B is sliced the same way. Traced for a GPU (float32: XLA's attention, which runs
    here), the attention equals the CPU's one-product path."""
    from jaxtrain.layers.attention import MPTAttention
    from jaxtrain.parallel import platform

    spec = lora.LoraSpec(r=4, scaling=2.0, dropout=0.0)
    attn = MPTAttention(d_model=32, n_heads=4, kv_n_heads=2, use_bias=False, clip_qkv=None, qk_ln=False,
                        norm_type="layernorm", norm_eps=1e-5, softmax_scale=None, attn_pdrop=0.0, in_std=0.1,
                        out_std=0.1, rngs=nnx.Rngs(0), adapters={"Wqkv": spec})
    attn.Wqkv.lora_b = nnx.LoRAParam(0.1 * jax.random.normal(jax.random.key(1), attn.Wqkv.lora_b[...].shape))
    x = jax.random.normal(jax.random.key(2), (2, 8, 32))
    slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625])
    cpu = attn(x, slopes=slopes)
    with platform.compiling_for("gpu"):
        sliced = attn(x, slopes=slopes)
    np.testing.assert_allclose(np.asarray(sliced), np.asarray(cpu), atol=2e-5)
    attn.Wqkv.lora_b = nnx.LoRAParam(jnp.zeros_like(attn.Wqkv.lora_b[...]))
    with platform.compiling_for("gpu"):  # and the adapter's term is in it: without it the output differs
        assert not np.allclose(np.asarray(attn(x, slopes=slopes)), np.asarray(sliced), atol=1e-3)
    # DoRA's magnitudes scale whole output columns: Wqkv runs as one product there, as on the CPU
    dora = MPTAttention(d_model=32, n_heads=4, kv_n_heads=2, use_bias=False, clip_qkv=None, qk_ln=False,
                        norm_type="layernorm", norm_eps=1e-5, softmax_scale=None, attn_pdrop=0.0, in_std=0.1,
                        out_std=0.1, rngs=nnx.Rngs(0), adapters={"Wqkv": dataclasses.replace(spec, dora=True)})
    dora.Wqkv.lora_b = nnx.LoRAParam(0.1 * jax.random.normal(jax.random.key(1), dora.Wqkv.lora_b[...].shape))
    dora.Wqkv.lora_magnitude = nnx.LoRAParam(dora.Wqkv.lora_magnitude[...] * 1.5)
    cpu = dora(x, slopes=slopes)
    with platform.compiling_for("gpu"):
        np.testing.assert_allclose(np.asarray(dora(x, slopes=slopes)), np.asarray(cpu), atol=2e-5)
    assert not np.allclose(np.asarray(cpu), np.asarray(sliced), atol=1e-3)


def test_a_model_of_another_shape_is_refused_in_one_line_naming_its_shape(tmp_path):
    """LoRA on a load_path whose model differs: the error names the shape, not the adapters."""
    cfg = run_config(tmp_path, BASE)
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=3), save_folder=None)
    parts = build_run(other)
    try:
        with pytest.raises(ConfigError) as error:
            Trainer(parts).load_weights(str(BASE))
    finally:
        parts.train_loader.close()
    message = str(error.value)
    assert message.startswith(f"load_path: {BASE}") and "model.n_layers=2 (the config says 3)" in message
    assert "peft_config" not in message and "lora" not in message and "\n" not in message


def test_the_example_config_fine_tunes_a_hugging_face_folder(tmp_path):
    """configs/finetune/lora.yaml, as the README runs it, on a copy of the fixture model with a
    character tokenizer beside it: Foundry's hf_causal_lm section on a local folder, LoRA on every
    linear layer, the folder's weights frozen."""
    import shutil
    import sys

    from test_finetune import char_tokenizer, write_lines

    model = tmp_path / "model"
    shutil.copytree(BASE, model)
    char_tokenizer().save(str(model / "tokenizer.json"))
    data = write_lines(tmp_path / "train.jsonl", [{"prompt": p, "response": r}
                                                  for p, r in [("ab", "cd"), ("efg", "h"), ("k", "lm")] * 8])
    run = subprocess.run(
        [sys.executable, "-m", "jaxtrain.main", "--config", "configs/finetune/lora.yaml",
         "--set", f"variables.model={model}", "--set", f"variables.data={data}", "--set", "variables.max_seq_len=32",
         "--set", "max_duration=3ba", "--set", "global_train_batch_size=4", "--set", f"run_folder={tmp_path / 'run'}",
         "--set", f"save_folder={tmp_path / 'checkpoints'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"jaxtrain builds the MPT that {model}/config.json describes and starts from its weights" in run.stdout
    assert "training 0.02M in LoRA adapters (rank 16)" in run.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 3
    saved = load_checkpoint(str(tmp_path / "checkpoints"))
    assert saved.model_cfg.peft_config.target_modules == "all-linear" and lora.has_adapters(saved.params)

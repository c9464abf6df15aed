"""Hugging Face MPT <-> jaxtrain conversion, checked against transformers' own numbers.

Fixtures in tests/fixtures/hf_mpt come from ``transformers.MptForCausalLM`` (make_fixtures.py);
options transformers lacks are checked against the float64 NumPy forward of test_mpt.py. Tests
that run transformers live need the side environment /work/main/.venv-ref (CPU torch,
transformers): they are skipped only when it is absent.
"""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxtrain.checkpoint.load import load_checkpoint
from jaxtrain.config import ConfigError
from jaxtrain.convert import export_hf, import_hf, save_model
from jaxtrain.convert.cli import main as convert_main
from jaxtrain.convert.safetensors_io import SafetensorsWriter
from jaxtrain.inference import generate
from test_mpt import REFERENCE_CASES, build, numpy_params, ref_forward, token_ids

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf_mpt"
HF_CASES = ["mha", "six_heads", "clip_qkv_softmax_scale", "untied"]
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"
needs_reference_env = pytest.mark.skipif(not REF_PYTHON.exists(), reason="needs .venv-ref (CPU torch + transformers)")


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


def convert(folder, tmp_path, name="ckpt", **kwargs):
    out = tmp_path / name
    import_hf(str(folder), str(out), **kwargs)
    return load_checkpoint(str(out))


def check_against_transformers(folder, tmp_path, scan_layers=True):
    loaded = convert(folder, tmp_path, scan_layers=scan_layers)
    assert loaded.meta["layout"] == {"scan_layers": scan_layers, "n_layers": loaded.model_cfg.n_layers}
    ref = load_file(str(Path(folder) / "reference.safetensors"))
    model = loaded.module()
    logits = nnx.jit(lambda m, ids: m(ids))(model, jnp.asarray(ref["input_ids"], jnp.int32))
    assert np.abs(np.asarray(logits) - ref["logits"]).max() <= 1e-4
    greedy = generate(model, ref["prompt"].tolist(), max_new_tokens=ref["generated"].shape[1])
    assert greedy.tokens == ref["generated"].tolist()
    return loaded


@pytest.mark.parametrize("case", HF_CASES)
def test_logits_and_greedy_tokens_match_transformers(case, tmp_path):
    check_against_transformers(FIXTURES / case, tmp_path, scan_layers=case != "six_heads")


def test_alibi_bias_max_follows_mosaicml_not_transformers(tmp_path):
    """transformers builds ALiBi with bias max 8 whatever the config says; MosaicML's code and
    jaxtrain honour ``alibi_bias_max``. Both facts are checked."""
    loaded = convert(FIXTURES / "alibi_bias_max_4", tmp_path)
    cfg = loaded.model_cfg
    assert cfg.attn_config.alibi_bias_max == 4
    ref = load_file(str(FIXTURES / "alibi_bias_max_4" / "reference.safetensors"))
    ids = ref["input_ids"]
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(loaded.params))
    np.testing.assert_allclose(loaded.module()(jnp.asarray(ids)), ref_forward(cfg, params, ids), atol=1e-4)
    as_transformers = dataclasses.replace(cfg, attn_config=dataclasses.replace(cfg.attn_config, alibi_bias_max=8))
    np.testing.assert_allclose(ref_forward(as_transformers, params, ids), ref["logits"], atol=1e-4)


@pytest.mark.parametrize("case", ["mha", "untied"])
def test_export_is_bitwise_identical(case, tmp_path):
    convert(FIXTURES / case, tmp_path, scan_layers=case == "mha")
    assert convert_main([str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    original = load_file(str(FIXTURES / case / "model.safetensors"))
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(exported) == set(original) - {"lm_head.weight"} | ({"lm_head.weight"} if case == "untied" else set())
    for name, tensor in exported.items():
        assert tensor.dtype == original[name].dtype and tensor.tobytes() == original[name].tobytes(), name
    hf_config = json.loads((FIXTURES / case / "config.json").read_text())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("d_model", "n_heads", "n_layers", "vocab_size", "max_seq_len", "no_bias", "expansion_ratio"):
        assert config[key] == hf_config[key], key
    assert config["tie_word_embeddings"] == (case != "untied")


def test_sharded_folder_with_foundry_prefix(tmp_path):
    """LLM Foundry's ``model.`` prefix and a sharded index load the same parameters."""
    original = load_file(str(FIXTURES / "mha" / "model.safetensors"))
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(FIXTURES / "mha" / "config.json", folder)
    entries = [(f"model.{name}", t.shape, lambda t=t: t) for name, t in sorted(original.items())]
    files = SafetensorsWriter(str(folder), np.dtype(np.float32), 40_000).write(entries)
    assert len(files) > 1 and (folder / "model.safetensors.index.json").exists()
    sharded = convert(folder, tmp_path, "a")
    plain = convert(FIXTURES / "mha", tmp_path, "b")
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(sharded.params), nnx.to_pure_dict(plain.params))


SHARDED_LOAD = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from flax import nnx
from jaxtrain.checkpoint.load import load_hf_weights
from jaxtrain.convert import hf_mpt
from jaxtrain.convert.safetensors_io import SafetensorsFolder
from jaxtrain.train.state import abstract_model

folder = sys.argv[1]
_, full, _ = hf_mpt.read_hf(folder)  # the whole model in float32, the reference
mesh = jax.make_mesh((2, 2), ("a", "b"))
spec = lambda x: P("b", *[None] * (x.ndim - 2), "a") if x.ndim >= 2 else P()
_, abstract = abstract_model(hf_mpt.hf_model_config(folder))
like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec(x))),
                    abstract)
reads = []
part = SafetensorsFolder.get_slice
SafetensorsFolder.get_slice = lambda self, name, index: reads.append(part(self, name, index)) or reads[-1]
SafetensorsFolder.get = None  # no whole tensor is read
loaded = load_hf_weights(folder, like=like)
ours, wanted = nnx.to_pure_dict(loaded.params), nnx.to_pure_dict(like)
for (path, got), want, value in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(wanted),
                                    jax.tree.leaves(full)):
    assert got.dtype == jnp.bfloat16 and got.sharding == want.sharding, path
    assert np.array_equal(np.asarray(got), value.astype(jnp.bfloat16)), path
    if got.ndim >= 2:  # a quarter of each tensor per device: no device's part is a whole tensor
        assert {s.data.size for s in got.addressable_shards} == {got.size // 4}, path
print(sum(r.size for r in reads), sum(x.size for x in jax.tree.leaves(full)), max(r.size for r in reads),
      max(x.size for x in jax.tree.leaves(full)) // 4)
"""


def test_hugging_face_weights_load_part_by_part_into_shardings_and_dtypes(tmp_path):
    """A Hugging Face folder as load_path on a 2x2 mesh in bf16: each device's part is read from the
    files straight into bf16 (equal to the float32 values cast), every element is read once, and no
    read is a whole matrix."""
    from conftest import cpu_devices_env

    out = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(FIXTURES / "untied")], env=cpu_devices_env(4),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    read, total, largest_read, largest_part = map(int, out.stdout.split())
    assert read == total and largest_read == largest_part


def test_bfloat16_round_trip_keeps_dtype(tmp_path):
    convert(FIXTURES / "mha", tmp_path)
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "bf16"), dtype="bfloat16")
    shutil.copy(FIXTURES / "mha" / "config.json", tmp_path / "bf16")
    loaded = convert(tmp_path / "bf16", tmp_path, "ckpt_bf16")
    assert loaded.meta["source"]["dtype"] == "bfloat16"
    export_hf(str(tmp_path / "ckpt_bf16"), str(tmp_path / "again"))  # the imported dtype by default
    first = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(again[k].dtype == first[k].dtype and again[k].tobytes() == first[k].tobytes() for k in first)


# ----------------------------------------------------------------------------- options transformers lacks

BEYOND_TRANSFORMERS = ["gqa", "mqa", "qk_ln_clip_bias", "logit_scale_inv_sqrt", "glu_silu_ratio2",
                       "learned_positions", "bias_fp32_layernorm", "softmax_scale"]


@pytest.mark.parametrize("name", BEYOND_TRANSFORMERS)
def test_round_trip_of_options_transformers_lacks(name, tmp_path):
    """jaxtrain -> HF folder -> jaxtrain (other layout): identical parameters, logits equal to the
    NumPy forward written from MosaicML's definition."""
    cfg = REFERENCE_CASES[name]
    model = build(cfg)
    save_model(str(tmp_path / "orig"), cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    export_hf(str(tmp_path / "orig"), str(tmp_path / "hf"))
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == "mpt" and hf_config["attn_config"]["attn_type"] == cfg.attn_config.attn_type
    back = convert(tmp_path / "hf", tmp_path, "back", scan_layers=not cfg.scan_layers)
    expected = dataclasses.replace(cfg, scan_layers=not cfg.scan_layers)
    assert back.model_cfg == dataclasses.replace(expected, init_config=back.model_cfg.init_config)
    original = numpy_params(model)
    restored = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(back.params))
    for key in ("blocks",):  # compare layer by layer across the two layouts
        for i in range(cfg.n_layers):
            a = jax.tree.map(lambda x: x[i], original[key]) if cfg.scan_layers else original[key][i]
            b = restored[key][i] if cfg.scan_layers else jax.tree.map(lambda x: x[i], restored[key])
            jax.tree.map(np.testing.assert_array_equal, a, b)
    rest = lambda tree: {k: v for k, v in tree.items() if k != "blocks"}  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, rest(original), rest(restored))
    ids = token_ids()
    np.testing.assert_allclose(back.module()(ids), ref_forward(cfg, original, ids), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- bad input


def write_folder(tmp_path, tensors=None, config=None, name="bad"):
    folder = tmp_path / name
    folder.mkdir()
    hf = json.loads((FIXTURES / "mha" / "config.json").read_text())
    hf.update(config or {})
    (folder / "config.json").write_text(json.dumps(hf))
    if tensors is not None:
        save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_pickle_weights_are_refused(tmp_path):
    folder = write_folder(tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConfigError, match=r"pytorch_model\.bin.*never reads pickle.*safetensors required"):
        import_hf(str(folder), str(tmp_path / "out"))
    assert convert_main([str(folder), str(tmp_path / "out")]) == 2


def test_other_model_family_is_refused(tmp_path):
    folder = write_folder(tmp_path, {"x": np.zeros(1, np.float32)}, {"model_type": "llama"})
    with pytest.raises(ConfigError, match=r"config\.json: model_type is 'llama', not 'mpt'"):
        import_hf(str(folder), str(tmp_path / "out"))


ALIBI = {"alibi": True, "attn_type": "multihead_attention"}
BAD_CONFIG_VALUES = {  # config.json values of the wrong type or none at all -> the key they are under
    "n_heads_text": ({"n_heads": "four"}, "n_heads"),
    "d_model_null": ({"d_model": None}, "d_model"),
    "vocab_size_quoted": ({"vocab_size": "512"}, "vocab_size"),
    "n_layers_fraction": ({"n_layers": 1.5}, "n_layers"),
    "n_heads_bool": ({"n_heads": True}, "n_heads"),
    "max_seq_len_null": ({"max_seq_len": None}, "max_seq_len"),
    "no_bias_null": ({"no_bias": None}, "no_bias"),
    "norm_type_number": ({"norm_type": 5}, "norm_type"),
    "epsilon_quoted": ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon"),
    "tie_null": ({"tie_word_embeddings": None}, "tie_word_embeddings"),
    "d_model_indivisible": ({"d_model": 30}, "d_model"),
    "d_model_zero": ({"d_model": 0}, "d_model"),
    "attn_config_text": ({"attn_config": "x"}, "attn_config"),
    "attn_config_list": ({"attn_config": [1, 2]}, "attn_config"),
    "ffn_config_text": ({"ffn_config": "x"}, "ffn_config"),
    "init_config_text": ({"init_config": "x"}, "init_config"),
    "alibi_bias_max_quoted": ({"attn_config": {**ALIBI, "alibi_bias_max": "8"}}, "attn_config.alibi_bias_max"),
    "attn_pdrop_quoted": ({"attn_config": {**ALIBI, "attn_pdrop": "0.1"}}, "attn_config.attn_pdrop"),
    "alibi_null": ({"attn_config": {**ALIBI, "alibi": None}}, "attn_config.alibi"),
    "ffn_hidden_size_quoted": ({"ffn_config": {"ffn_hidden_size": "128"}}, "ffn_config.ffn_hidden_size"),
    "ffn_act_fn_text": ({"ffn_config": {"ffn_act_fn": "silu"}}, "ffn_config.ffn_act_fn"),
}


def check_config_error(message, folder, key):
    """One line naming the folder's config.json and the key first."""
    assert "\n" not in message and "Traceback" not in message, message
    head = f"{folder / 'config.json'}: {key}"
    assert message.startswith(head) and message[len(head)] in " :", message


@pytest.mark.parametrize("case", BAD_CONFIG_VALUES)
def test_wrongly_typed_config_json_values_are_one_line_errors(case, tmp_path, capsys):
    """convert, and a run's load_path, refuse a config.json value of the wrong type (or null where
    a value is needed) in one line naming the file and the key, before any tensor is read."""
    from jaxtrain.checkpoint.load import load_hf_weights

    config, key = BAD_CONFIG_VALUES[case]
    folder = write_folder(tmp_path, config=config)  # no weights: the config is refused first
    with pytest.raises(ConfigError) as error:
        import_hf(str(folder), str(tmp_path / "out"))
    check_config_error(str(error.value), folder, key)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError) as error:
        load_hf_weights(str(folder), like=None)  # a run with load_path=FOLDER
    check_config_error(str(error.value), folder, key)
    capsys.readouterr()
    assert convert_main([str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    check_config_error(err[0].removeprefix("error: "), folder, key)


def test_null_max_seq_len_is_refused_and_absent_means_the_default(tmp_path):
    """A null max_seq_len is refused up front (it once made a checkpoint every reader called
    damaged); a config.json without the key converts with MPT's default, 2048, and reads back."""
    folder = write_folder(tmp_path, load_file(str(FIXTURES / "mha" / "model.safetensors")), {"max_seq_len": None})
    with pytest.raises(ConfigError, match=r"config\.json: max_seq_len is null; remove the key to use the default "
                                          r"\(2048\)$"):
        import_hf(str(folder), str(tmp_path / "out"))
    hf = json.loads((folder / "config.json").read_text())
    del hf["max_seq_len"]
    (folder / "config.json").write_text(json.dumps(hf))
    assert convert(folder, tmp_path, "out").model_cfg.max_seq_len == 2048


def test_config_json_error_through_the_jaxtrain_command(tmp_path):
    """``jaxtrain convert`` prints the error on one line and exits 2, with no traceback."""
    folder = write_folder(tmp_path, config={"n_heads": "four"})
    run = subprocess.run([sys.executable, "-c", "from jaxtrain.cli import run; run()", "convert", str(folder),
                          str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines == [f"error: {folder / 'config.json'}: n_heads: expected an integer, got 'four'; "
                     "correct that key of config.json"], run.stderr


def test_foundry_init_config_values_jaxtrain_does_not_take_fall_back_to_its_default(tmp_path):
    """MosaicML's init_config may hold values jaxtrain's does not type (init_div_is_residual as a
    number): initialisation does not matter for converted weights, so the default is recorded and
    the checkpoint reads back."""
    tensors = load_file(str(FIXTURES / "mha" / "model.safetensors"))
    init = {"name": "kaiming_normal_", "init_div_is_residual": 2.0, "init_gain": 0.0, "emb_init_uniform_lim": None}
    loaded = convert(write_folder(tmp_path, tensors, {"init_config": init}), tmp_path)
    assert loaded.model_cfg.init_config.init_div_is_residual is True


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    tensors = load_file(str(FIXTURES / "mha" / "model.safetensors"))
    tensors["transformer.blocks.1.attn.Wqkv.weight"] = np.zeros((96, 31), np.float32)
    folder = write_folder(tmp_path, tensors)
    with pytest.raises(ConfigError, match=r"tensor transformer\.blocks\.1\.attn\.Wqkv\.weight has shape \[96, 31\], "
                                          r"config\.json implies \[96, 32\]"):
        import_hf(str(folder), str(tmp_path / "out"))


def test_missing_and_unexpected_tensors(tmp_path):
    tensors = load_file(str(FIXTURES / "mha" / "model.safetensors"))
    del tensors["transformer.blocks.0.ffn.down_proj.weight"]
    with pytest.raises(ConfigError, match=r"missing tensors transformer\.blocks\.0\.ffn\.down_proj\.weight"):
        import_hf(str(write_folder(tmp_path, tensors)), str(tmp_path / "out"))
    tensors = load_file(str(FIXTURES / "mha" / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"missing tensors transformer\.blocks\.0\.attn\.Wqkv\.bias"):
        import_hf(str(write_folder(tmp_path, tensors, {"no_bias": False}, "b")), str(tmp_path / "out"))


# ----------------------------------------------------------------------------- live transformers


@needs_reference_env
def test_fixture_script_live(tmp_path):
    """Regenerate the fixtures with transformers now and check the conversion against them."""
    script = FIXTURES / "make_fixtures.py"
    subprocess.run([str(REF_PYTHON), str(script), str(tmp_path / "live")], check=True, capture_output=True, timeout=300)
    for case in HF_CASES[:2]:
        check_against_transformers(tmp_path / "live" / case, tmp_path / case)


# ----------------------------------------------------------------------------- train -> export -> transformers

TRANSFORMERS_GREEDY = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
prompt = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    logits = model(prompt).logits[0].tolist()
    out = model.generate(prompt, max_new_tokens=int(sys.argv[3]), do_sample=False, eos_token_id=None, pad_token_id=0)
print(json.dumps({"tokens": out[0, prompt.shape[1]:].tolist(), "logits": logits}))
"""


@pytest.mark.slow
def test_trained_model_exports_to_transformers(tmp_path):
    """Train a tiny model, export it, and generate greedily with jaxtrain and with transformers."""
    overrides = {
        "variables.max_seq_len": 64, "model.d_model": 64, "model.n_layers": 2, "model.vocab_size": 1024,
        "tokenizer.kwargs.vocab_size": 1024, "train_loader.dataset.max_files": 60,
        "eval_loader.dataset.max_files": 200, "global_train_batch_size": 8, "device_train_microbatch_size": 4,
        "max_duration": "20ba", "eval_interval": 0, "run_folder": tmp_path / "run",
        "save_folder": tmp_path / "ckpt", "progress_bar": "false",
    }
    command = [sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert convert_main([str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").exists()

    loaded = load_checkpoint(str(tmp_path / "ckpt"))
    back = convert(tmp_path / "hf", tmp_path, "back")
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(loaded.params), nnx.to_pure_dict(back.params))
    from jaxtrain.data.tokenizer import Tokenizer
    import tokenizers

    prompt = Tokenizer(tokenizers.Tokenizer.from_file(loaded.tokenizer_path)).encode("def __init__(self")
    model = loaded.module()
    ours = generate(model, [prompt], max_new_tokens=12).tokens[0]
    if not REF_PYTHON.exists():
        pytest.skip("transformers half needs .venv-ref (CPU torch + transformers); jaxtrain half passed")
    run = subprocess.run([str(REF_PYTHON), "-c", TRANSFORMERS_GREEDY, str(tmp_path / "hf"), json.dumps(prompt), "12"],
                         check=True, capture_output=True, text=True, timeout=300)
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(model(jnp.asarray([prompt]))[0], theirs["logits"], atol=1e-4)
    assert ours == theirs["tokens"]


# ----------------------------------------------------------------------------- what transformers' MPT computes


def test_export_names_the_options_transformers_own_mpt_would_compute_differently(tmp_path, capsys):
    from jaxtrain.convert.hf_mpt import model_config_from_hf, transformers_mpt_gaps

    for case in HF_CASES:  # made by transformers, and their logits match it (test above)
        hf = json.loads((FIXTURES / case / "config.json").read_text())
        assert transformers_mpt_gaps(model_config_from_hf(hf, source=case)) == [], case
    hf = json.loads((FIXTURES / "alibi_bias_max_4" / "config.json").read_text())  # transformers ignores it (test above)
    assert transformers_mpt_gaps(model_config_from_hf(hf, source="alibi_bias_max_4")) == ["attn_config.alibi_bias_max=4"]
    # The reference cases build on Foundry's defaults (no ALiBi, biases), which transformers' MPT lacks too.
    base = ["attn_config.alibi=false (learned positions)", "no_bias=false"]
    assert transformers_mpt_gaps(REFERENCE_CASES["mha"]) == base
    expected = {
        "gqa": ["attn_config.attn_type=grouped_query_attention"],
        "mqa": ["attn_config.attn_type=multiquery_attention"],
        "qk_ln_clip_bias": ["attn_config.qk_ln=true"],
        "logit_scale_inv_sqrt": ["logit_scale=inv_sqrt_d_model"],
        "glu_silu_ratio2": ["expansion_ratio=2", "ffn_config={ffn_type: mptglu, ffn_act_fn: {'name': 'silu'}}"],
        "learned_positions": [],
        "bias_fp32_layernorm": [],
        "softmax_scale": [],  # transformers reads softmax_scale
    }
    gaps = {name: [gap for gap in transformers_mpt_gaps(REFERENCE_CASES[name]) if gap not in base]
            for name in BEYOND_TRANSFORMERS}
    assert gaps == expected
    cfg = REFERENCE_CASES["qk_ln_clip_bias"]
    save_model(str(tmp_path / "ckpt"), cfg, nnx.to_pure_dict(nnx.state(build(cfg), nnx.Param)))
    assert convert_main([str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: transformers' built-in MptForCausalLM does not implement "
                                               "attn_config.qk_ln=true, attn_config.alibi=false (learned positions), no_bias=false")

"""MPT in Flax NNX against an independent float64 NumPy forward pass written from MosaicML's definition."""

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain.config import load_config
from jaxtrain.config.schema import AttnConfig, FFNConfig, InitConfig, ModelConfig
from jaxtrain.models import build_model, mpt_param_count

VOCAB, BATCH, LENGTH = 64, 2, 7
PRESETS = Path(__file__).resolve().parents[1] / "configs" / "mpt"


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """Exact float32 products (GPUs default to TF32), so the comparisons test the math alone."""
    with jax.default_matmul_precision("highest"):
        yield


def make_cfg(attn=None, ffn=None, init=None, **model) -> ModelConfig:
    base = dict(d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=16)
    base.update(model)
    return ModelConfig(
        attn_config=AttnConfig(**(attn or {})),
        ffn_config=FFNConfig(**(ffn or {})),
        init_config=InitConfig(**(init or {})),
        **base,
    )


def build(cfg, seed=0, perturb=True):
    model = build_model(cfg, rngs=nnx.Rngs(seed))
    if perturb:  # give norms and biases values other than 1 and 0, so the check exercises them
        state = nnx.state(model, nnx.Param)
        pure = nnx.to_pure_dict(state)
        keys = iter(jax.random.split(jax.random.key(seed + 100), len(jax.tree.leaves(pure))))

        def shift(path, x):
            noise = 0.3 * jax.random.normal(next(keys), x.shape)
            return x + noise if path[-1].key in ("scale", "bias") else x

        nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(shift, pure))
        nnx.update(model, state)
    return model


def numpy_params(model):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def token_ids(seed=1, length=LENGTH):
    return jax.random.randint(jax.random.key(seed), (BATCH, length), 0, VOCAB, dtype=jnp.int32)


# ----------------------------------------------------------------------------- reference


def ref_slopes(n_heads, bias_max):
    n = 2 ** math.ceil(math.log2(n_heads))
    slopes = np.array([2.0 ** (-i * bias_max / n) for i in range(1, n + 1)])
    return slopes if n == n_heads else np.concatenate([slopes[1::2], slopes[::2]])[:n_heads]


def ref_layer_norm(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * p["scale"]
    return y + p["bias"] if "bias" in p else y


def ref_linear(x, p):
    y = x @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


_erf = np.vectorize(math.erf)
REF_ACTS = {"gelu": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))), "silu": lambda x: x / (1 + np.exp(-x))}


def ref_forward(cfg: ModelConfig, params, ids, sequence_id=None):
    """MPT forward as LLM Foundry writes it, in float64, bias in its causal form slope*(j-(L-1))."""
    ids = np.asarray(ids)
    attn = cfg.attn_config
    batch, length = ids.shape
    d, h = cfg.d_model, cfg.n_heads
    hd = d // h
    kv = {"multihead_attention": h, "multiquery_attention": 1}.get(attn.attn_type, attn.kv_n_heads)
    act = REF_ACTS[(cfg.ffn_config.ffn_act_fn or {"name": "gelu"})["name"]]
    x = params["wte"]["embedding"][ids]
    if "wpe" in params:
        x = x + params["wpe"]["embedding"][:length]
    allowed = np.tril(np.ones((length, length), bool))[None]
    if sequence_id is not None and attn.attn_uses_sequence_id:
        sid = np.asarray(sequence_id)
        allowed = allowed & (sid[:, :, None] == sid[:, None, :])
    scale = attn.softmax_scale or 1 / math.sqrt(d / h)
    for i in range(cfg.n_layers):
        blocks = params["blocks"]
        p = jax.tree.map(lambda a: a[i], blocks) if cfg.scan_layers else blocks[i]
        qkv = ref_linear(ref_layer_norm(x, p["norm_1"]), p["attn"]["Wqkv"])
        if attn.clip_qkv is not None:
            qkv = np.clip(qkv, -attn.clip_qkv, attn.clip_qkv)
        q, k, v = qkv[..., :d], qkv[..., d : d + kv * hd], qkv[..., d + kv * hd :]
        if attn.qk_ln:
            q, k = ref_layer_norm(q, p["attn"]["q_ln"]), ref_layer_norm(k, p["attn"]["k_ln"])
        q = q.reshape(batch, length, h, hd)
        k = np.repeat(k.reshape(batch, length, kv, hd), h // kv, axis=2)  # Foundry's repeat_kv_for_gqa
        v = np.repeat(v.reshape(batch, length, kv, hd), h // kv, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
        if attn.alibi:
            offsets = np.arange(1 - length, 1)
            scores = scores + ref_slopes(h, attn.alibi_bias_max)[None, :, None, None] * offsets
        scores = np.where(allowed[:, None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs = probs / probs.sum(-1, keepdims=True)
        out = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, d)
        x = x + ref_linear(out, p["attn"]["out_proj"])
        hidden = ref_layer_norm(x, p["norm_2"])
        if cfg.ffn_config.ffn_type == "mptglu":
            inner = act(ref_linear(hidden, p["ffn"]["gate_proj"])) * ref_linear(hidden, p["ffn"]["up_proj"])
        else:
            inner = act(ref_linear(hidden, p["ffn"]["up_proj"]))
        x = x + ref_linear(inner, p["ffn"]["down_proj"])
    x = ref_layer_norm(x, params["norm_f"])
    logits = x @ (params["wte"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"])
    if cfg.logit_scale is not None:
        logits = logits * (1 / math.sqrt(d) if cfg.logit_scale == "inv_sqrt_d_model" else cfg.logit_scale)
    return logits


REFERENCE_CASES = {
    "mha": make_cfg(),
    "mha_unrolled": make_cfg(scan_layers=False),
    "gqa": make_cfg(attn=dict(attn_type="grouped_query_attention", kv_n_heads=2)),
    "mqa": make_cfg(attn=dict(attn_type="multiquery_attention"), scan_layers=False),
    "qk_ln_clip_bias": make_cfg(attn=dict(qk_ln=True, clip_qkv=0.5), no_bias=False),
    "bias_fp32_layernorm": make_cfg(no_bias=False, norm_type="layernorm", scan_layers=False),
    "logit_scale": make_cfg(logit_scale=0.5),
    "logit_scale_inv_sqrt": make_cfg(logit_scale="inv_sqrt_d_model"),
    "glu_gelu": make_cfg(ffn=dict(ffn_type="mptglu")),
    "glu_silu_ratio2": make_cfg(ffn=dict(ffn_type="mptglu", ffn_act_fn={"name": "silu"}), expansion_ratio=2),
    "untied": make_cfg(tie_word_embeddings=False),
    "six_heads": make_cfg(d_model=48, n_heads=6, attn=dict(alibi_bias_max=4)),
    "learned_positions": make_cfg(attn=dict(alibi=False), no_bias=False, tie_word_embeddings=False),
    "no_positions": make_cfg(attn=dict(alibi=False), learned_pos_emb=False),
    "softmax_scale": make_cfg(attn=dict(softmax_scale=0.2)),
    "sequence_id": make_cfg(attn=dict(attn_uses_sequence_id=True, attn_type="grouped_query_attention", kv_n_heads=2)),
}


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_logits_match_numpy_reference(name):
    cfg = REFERENCE_CASES[name]
    model = build(cfg)
    ids = token_ids()
    sequence_id = jnp.array([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 2, 2, 2, 2]], jnp.int32)
    logits = nnx.jit(lambda m, i, s: m(i, sequence_id=s))(model, ids, sequence_id)
    assert logits.dtype == jnp.float32 and logits.shape == (BATCH, LENGTH, VOCAB)
    expected = ref_forward(cfg, numpy_params(model), ids, sequence_id)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=1e-4)


def test_packed_document_sees_only_itself():
    cfg = make_cfg(attn=dict(attn_uses_sequence_id=True, alibi=True))
    model = build(cfg)
    ids = token_ids(length=8)
    packed = model(ids, sequence_id=jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]] * BATCH, jnp.int32))
    # ALiBi has no absolute positions, so the second document alone gives the same logits
    np.testing.assert_allclose(packed[:, 3:], model(ids[:, 3:]), atol=1e-5)
    np.testing.assert_allclose(packed[:, :3], model(ids[:, :3]), atol=1e-5)
    assert not np.allclose(packed[:, 3:], model(ids)[:, 3:], atol=1e-3)


@pytest.mark.parametrize("name", ["mha", "learned_positions"])
def test_causality(name):
    model = build(REFERENCE_CASES[name])
    ids = token_ids()
    changed = ids.at[:, 4].set((ids[:, 4] + 1) % VOCAB)
    a, b = model(ids), model(changed)
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not np.allclose(a[:, 4:], b[:, 4:], atol=1e-3)


@pytest.mark.parametrize("name", ["mha", "qk_ln_clip_bias", "learned_positions", "glu_gelu"])
def test_scan_and_unrolled_agree(name):
    cfg = REFERENCE_CASES[name]
    stacked = build(dataclasses.replace(cfg, scan_layers=True), perturb=False)
    unrolled = build(dataclasses.replace(cfg, scan_layers=False), perturb=False)
    p_stacked, p_unrolled = numpy_params(stacked), numpy_params(unrolled)
    for i in range(cfg.n_layers):
        layer_i = jax.tree.map(lambda a: a[i], p_stacked["blocks"])
        jax.tree.map(np.testing.assert_array_equal, layer_i, p_unrolled["blocks"][i])
    ids = token_ids()
    np.testing.assert_allclose(stacked(ids), unrolled(ids), atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_keeps_logits_and_gradients(remat):
    ids = token_ids()
    results = []
    for policy in ("none", remat):
        graphdef, params = nnx.split(build(make_cfg(remat=policy)))
        loss = lambda p: nnx.merge(graphdef, p)(ids).mean()  # noqa: E731
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[0][1], results[1][1])


def test_dropout_only_with_a_key_and_deterministic_in_it():
    cfg = make_cfg(emb_pdrop=0.1, resid_pdrop=0.1, attn=dict(attn_pdrop=0.1))
    model = build(cfg, perturb=False)
    ids = token_ids()
    plain = model(ids)
    no_dropout = build(dataclasses.replace(cfg, emb_pdrop=0.0, resid_pdrop=0.0), perturb=False)
    np.testing.assert_allclose(plain, no_dropout(ids), atol=1e-6)
    key = jax.random.key(3)
    dropped = model(ids, dropout_rng=key)
    assert not np.allclose(plain, dropped, atol=1e-3)
    np.testing.assert_array_equal(dropped, model(ids, dropout_rng=key))
    unrolled = build(dataclasses.replace(cfg, scan_layers=False), perturb=False)
    np.testing.assert_allclose(dropped, unrolled(ids, dropout_rng=key), atol=1e-5)


def test_init_statistics():
    d_model, n_layers = 256, 4
    kaiming = math.sqrt(2 / d_model)
    cfg = make_cfg(d_model=d_model, n_layers=n_layers, n_heads=4, vocab_size=512, no_bias=False)
    p = numpy_params(build(cfg, perturb=False))
    layer = jax.tree.map(lambda a: a[0], p["blocks"])
    residual = math.sqrt(2 * n_layers)
    for weight, std in [
        (layer["attn"]["Wqkv"]["kernel"], kaiming),
        (layer["attn"]["out_proj"]["kernel"], kaiming / residual),
        (layer["ffn"]["up_proj"]["kernel"], kaiming),
        (layer["ffn"]["down_proj"]["kernel"], math.sqrt(2 / (4 * d_model)) / residual),
        (p["wte"]["embedding"], kaiming),
    ]:
        assert weight.std() == pytest.approx(std, rel=0.02)
        assert abs(weight.mean()) < 0.05 * std
    assert np.all(layer["attn"]["Wqkv"]["bias"] == 0) and np.all(layer["ffn"]["down_proj"]["bias"] == 0)
    assert np.all(layer["norm_1"]["scale"] == 1) and np.all(p["norm_f"]["bias"] == 0)

    plain_init = InitConfig(init_div_is_residual=False, emb_init_std=0.02)
    p = numpy_params(build(dataclasses.replace(cfg, init_config=plain_init), perturb=False))
    assert p["blocks"]["attn"]["out_proj"]["kernel"][0].std() == pytest.approx(kaiming, rel=0.02)
    assert p["wte"]["embedding"].std() == pytest.approx(0.02, rel=0.02)


def test_bf16_compute_close_to_fp32():
    model = build(make_cfg(attn=dict(qk_ln=True)))
    ids = token_ids()
    fp32 = model(ids)
    bf16 = model(ids, compute_dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, fp32, atol=0.1)
    assert np.corrcoef(np.ravel(bf16), np.ravel(fp32))[0, 1] > 0.999


@pytest.mark.parametrize("scan", [True, False])
def test_parameter_logical_axis_names(scan):
    cfg = make_cfg(no_bias=False, tie_word_embeddings=False, attn=dict(qk_ln=True), ffn=dict(ffn_type="mptglu"),
                   scan_layers=scan)  # fmt: skip
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(build(cfg, perturb=False), nnx.Param)))
    block = specs["blocks"] if scan else specs["blocks"][1]
    lead = ("layers",) if scan else ()
    expected = {
        ("attn", "Wqkv", "kernel"): ("embed", "heads"),
        ("attn", "Wqkv", "bias"): ("heads",),
        ("attn", "out_proj", "kernel"): ("heads", "embed"),
        ("attn", "q_ln", "scale"): ("norm",),
        ("ffn", "up_proj", "kernel"): ("embed", "mlp"),
        ("ffn", "gate_proj", "kernel"): ("embed", "mlp"),
        ("ffn", "down_proj", "kernel"): ("mlp", "embed"),
        ("ffn", "down_proj", "bias"): ("embed",),
        ("norm_1", "scale"): ("norm",),
    }
    for path, names in expected.items():
        node = block
        for key in path:
            node = node[key]
        assert tuple(node) == lead + names, path
    assert tuple(specs["wte"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
    assert tuple(specs["norm_f"]["bias"]) == ("norm",)


@pytest.mark.parametrize(
    "cfg",
    [
        make_cfg(),
        make_cfg(attn=dict(attn_type="grouped_query_attention", kv_n_heads=2, qk_ln=True)),
        make_cfg(attn=dict(attn_type="multiquery_attention"), no_bias=False, scan_layers=False),
        make_cfg(no_bias=False, tie_word_embeddings=False, attn=dict(alibi=False)),
        make_cfg(ffn=dict(ffn_type="mptglu"), expansion_ratio=3, no_bias=False, attn=dict(qk_ln=True)),
    ],
    ids=["tiny", "gqa_qk_ln", "mqa_bias", "untied_learned_pos", "glu_bias"],
)
def test_param_count_formula_matches_built_model(cfg):
    model = build(cfg, perturb=False)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == mpt_param_count(cfg)


PRESET_COUNTS = {
    "125m": 123_685_632,
    "350m": 353_682_432,
    "760m": 757_016_064,
    "1b": 1_311_344_640,
    "3b": 2_645_854_720,
    "7b": 6_649_286_656,
    "30b": 29_957_200_896,
    "70b": 64_838_967_296,
}


@pytest.mark.parametrize("name", list(PRESET_COUNTS))
def test_preset_parameter_counts(name):
    path = PRESETS / f"{name}.yaml"
    cfg = load_config(str(path), notices=[]).model
    assert mpt_param_count(cfg) == PRESET_COUNTS[name]
    assert f"{PRESET_COUNTS[name]:,}" in path.read_text().splitlines()[1]  # the documented figure
    if name in ("125m", "7b"):  # the built model, abstractly (no memory), has exactly that many
        abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
        assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == PRESET_COUNTS[name]


def test_released_model_shapes():
    mpt_7b = load_config(str(PRESETS / "7b.yaml"), notices=[])
    assert (mpt_7b.model.d_model, mpt_7b.model.n_heads, mpt_7b.model.n_layers) == (4096, 32, 32)
    assert mpt_param_count(mpt_7b.model) / 1e9 == pytest.approx(6.65, abs=0.005)
    mpt_30b = load_config(str(PRESETS / "30b.yaml"), notices=[])
    assert (mpt_30b.model.d_model, mpt_30b.model.n_heads, mpt_30b.model.max_seq_len) == (7168, 64, 8192)
    assert mpt_param_count(mpt_30b.model) / 1e9 == pytest.approx(29.95, abs=0.01)


@pytest.mark.parametrize(
    "attn, key",
    [(dict(prefix_lm=True), "prefix_lm"), (dict(rope=True), "rope"), (dict(sliding_window_size=128), "sliding_window"),
     (dict(attn_type="grouped_query_attention", kv_n_heads=3), "kv_n_heads")],  # fmt: skip
)
def test_unsupported_options_raise(attn, key):
    with pytest.raises(ValueError, match=key):
        build_model(make_cfg(attn=attn), rngs=nnx.Rngs(0))


def test_registry_rejects_unknown_name_and_long_inputs():
    with pytest.raises(ValueError, match="mpt_causal_lm"):
        build_model(make_cfg(name="gpt9"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_seq_len"):
        build(make_cfg(), perturb=False)(token_ids(length=17))


def test_every_remat_choice_has_a_policy():
    """``model.remat`` is validated against one list; the model maps each choice but ``auto``
    (settled by the trainer before the model is built) to a checkpoint policy."""
    from jaxtrain.config.validate import REMAT_CHOICES
    from jaxtrain.models.mpt import REMAT_POLICIES

    assert set(REMAT_CHOICES) == {*REMAT_POLICIES, "auto"}


def test_the_config_check_knows_every_registered_model():
    """``model.name`` is checked before JAX starts, against the names the registry builds."""
    from jaxtrain.config.validate import MODEL_NAMES
    from jaxtrain.models import MODEL_REGISTRY

    assert set(MODEL_NAMES) == set(MODEL_REGISTRY)

"""KV-cache generation against the float64 NumPy forward of test_mpt.py (MosaicML's definition)."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain.convert import save_model
from jaxtrain.inference import Sampling, generate, pad_prompts
from jaxtrain.inference.cli import main as generate_main
from test_mpt import REFERENCE_CASES, VOCAB, build, numpy_params, ref_forward

PROMPTS = [[5, 9, 1, 33, 7, 2, 60], [11, 4], [3, 3, 8, 21]]
NEW_TOKENS = 6
CASES = {
    "mha": REFERENCE_CASES["mha"],
    "gqa_unrolled": dataclasses.replace(REFERENCE_CASES["gqa"], scan_layers=False),
    "mqa_six_heads": dataclasses.replace(
        REFERENCE_CASES["six_heads"], attn_config=dataclasses.replace(
            REFERENCE_CASES["six_heads"].attn_config, attn_type="multiquery_attention")),
    "learned_positions": REFERENCE_CASES["learned_positions"],
}


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


def reference_next_logits(cfg, params, sequence):
    return ref_forward(cfg, params, np.asarray([sequence]))[0, -1]


@pytest.mark.parametrize(
    "name, padding_side",
    [("mha", "left"), ("mha", "right"), ("gqa_unrolled", "right"), ("mqa_six_heads", "left"),
     ("learned_positions", "right"), ("learned_positions", "left")],
)
def test_cached_logits_equal_full_forward(name, padding_side):
    """Every generated position's logits equal a full forward over that sequence alone, unpadded."""
    cfg = CASES[name]
    model = build(cfg)
    params = numpy_params(model)
    result = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, padding_side=padding_side, return_logits=True)
    for row, prompt in enumerate(PROMPTS):
        sequence = list(prompt)
        assert len(result.tokens[row]) == NEW_TOKENS
        for step in range(NEW_TOKENS):
            expected = reference_next_logits(cfg, params, sequence)
            np.testing.assert_allclose(result.logits[row, step], expected, atol=1e-4, rtol=1e-4)
            sequence.append(int(np.argmax(expected)))  # greedy by full forward
        assert result.tokens[row] == sequence[len(prompt):]


def test_prefill_logits_cover_every_prompt_position():
    cfg = CASES["gqa_unrolled"]
    model = build(cfg)
    ids, positions = pad_prompts(PROMPTS, pad_token_id=0, padding_side="left")
    logits, cache = model.decode(jnp.asarray(ids), jnp.asarray(positions), model.init_cache(len(PROMPTS), 16))
    assert cache.key.shape == (cfg.n_layers, len(PROMPTS), 16, 2, cfg.d_model // cfg.n_heads)
    assert np.all(np.asarray(cache.index) == ids.shape[1])
    for row, prompt in enumerate(PROMPTS):
        expected = ref_forward(cfg, numpy_params(model), np.asarray([prompt]))[0]
        np.testing.assert_allclose(logits[row, ids.shape[1] - len(prompt):], expected, atol=1e-4, rtol=1e-4)


def test_sampling_options():
    model = build(CASES["mha"])
    greedy = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS).tokens
    top_k_one = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, sampling=Sampling(temperature=1.5, top_k=1), seed=4)
    assert top_k_one.tokens == greedy
    tiny_nucleus = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, sampling=Sampling(temperature=1.0, top_p=1e-6))
    assert tiny_nucleus.tokens == greedy
    sampled = [generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, sampling=Sampling(1.0), seed=s).tokens for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    # top-k=3: every sampled token is among the 3 most likely under the reference forward
    params = numpy_params(model)
    result = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, sampling=Sampling(2.0, top_k=3), seed=7)
    for prompt, tokens in zip(PROMPTS, result.tokens):
        for step, token in enumerate(tokens):
            logits = reference_next_logits(CASES["mha"], params, list(prompt) + tokens[:step])
            assert token in np.argsort(logits)[-3:]


def test_stop_sequences_and_eos_stop():
    model = build(CASES["mha"])
    greedy = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS).tokens
    stop = greedy[0][-2:]
    result = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_sequences=[stop, [VOCAB + 1]])
    for row, tokens in enumerate(greedy):  # each row ends right after its first stop sequence, if any
        ends = [i + 2 for i in range(NEW_TOKENS - 1) if tokens[i : i + 2] == stop]
        assert result.tokens[row] == tokens[: ends[0] if ends else NEW_TOKENS]
        assert result.stopped[row] == bool(ends)
    assert result.stopped[0]
    eos = greedy[1][1]
    result = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    first_eos = greedy[1].index(eos)  # generation ends with the first EOS, included
    assert result.tokens[1] == greedy[1][: first_eos + 1] and result.stopped[1]


def test_too_long_request_is_refused():
    model = build(CASES["mha"])
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=16"):
        generate(model, [[1] * 12], max_new_tokens=5)


def test_generate_command(tmp_path, capsys, caplog):
    from jaxtrain.data.tokenizer import _train_bpe

    tokenizer = _train_bpe(["def add(a, b):\n    return a + b\n" * 20, "class Point:\n    pass\n" * 20], 300)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    cfg = dataclasses.replace(CASES["mha"], vocab_size=320, max_seq_len=32)
    params = nnx.to_pure_dict(nnx.state(build(cfg), nnx.Param))
    save_model(str(tmp_path / "ckpt"), cfg, params, tokenizer_path=str(tmp_path / "tokenizer.json"))
    code = generate_main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "def ", "--prompt", "class P",
                          "--max-new-tokens", "5", "--top-k", "5", "--temperature", "0.8", "--seed", "1"])
    out, err = capsys.readouterr()
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("def ") and any(line.startswith("class P") for line in lines)
    assert "tokens/s" in err
    # reading the checkpoint logs nothing (Orbax warns about read-only managers unless quietened)
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]

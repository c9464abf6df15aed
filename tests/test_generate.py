"""KV-cache generation against the float64 NumPy forward of test_mpt.py (MosaicML's definition) and
against transformers' ``MptForCausalLM.generate`` and sampling warpers (outputs recorded by
tests/fixtures/generate_hf/make_reference.py)."""

import dataclasses
import importlib
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx

from jaxtrain.checkpoint.load import load_checkpoint
from jaxtrain.convert import import_hf, save_model
from jaxtrain.inference import Sampling, generate, pad_prompts, penalize_repeats, sample_logits, warp_logits
from jaxtrain.inference.cli import build_parser, sampling_from_args, token_texts
from jaxtrain.inference.cli import main as generate_main
from test_mpt import REFERENCE_CASES, VOCAB, build, numpy_params, ref_forward

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HF_REFERENCE = json.loads((FIXTURES / "generate_hf" / "reference.json").read_text())
generate_module = importlib.import_module("jaxtrain.inference.generate")

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


def test_bf16_cache_decoding_stays_close_to_the_reference():
    """bf16 products and a bf16 cache: each step's float32 logits are within bf16 rounding of the
    float64 forward over the sequence generated so far."""
    cfg = CASES["mha"]
    model = build(cfg)
    params = numpy_params(model)
    result = generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, compute_dtype=jnp.bfloat16, return_logits=True)
    assert result.logits.dtype == np.float32
    for row, prompt in enumerate(PROMPTS):
        tokens = result.tokens[row]
        assert len(tokens) == NEW_TOKENS
        for step in range(NEW_TOKENS):
            expected = reference_next_logits(cfg, params, list(prompt) + tokens[:step])
            np.testing.assert_allclose(result.logits[row, step], expected, atol=0.1)
            assert tokens[step] == int(np.argmax(result.logits[row, step]))


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
                          "--max-new-tokens", "5", "--top-k", "5", "--temperature", "0.8", "--seed", "1",
                          "--stop", "\n\n\n\n"])
    out, err = capsys.readouterr()
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("def ") and any(line.startswith("class P") for line in lines)
    assert "tokens/s" in err
    # reading the checkpoint logs nothing (Orbax warns about read-only managers unless quietened)
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    # a tokenizer whose ids the model's vocabulary lacks: refused, not decoded from NaN logits
    small = dataclasses.replace(cfg, vocab_size=64)
    save_model(str(tmp_path / "small"), small, nnx.to_pure_dict(nnx.state(build(small), nnx.Param)),
               tokenizer_path=str(tmp_path / "tokenizer.json"))
    code = generate_main(["--checkpoint", str(tmp_path / "small"), "--prompt", "class Point", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is outside the model's vocabulary (0..63)" in err[0], err


def test_generate_command_chats_with_the_template_the_model_was_tuned_with(tmp_path, capsys):
    """--chat renders each prompt as a user's message (after --system's) with the chat template
    saved beside the checkpoint's tokenizer, adds the generation prompt, and prints the reply
    alone; the run's tokenizer.kwargs.chat_template, when it set one, comes first."""
    from types import SimpleNamespace

    from jaxtrain.data.tokenizer import _train_bpe, tokenizer_from_file

    pytest.importorskip("jinja2")
    tokenizer = _train_bpe(["[user] hello there\n[assistant] hi, how are you\n" * 20], 300)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    source = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}[assistant] {% endif %}")
    (tmp_path / "chat_template.jinja").write_text(source)
    cfg = dataclasses.replace(CASES["mha"], vocab_size=320, max_seq_len=48)
    model = build(cfg)
    save_model(str(tmp_path / "ckpt"), cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
               tokenizer_path=str(tmp_path / "tokenizer.json"))
    code = generate_main(["--checkpoint", str(tmp_path / "ckpt"), "--chat", "--system", "be brief", "--prompt", "hello",
                          "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert code == 0
    saved = tokenizer_from_file(str(tmp_path / "ckpt" / "tokenizer.json"), what="the checkpoint's tokenizer")
    rendered = "[system] be brief\n[user] hello\n[assistant] "
    reply = generate(load_checkpoint(str(tmp_path / "ckpt")).module(), [saved.encode(rendered)], max_new_tokens=6,
                     eos_token_id=saved.eos_token_id, pad_token_id=None).tokens[0]
    assert out == saved.decode(reply, skip_special_tokens=True) + "\n"
    # the run's own template (tokenizer.kwargs.chat_template) wins over the saved one
    loaded = SimpleNamespace(tokenizer_path=str(tmp_path / "ckpt" / "tokenizer.json"), meta={"config": {
        "tokenizer": {"kwargs": {"chat_template": "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"}}}})
    args = build_parser().parse_args(["--checkpoint", "c", "--prompt", "hi", "--prompt", "yo", "--chat"])
    from jaxtrain.inference.cli import chat_texts

    assert chat_texts(args, loaded, saved) == ["<hi>", "<yo>"]
    assert chat_texts(args, SimpleNamespace(tokenizer_path=loaded.tokenizer_path, meta={}), saved) == [
        "[user] hi\n[assistant] ", "[user] yo\n[assistant] "]


# ----------------------------------------------------------------------------- against transformers


@pytest.fixture(scope="module")
def hf_mha(tmp_path_factory):
    """tests/fixtures/hf_mpt/mha (ALiBi, vocabulary 128) converted from transformers' weights."""
    out = tmp_path_factory.mktemp("hf_mha") / "ckpt"
    import_hf(str(FIXTURES / "hf_mpt" / "mha"), str(out))
    return load_checkpoint(str(out)).module()


def test_batch_greedy_with_eos_ids_matches_transformers(hf_mha):
    """Prompts of different lengths, two EOS ids, no pad id: each row equals transformers' up to and
    including its first EOS (transformers fills a finished row with the first EOS id)."""
    ref = HF_REFERENCE
    eos = ref["eos_token_id"]
    expected = [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in ref["batch"]]
    assert [len(row) for row in expected] == [8, 2, 8]  # rows stop at different steps
    for side in ("left", "right"):
        result = generate(hf_mha, ref["prompts"], max_new_tokens=ref["max_new_tokens"], eos_token_id=eos,
                          pad_token_id=None, padding_side=side)
        assert result.tokens == expected and result.stopped == [True, True, True]


def test_stop_strings_match_transformers(hf_mha):
    """Stop strings are found in the text, across a token boundary and inside one token, as with
    transformers' ``stop_strings``: each row ends with the token that completes one."""
    ref = HF_REFERENCE["stop_strings"]
    backend = tokenizers.Tokenizer.from_file(str(FIXTURES / "generate_hf" / "tokenizer.json"))
    for stop in ref["stops"]:  # neither stop string's own encoding is generated: only the text shows it
        encoded = backend.encode(stop, add_special_tokens=False).ids
        assert not any(row[i : i + len(encoded)] == encoded for row in ref["greedy"] for i in range(len(row)))
    result = generate(hf_mha, HF_REFERENCE["prompts"], max_new_tokens=HF_REFERENCE["max_new_tokens"],
                      stop_strings=ref["stops"], token_texts=token_texts(backend))
    assert result.tokens == ref["tokens"] and result.stopped == [True, True, True]


def test_top_k_top_p_min_p_keep_what_transformers_keeps():
    """Temperature, then top-k (ties at the k-th value kept), then top-p: the smallest set of most
    likely tokens whose mass reaches p, ties broken as transformers' stable sort breaks them; then
    min-p: the tokens at least min_p times as likely as the most likely one."""
    cases = HF_REFERENCE["warpers"]
    quarter = np.log([[0.5, 0.25, 0.125, 0.125]])
    by_hand = [(quarter, Sampling(1.0, top_p=0.8), 3),  # 0.875 >= 0.8
               (quarter, Sampling(1.0, top_p=0.75), 2),  # 0.75 >= 0.75
               (np.zeros((1, 2)), Sampling(1.0, top_p=0.5), 1),
               (quarter, Sampling(1.0, top_k=10**6), 4)]
    # a temperature so small that logits / temperature overflows still samples the most likely token
    rows = np.tile([[1.0, 3.0, 2.0, 2.5]], (8, 1))

    def everything():  # one compiled program for all cases
        hf = [warp_logits(jnp.asarray([c["logits"]], jnp.float32),
                          Sampling(c["temperature"], c["top_k"], c["top_p"], min_p=c["min_p"])) for c in cases]
        hand = [warp_logits(jnp.asarray(logits, jnp.float32), sampling) for logits, sampling, _ in by_hand]
        return hf, hand, sample_logits(jnp.asarray(rows, jnp.float32), jax.random.key(0), Sampling(1e-40))

    hf, hand, tiny = jax.jit(everything)()
    for case, logits in zip(cases, hf):
        assert np.isfinite(np.asarray(logits[0])).tolist() == case["kept"], case
    assert [int(np.isfinite(logits).sum()) for logits in hand] == [kept for _, _, kept in by_hand]
    assert tiny.tolist() == [1] * 8


def test_repetition_penalty_matches_transformers(hf_mha):
    """Greedy decoding with a repetition penalty above and below 1 continues each prompt as
    transformers' ``repetition_penalty`` does (the prompts batched here, left-padded: the padding
    is not text and is not penalised), and the penalty then the warpers give transformers' scores."""
    ref = HF_REFERENCE["repetition_penalty"]
    plain = HF_REFERENCE["stop_strings"]["greedy"]
    for penalty, expected in ref["greedy"].items():
        result = generate(hf_mha, HF_REFERENCE["prompts"], max_new_tokens=HF_REFERENCE["max_new_tokens"],
                          sampling=Sampling(repetition_penalty=float(penalty)))
        assert result.tokens == expected, penalty
        assert expected != plain  # the penalty changed what greedy decoding writes

    def scores(case):
        seen = jnp.zeros((1, len(case["logits"])), bool).at[0, jnp.asarray(case["text"])].set(True)
        sampling = Sampling(case["temperature"], case["top_k"], case["top_p"], case["penalty"])
        return warp_logits(penalize_repeats(jnp.asarray([case["logits"]]), seen, case["penalty"]), sampling)[0]

    for case in ref["processors"]:
        ours = np.asarray(scores(case))
        theirs = np.asarray([-np.inf if x is None else x for x in case["scores"]], np.float32)
        assert np.isfinite(ours).tolist() == np.isfinite(theirs).tolist(), case
        # transformers warps without subtracting the row's maximum first: equal up to a constant
        kept = np.isfinite(theirs)
        np.testing.assert_allclose(ours[kept] - ours[kept].max(), theirs[kept] - theirs[kept].max(), rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(ValueError, match="repetition_penalty=0.0 must be a finite number > 0"):
        Sampling(repetition_penalty=0.0)


# ----------------------------------------------------------------------------- requests


def test_generate_refuses_bad_requests():
    """Ids the embedding lacks (which would read NaN or wrap around) and malformed options."""
    model = build(CASES["mha"])  # vocabulary 64
    cases = [
        (dict(prompts=[[1, 64]]), r"prompt 1: token id 64 is outside the model's vocabulary \(0\.\.63\)"),
        (dict(prompts=[[3], [-1, 3]]), r"prompt 2: token id -1 is outside"),
        (dict(prompts=[1, 2, 3]), "one sequence of token ids per prompt"),
        (dict(pad_token_id=64), "pad_token_id=64 is outside"),
        (dict(eos_token_id=[3, None]), "eos_token_id"),
        (dict(seed=2**32), r"seed=4294967296 must be in \[0, 2\*\*32\)"),
        (dict(stop_strings=["x"]), "stop_strings need token_texts"),
        (dict(stop_strings=[""], token_texts=["a"] * 64), "an empty stop string"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(model, **{"prompts": [[1, 2]], "max_new_tokens": 2, **kwargs})
    for temperature in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            Sampling(temperature)


def test_array_prompts_and_padding_reuse_one_program():
    """Prompts as an array; padding to a width beyond max_seq_len - max_new_tokens is fine (positions
    count from each prompt's start); same shapes with other prompts and seed compile nothing."""
    cfg = CASES["mha"]  # max_seq_len 16
    model = build(cfg)
    params = numpy_params(model)
    prompts = np.asarray([[5, 9, 1], [3, 3, 8]])
    expected = []
    for prompt in prompts.tolist():
        sequence = list(prompt)
        for _ in range(3):
            sequence.append(int(np.argmax(reference_next_logits(cfg, params, sequence))))
        expected.append(sequence[3:])
    assert generate(model, prompts, max_new_tokens=3, pad_to=14).tokens == expected
    misses = generate_module._compiled.cache_info().misses
    again = generate(model, jnp.asarray(prompts[::-1]), max_new_tokens=3, pad_to=14, seed=5)
    assert again.tokens == expected[::-1] and generate_module._compiled.cache_info().misses == misses
    with pytest.raises(ValueError, match="prompt of 14 tokens \\+ max_new_tokens=3 exceeds"):
        generate(model, [[1] * 14], max_new_tokens=3)


def test_generate_command_refuses_mistakes(capsys):
    """One line and status 2; top-k or top-p without a temperature sample at temperature 1."""
    mistakes = [(["--stop", ""], "--stop"), (["--seed", str(2**70)], "--seed"), (["--seed", "-1"], "--seed"),
                (["--temperature", "inf"], "--temperature"), (["--temperature", "0", "--top-k", "5"], "--top-k"),
                (["--temperature", "0", "--top-p", "0.5"], "--top-p"), (["--temperature", "0", "--min-p", "0.1"], "--min-p"),
                (["--min-p", "1.5"], "--min-p"), (["--repetition-penalty", "0"], "--repetition-penalty"),
                (["--repetition-penalty", "nan"], "--repetition-penalty"), (["--system", "be brief"], "--system")]
    for extra, flag in mistakes:  # refused before the checkpoint is read
        code = generate_main(["--checkpoint", "no-such-folder", "--prompt", "x", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {flag}"), (extra, err)
    parse = build_parser().parse_args
    assert sampling_from_args(parse(["--checkpoint", "c", "--prompt", "p", "--top-k", "5"])) == Sampling(1.0, 5, 1.0)
    assert sampling_from_args(parse(["--checkpoint", "c", "--prompt", "p"])) == Sampling(0.0, 0, 1.0)
    assert sampling_from_args(parse(["--checkpoint", "c", "--prompt", "p", "--repetition-penalty", "1.2"])) == Sampling(
        0.0, 0, 1.0, 1.2)
    assert sampling_from_args(parse(["--checkpoint", "c", "--prompt", "p", "--min-p", "0.1"])) == Sampling(
        1.0, min_p=0.1)

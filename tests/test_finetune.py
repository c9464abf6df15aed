"""Fine-tuning data, checked against LLM Foundry's definition (llmfoundry/data/finetuning: tasks.py,
collator.py; llmfoundry/data/packing.py): tokenization, labels, truncation, packing, chat turns,
and one-line errors for malformed lines. Expected arrays are written out by hand."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx

from jaxtrain.config import ConfigError, load_config_dict
from jaxtrain.config.schema import AttnConfig, DatasetConfig, ModelConfig, TokenizerConfig
from jaxtrain.data.build import build_loaders
from jaxtrain.data.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, chat_template, chat_turns
from jaxtrain.data.finetune import (FinetuneOptions, build_rows, finetune_options, read_examples, stitch_turns,
                                    tokenize_examples)
from jaxtrain.data.tokenizer import Tokenizer
from jaxtrain.models import build_model
from test_input_errors import as_trainer_reports

X = -100  # ignored label
EOS = PAD = 15  # the character tokenizer's EOS, also its padding: a=0 b=1 ... m=12
# A second character tokenizer for chat text: a..z = 0..25, " " 26, "\n" 27, then ChatML's markers and EOS.
ALPHABET = "abcdefghijklmnopqrstuvwxyz \n"
START, END, CHAT_EOS = 28, 29, 30


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def char_tokenizer() -> Tokenizer:
    vocab = {ch: i for i, ch in enumerate("abcdefghijklm \n")} | {"<|endoftext|>": EOS}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(["<|endoftext|>"])
    return Tokenizer(backend)


def write_lines(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def alphabet_tokenizer() -> Tokenizer:
    vocab = {ch: i for i, ch in enumerate(ALPHABET)}
    vocab |= {"<|im_start|>": START, "<|im_end|>": END, "<|endoftext|>": CHAT_EOS}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    backend.add_tokens(["<|im_start|>", "<|im_end|>"])
    backend.add_special_tokens(["<|endoftext|>"])
    return Tokenizer(backend)


def chars(text):
    return [ALPHABET.index(ch) for ch in text]


def stitched(tokenizer, path, options=FinetuneOptions(), eos=EOS, template=None):
    examples = read_examples([str(path)])
    return [stitch_turns(turns, eos, options) for turns in tokenize_examples(tokenizer, examples, template)]


def pairs(tmp_path):
    return write_lines(tmp_path / "ft.jsonl", [{"prompt": "ab", "response": "cd"}, {"prompt": "efg", "response": "h"}])


def loader_config(tmp_path, data, *, dataset=None, attn=None, tokenizer=None, max_seq_len=8):
    path = write_lines(tmp_path / "ft.jsonl", data)
    (tokenizer or char_tokenizer()).save(str(tmp_path / "tokenizer.json"))
    return load_config_dict({
        "max_seq_len": max_seq_len, "global_train_batch_size": 2, "device_train_microbatch_size": 2,
        "model": {"d_model": 32, "n_heads": 4, "n_layers": 1, "vocab_size": 32, "max_seq_len": max_seq_len,
                  "attn_config": attn or {"alibi": True, "attn_uses_sequence_id": True}},
        "tokenizer": {"name": str(tmp_path / "tokenizer.json")},
        "train_loader": {"dataset": {"source": "finetune_jsonl", "local": str(path), "shuffle": False,
                                     **(dataset or {})}},
    })


# ----------------------------------------------------------------------------- prompt/response examples


def test_prompt_then_response_then_eos_with_loss_on_response(tmp_path):
    # Foundry: input_ids = prompt + response + EOS; labels ignore the prompt (target_prompts none);
    # "completion" names the response as well as "response" does
    path = write_lines(tmp_path / "ft.jsonl", [{"prompt": "ab", "response": "cd"}, {"prompt": "ab", "completion": "cd"}])
    examples = stitched(char_tokenizer(), path)
    assert examples == [([0, 1, 2, 3, EOS], [X, X, 2, 3, EOS])] * 2
    rows = build_rows(examples[:1], max_seq_len=6, pad_token_id=PAD, pack=False)
    np.testing.assert_array_equal(rows.input_ids, [[0, 1, 2, 3, EOS, PAD]])
    np.testing.assert_array_equal(rows.labels, [[X, X, 2, 3, EOS, X]])
    np.testing.assert_array_equal(rows.sequence_id, [[0, 0, 0, 0, 0, 1]])


def test_unpacked_by_default_and_truncation_keeps_the_start(tmp_path):
    tokenizer = char_tokenizer()
    # no packing_ratio: one example per row, as Foundry's collator without BinPackCollator
    rows = build_rows(stitched(tokenizer, pairs(tmp_path)), max_seq_len=12, pad_token_id=PAD, pack=False)
    np.testing.assert_array_equal(rows.input_ids, [[0, 1, 2, 3, EOS] + [PAD] * 7, [4, 5, 6, 7, EOS] + [PAD] * 7])
    np.testing.assert_array_equal(rows.labels, [[X, X, 2, 3, EOS] + [X] * 7, [X, X, X, 7, EOS] + [X] * 7])
    # max_seq_len 3: input_ids[:3]; the second keeps no response token, so it is dropped
    short = build_rows(stitched(tokenizer, pairs(tmp_path)), max_seq_len=3, pad_token_id=PAD, pack=False)
    np.testing.assert_array_equal(short.input_ids, [[0, 1, 2]])
    np.testing.assert_array_equal(short.labels, [[X, X, 2]])
    assert (short.num_examples, short.num_skipped, short.num_truncated) == (1, 1, 1)


def test_tokenizer_bos_starts_the_prompt_once_and_eos_is_not_doubled(tmp_path):
    tokenizer = char_tokenizer()
    tokenizer.backend.add_special_tokens(["<s>"])  # id 16
    tokenizer.backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 16)])
    path = write_lines(tmp_path / "ft.jsonl", [{"prompt": "ab", "response": "cd"},
                                               {"prompt": "a", "response": "b<|endoftext|>"}])
    # text=prompt and text_target=response both get BOS; the response's is removed; EOS only if missing
    assert stitched(tokenizer, path) == [([16, 0, 1, 2, 3, EOS], [X, X, X, 2, 3, EOS]),
                                         ([16, 0, 1, EOS], [X, X, 1, EOS])]


def test_empty_prompt_or_response_is_dropped_with_a_notice(tmp_path, capsys):
    cfg = loader_config(tmp_path, [{"prompt": "", "response": "ab"}, {"prompt": "ab", "response": ""},
                                   {"prompt": "ab", "response": "c"}, {"prompt": "ab", "response": "cd"}])
    train, _, _ = build_loaders(cfg, cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(train.rows, [[0, 1, 2, EOS] + [PAD] * 4, [0, 1, 2, 3, EOS, PAD, PAD, PAD]])
    assert "of 4 fine-tuning examples, 2 dropped" in capsys.readouterr().err


@pytest.mark.parametrize("options,labels", [
    (FinetuneOptions(target_prompts="all"), [0, 1, 2, 3, EOS]),
    (FinetuneOptions(target_prompts="length>=3"), [X, X, 2, 3, EOS]),
    (FinetuneOptions(target_prompts="length>=2"), [0, 1, 2, 3, EOS]),
])
def test_target_prompts(options, labels):
    assert stitch_turns([([0, 1], [2, 3])], EOS, options) == ([0, 1, 2, 3, EOS], labels)


def test_foundry_dataset_options_are_checked(tmp_path, capsys):
    assert finetune_options(DatasetConfig(packing_ratio="auto", target_responses="ALL"), key="k") \
        == FinetuneOptions("none", "all", float("inf"))
    for extra, problem in [({"packing_ratio": 0.5}, "k.packing_ratio=0.5 must be a number >= 1 or auto"),
                           ({"target_prompts": "length>=x"}, "k.target_prompts='length>=x' is unknown"),
                           ({"target_responses": "first"}, "k.target_responses='first' is unknown"),
                           ({"decoder_only_format": False}, "k.decoder_only_format=false asks for encoder-decoder")]:
        with pytest.raises(ConfigError, match=problem):
            finetune_options(DatasetConfig(**extra), key="k")
    cfg = loader_config(tmp_path, [{"prompt": "ab", "response": "cd"}] * 4, dataset={"packing_ratio": 2},
                        attn={"alibi": True}, max_seq_len=16)
    train, _, _ = build_loaders(cfg, cache_dir=str(tmp_path / "cache"))  # as Foundry: packed, with a notice
    assert len(train.rows) == 2  # two examples a row
    assert "packed examples attend to the ones before them" in capsys.readouterr().err


# ----------------------------------------------------------------------------- packing


def test_packing_masks_the_first_label_of_each_later_example():
    # target_prompts all: Foundry's packer sets labels[0] of every example added to a bin to -100
    examples = [stitch_turns(turns, EOS, FinetuneOptions("all")) for turns in ([([0, 1], [2])], [([4], [5])])]
    rows = build_rows(examples, max_seq_len=8, pad_token_id=PAD, pack=True)
    np.testing.assert_array_equal(rows.input_ids, [[0, 1, 2, EOS, 4, 5, EOS, PAD]])
    np.testing.assert_array_equal(rows.labels, [[0, 1, 2, EOS, X, 5, EOS, X]])
    np.testing.assert_array_equal(rows.sequence_id, [[0, 0, 0, 0, 1, 1, 1, 2]])


def test_numeric_packing_ratio_averages_that_many_examples_per_row():
    examples = [([i, EOS], [X, EOS]) for i in range(6)]
    rows = build_rows(examples, max_seq_len=16, pad_token_id=PAD, pack=True, packing_ratio=1.5)
    assert [int(r.max()) for r in rows.sequence_id] == [2, 1, 2, 1]  # 2, 1, 2, 1 examples (+ padding's id)
    assert len(build_rows(examples, max_seq_len=16, pad_token_id=PAD, pack=True).input_ids) == 1  # auto


def test_build_loaders_packs_only_with_packing_ratio(tmp_path, capsys):
    data = [{"prompt": "ab", "response": "cd"}, {"prompt": "efg", "response": "h"},
            {"prompt": "k", "response": "lm"}, {"prompt": "ij", "response": "k"}]
    unpacked, _, _ = build_loaders(loader_config(tmp_path, data), cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(unpacked.rows[2:], [[10, 11, 12, EOS] + [PAD] * 4, [8, 9, 10, EOS] + [PAD] * 4])
    cfg = loader_config(tmp_path, data, dataset={"packing_ratio": "auto"})
    train, _, _ = build_loaders(cfg, cache_dir=str(tmp_path / "cache"))
    batch = next(train)
    # examples of 5, 5, 4 and 4 tokens packed in order into rows of 8: [abcd+EOS], [efgh+EOS], [klm+EOS ijk+EOS]
    np.testing.assert_array_equal(batch["input_ids"][0], [0, 1, 2, 3, EOS, PAD, PAD, PAD])
    np.testing.assert_array_equal(batch["labels"][0], [X, X, 2, 3, EOS, X, X, X])
    np.testing.assert_array_equal(batch["sequence_id"][0], [0, 0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(train.rows[2], [10, 11, 12, EOS, 8, 9, 10, EOS])
    np.testing.assert_array_equal(train.labels[2], [X, 11, 12, EOS, X, X, 10, EOS])
    np.testing.assert_array_equal(train.sequence_id[2], [0, 0, 0, 0, 1, 1, 1, 1])
    assert "packing_ratio=auto: 4 examples packed into 3 rows (1.33 per row)" in capsys.readouterr().err


def test_sequence_id_keeps_packed_examples_apart():
    cfg = ModelConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=16, max_seq_len=16,
                      attn_config=AttnConfig(alibi=True, attn_uses_sequence_id=True))
    model = build_model(cfg, rngs=nnx.Rngs(3))
    first, second = [0, 1, 2, 3, EOS], [4, 5, 6, 7, EOS]
    pads = [PAD] * 7
    # one forward: the packed row, each example alone (right padding cannot reach back under causal
    # attention), and the packed row again with one sequence id for everything (the leaky control)
    ids = jnp.asarray([first + second + [PAD, PAD], first + pads, second + pads, first + second + [PAD, PAD]])
    sequence_id = jnp.asarray([[0] * 5 + [1] * 5 + [2, 2], [0] * 12, [0] * 12, [0] * 12])
    logits = np.asarray(model(ids, sequence_id=sequence_id))
    np.testing.assert_allclose(logits[0, 5:10], logits[2, :5], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[0, :5], logits[1, :5], atol=1e-5, rtol=1e-5)
    assert np.abs(logits[3, 5:10] - logits[2, :5]).max() > 1e-3


# ----------------------------------------------------------------------------- chat examples

CONVERSATION = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                             {"role": "user", "content": "go"}, {"role": "assistant", "content": "no"}]}


def chatml_prompt(content):  # "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    return [START] + chars("user\n" + content) + [END] + chars("\n") + [START] + chars("assistant\n")


@pytest.mark.parametrize("target_responses", ["last", "all"])
def test_chat_turns_with_the_default_chatml_template(tmp_path, target_responses):
    path = write_lines(tmp_path / "chat.jsonl", [CONVERSATION])
    p1, r1 = chatml_prompt("hi"), chars("ok") + [END] + chars("\n")
    p2, r2 = chatml_prompt("go"), chars("no") + [END] + chars("\n") + [CHAT_EOS]  # EOS ends the last response
    first = r1 if target_responses == "all" else [X] * len(r1)
    assert stitched(alphabet_tokenizer(), path, FinetuneOptions(target_responses=target_responses), CHAT_EOS) == [
        (p1 + r1 + p2 + r2, [X] * len(p1) + first + [X] * len(p2) + r2)]


def test_default_template_is_foundrys_chatml_jinja():
    pytest.importorskip("jinja2")
    messages = (("system", "be brief"), ("user", "hi"), ("assistant", "ok"))
    text = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    jinja = ChatTemplate.from_jinja(DEFAULT_CHAT_TEMPLATE, "t")
    for add in (False, True):
        expected = text + ("<|im_start|>assistant\n" if add else "")
        assert ChatTemplate.default().render(messages, add_generation_prompt=add) == expected
        assert jinja.render(messages, add_generation_prompt=add) == expected


def test_tokenizers_own_chat_template_and_config_template(tmp_path):
    pytest.importorskip("jinja2")
    source = ("{% for m in messages %}{{ m['role'][0] }} {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}a {% endif %}")
    alphabet_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": source}))
    beside = chat_template(TokenizerConfig(name=str(tmp_path / "tokenizer.json")))
    messages = (("user", "hi"), ("assistant", "ok"))
    assert chat_turns(messages, beside, "w") == [("u hi\na ", "ok\n")]
    by_kwarg = chat_template(TokenizerConfig(name="bpe:default", kwargs={
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    assert by_kwarg.origin == "tokenizer.kwargs.chat_template"
    assert chat_template(TokenizerConfig(name="bpe:default")).origin == "the default ChatML template"
    path = write_lines(tmp_path / "c.jsonl", [{"messages": [dict(role=r, content=c) for r, c in messages]}])
    rows = stitched(alphabet_tokenizer(), path, eos=CHAT_EOS, template=beside)
    assert rows == [(chars("u hi\na ") + chars("ok\n") + [CHAT_EOS], [X] * 7 + chars("ok\n") + [CHAT_EOS])]
    broken = ChatTemplate.from_jinja("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                     "{% if not add_generation_prompt %}x{% endif %}", "tokenizer.kwargs.chat_template")
    with pytest.raises(ConfigError, match=r"^f:3: tokenizer.kwargs.chat_template does not render this conversation turn"):
        chat_turns(tuple((m["role"], m["content"]) for m in CONVERSATION["messages"]), broken, "f:3")


@pytest.mark.parametrize("source, missing", [
    ("{% for m in messages %}<{{ m['role'] }}>\n{% endfor %}", "user and assistant"),  # markup alone
    ("{{ messages[0]['content'] }}", "assistant"),
    ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}", "user"),
])
def test_a_template_that_leaves_out_what_messages_say_is_refused_when_read(source, missing, tmp_path):
    """Such a template would train the model on role names and markup: refused as it is read,
    naming where it came from. One that trims the text (as Llama 3's does) renders it still."""
    pytest.importorskip("jinja2")
    with pytest.raises(ConfigError, match=rf"^tokenizer.kwargs.chat_template renders a conversation without its "
                                          rf"{missing} messages' text .*use a template that writes each message's"):
        chat_template(TokenizerConfig(name="bpe:default", kwargs={"chat_template": source}))
    alphabet_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": source}))
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'tokenizer_config.json'} chat_template renders"):
        chat_template(TokenizerConfig(name=str(tmp_path / "tokenizer.json")))
    trimmed = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | trim }}\n{% endfor %}"
    assert chat_template(TokenizerConfig(name="bpe:default", kwargs={"chat_template": trimmed})).origin


def test_chat_rows_through_build_loaders(tmp_path):
    conversation = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    cfg = loader_config(tmp_path, [conversation] * 2, tokenizer=alphabet_tokenizer(), max_seq_len=32)
    train, _, _ = build_loaders(cfg, cache_dir=str(tmp_path / "cache"))
    prompt, response = chatml_prompt("a"), chars("b") + [END] + chars("\n") + [CHAT_EOS]
    pad = 32 - len(prompt) - len(response)
    np.testing.assert_array_equal(train.rows[0], prompt + response + [CHAT_EOS] * pad)
    np.testing.assert_array_equal(train.labels[0], [X] * len(prompt) + response + [X] * pad)


# ----------------------------------------------------------------------------- mistakes in the data


@pytest.mark.parametrize("line,problem", [
    (['{"prompt": "a", "response": "b"}', "{not json"], ":2 is not valid JSON"),
    ('{"prompt": 3, "response": "b"}', ":1 field 'prompt' is int, not a string"),
    ('{"prompt": "a", "response": ["b"]}', ":1 field 'response' is list, not a string"),
    ('{"prompt": "a"}', ":1 has no field 'response'"),
    ('"prompt: a, response: b"', ":1 is a JSON string, not an object"),
    ('{"text": "a"}', ":1 has neither 'prompt'/'response' nor 'messages' ('text')"),
    ('{"turns": []}', ":1 has neither 'prompt'/'response' nor 'messages' ('turns') ('turns' holds Foundry's"),
    ('{"prompt": "a", "response": "b", "completion": "c"}', ":1 has both 'response' and 'completion'"),
    ('{"prompt": "a", "response": "b", "messages": []}', ":1 has both 'messages' and prompt/response"),
    ('{"messages": "hi"}', ":1 field 'messages' is str, not a list of messages"),
    ('{"messages": [{"role": "assistant", "content": "b"}]}', ":1 has 1 message(s); a chat example needs at least two"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}', ":1 message 1 has keys ['role']"),
    ('{"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}', ":1 message 0 has role 'bot'"),
    ('{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "b"}]}', ":1 message 0 content is int"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', ":1 message 1 repeats role 'user'"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}', ":1 ends with a 'user' message"),
])
def test_bad_line_is_one_line_naming_path_line_and_fix(line, problem, tmp_path, capsys):
    path = write_lines(tmp_path / "ft.jsonl", [line] if isinstance(line, str) else line)
    with pytest.raises(ConfigError) as error:
        read_examples([str(path)])
    report = as_trainer_reports(error.value, capsys)
    assert report.startswith(f"error: {path}{problem}") and report.endswith("fix or remove that line")


def test_empty_file_and_json_array_file(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError) as error:
        read_examples([str(empty)])
    assert as_trainer_reports(error.value, capsys).startswith(f"error: {empty} is empty: write one example per line")
    array = tmp_path / "ft.json"
    array.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "c",\n   "response": "d"}\n]\n')
    assert [(e.prompt, e.where) for e in read_examples([str(array), str(empty)])] == [
        ("a", f"{array}:2"), ("c", f"{array}:3")]
    array.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": 1, "response": "d"}\n]\n')
    with pytest.raises(ConfigError, match=rf"^{array}:3 field 'prompt' is int"):
        read_examples([str(array)])


def test_prompt_response_pairs_train_end_to_end(tmp_path):
    """A run on prompt/response JSONL through the real entry point: loss on responses falls."""
    import subprocess
    import sys

    from test_end_to_end import ROOT, step_losses

    rows = [{"prompt": f"What is {a} plus {b}?\n", "response": f"{a + b}"} for a in range(20) for b in range(10)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    sets = [
        "variables.max_seq_len=64", "model.d_model=64", "model.n_layers=2", "model.vocab_size=1024",
        "tokenizer.kwargs.vocab_size=1024", "train_loader.dataset.source=finetune_jsonl",
        f"train_loader.dataset.local={tmp_path / 'pairs.jsonl'}", "eval_loader=null", "global_train_batch_size=8",
        "device_train_microbatch_size=4", "progress_bar=false", f"run_folder={tmp_path / 'run'}", "save_folder=null",
        "max_duration=30ba", "eval_interval=0", "model.attn_config.attn_uses_sequence_id=true",
        "train_loader.dataset.packing_ratio=auto",
    ]
    args = [sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"]
    for item in sets:
        args += ["--set", item]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = step_losses(tmp_path / "run")
    assert len(losses) == 30 and sum(list(losses.values())[-5:]) / 5 < losses[1] - 2.0


def test_a_file_with_a_byte_order_mark_reads_as_without_one(tmp_path):
    from jaxtrain.data.finetune import read_examples

    plain, marked = tmp_path / "plain.jsonl", tmp_path / "marked.jsonl"
    plain.write_text(json.dumps({"prompt": "ab", "response": "cd"}) + "\n")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert [(e.prompt, e.response) for e in read_examples([str(marked)])] == [
        (e.prompt, e.response) for e in read_examples([str(plain)])]

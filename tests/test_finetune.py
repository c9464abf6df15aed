"""Prompt/response fine-tuning data: response-only labels, and packing that keeps examples apart."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain.config import ConfigError, load_config_dict
from jaxtrain.config.schema import AttnConfig, ModelConfig
from jaxtrain.data.finetune import build_rows, example_tokens, read_examples
from jaxtrain.data.build import build_loaders
from jaxtrain.models import build_model
from test_eval import char_tokenizer

X = -100  # ignored label
EOS = PAD = 15  # the character tokenizer's EOS, also its padding


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def write_examples(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tokenized(tmp_path):
    path = write_examples(tmp_path / "ft.jsonl", [{"prompt": "ab", "response": "cd"}, {"prompt": "efg", "response": "h"}])
    tokenizer = char_tokenizer()
    return [example_tokens(tokenizer, example, EOS) for example in read_examples([str(path)])]


def test_packed_labels_ignore_prompt_and_padding(tmp_path):
    rows = build_rows(tokenized(tmp_path), max_seq_len=12, pad_token_id=PAD, pack=True)
    # "ab"+"cd"+EOS then "efg"+"h"+EOS, then two pads: a=0 b=1 c=2 d=3 e=4 f=5 g=6 h=7
    np.testing.assert_array_equal(rows.input_ids, [[0, 1, 2, 3, EOS, 4, 5, 6, 7, EOS, PAD, PAD]])
    np.testing.assert_array_equal(rows.labels, [[X, X, 2, 3, EOS, X, X, X, 7, EOS, X, X]])
    np.testing.assert_array_equal(rows.sequence_id, [[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2]])


def test_unpacked_rows_and_truncation(tmp_path):
    rows = build_rows(tokenized(tmp_path), max_seq_len=6, pad_token_id=PAD, pack=False)
    np.testing.assert_array_equal(rows.input_ids, [[0, 1, 2, 3, EOS, PAD], [4, 5, 6, 7, EOS, PAD]])
    np.testing.assert_array_equal(rows.labels, [[X, X, 2, 3, EOS, X], [X, X, X, 7, EOS, X]])
    # a row of 3 keeps "ab" + "c" of the first example; the second's prompt fills it, so it is skipped
    short = build_rows(tokenized(tmp_path), max_seq_len=3, pad_token_id=PAD, pack=True)
    np.testing.assert_array_equal(short.labels, [[X, X, 2]])
    assert (short.num_examples, short.num_skipped) == (1, 1)


def test_missing_field_names_the_line(tmp_path):
    path = write_examples(tmp_path / "ft.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a"}])
    with pytest.raises(ConfigError, match=r"ft\.jsonl:2 has no field 'response'"):
        read_examples([str(path)])


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


def test_build_loaders_serves_labels_and_sequence_ids(tmp_path):
    write_examples(tmp_path / "ft.jsonl", [{"prompt": "ab", "response": "cd"}, {"prompt": "efg", "response": "h"},
                                           {"prompt": "k", "response": "lm"}, {"prompt": "ij", "response": "k"}])
    char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    cfg = load_config_dict({
        "max_seq_len": 8, "global_train_batch_size": 2, "device_train_microbatch_size": 2,
        "model": {"d_model": 32, "n_heads": 4, "n_layers": 1, "vocab_size": 16, "max_seq_len": 8,
                  "attn_config": {"alibi": True, "attn_uses_sequence_id": True}},
        "tokenizer": {"name": str(tmp_path / "tokenizer.json")},
        "train_loader": {"dataset": {"source": "finetune_jsonl", "local": str(tmp_path / "ft.jsonl"),
                                     "shuffle": False}},
    })
    train, _, _ = build_loaders(cfg, cache_dir=str(tmp_path / "cache"))
    batch = next(train)
    # examples of 5, 5, 4 and 4 tokens packed in order into rows of 8: [abcd+EOS], [efgh+EOS], [klm+EOS ijk+EOS]
    np.testing.assert_array_equal(batch["input_ids"][0], [0, 1, 2, 3, EOS, PAD, PAD, PAD])
    np.testing.assert_array_equal(batch["labels"][0], [X, X, 2, 3, EOS, X, X, X])
    np.testing.assert_array_equal(batch["sequence_id"][0], [0, 0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(train.rows[2], [10, 11, 12, EOS, 8, 9, 10, EOS])
    np.testing.assert_array_equal(train.labels[2], [X, 11, 12, EOS, X, X, 10, EOS])
    np.testing.assert_array_equal(train.sequence_id[2], [0, 0, 0, 0, 1, 1, 1, 1])


def test_prompt_response_pairs_train_end_to_end(tmp_path):
    """A run on prompt/response JSONL through the real entry point: loss on responses falls."""
    import json as _json
    import subprocess
    import sys

    from test_end_to_end import ROOT, step_losses

    rows = [{"prompt": f"What is {a} plus {b}?\n", "response": f"{a + b}"} for a in range(20) for b in range(10)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(_json.dumps(row) for row in rows) + "\n")
    sets = [
        "variables.max_seq_len=64", "model.d_model=64", "model.n_layers=2", "model.vocab_size=1024",
        "tokenizer.kwargs.vocab_size=1024", "train_loader.dataset.source=finetune_jsonl",
        f"train_loader.dataset.local={tmp_path / 'pairs.jsonl'}", "eval_loader=null", "global_train_batch_size=8",
        "device_train_microbatch_size=4", "progress_bar=false", f"run_folder={tmp_path / 'run'}", "save_folder=null",
        "max_duration=30ba", "eval_interval=0", "model.attn_config.attn_uses_sequence_id=true",
    ]
    args = [sys.executable, "-m", "jaxtrain.main", "--config", "configs/quickstart.yaml"]
    for item in sets:
        args += ["--set", item]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = step_losses(tmp_path / "run")
    assert len(losses) == 30 and sum(list(losses.values())[-5:]) / 5 < losses[1] - 2.0

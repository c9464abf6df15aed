"""Tokens as LLM Foundry and Composer count them: fine-tuning rows without their padding (the
attention mask's sum), packed text rows whole; FLOPs and MFU with the padded length; the run's
token total, which checkpoints keep; durations in tokens refused on fine-tuning data.

Runs here are in process, on a one-layer model and a character tokenizer (a..m, space, newline;
EOS, also the padding id, 15), so each example's length is known without jaxtrain's help:
prompt + response + EOS characters, cut at max_seq_len. A resumed run's token totals are checked
in test_loggers, with its metrics.jsonl."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from jaxtrain.config import ConfigError, load_config_dict
from jaxtrain.data.build import build_loaders
from jaxtrain.data.finetune import build_rows
from jaxtrain.metrics.tokens import TrainTokens, batch_tokens, row_tokens
from jaxtrain.train.loop import Trainer
from jaxtrain.train.setup import build_run
from test_finetune import EOS, PAD, X, char_tokenizer, write_lines

SEQ = 8
# 8 examples, one row each unless packed: lengths 5, 5, 8 (fills its row), 12 (cut to 8), 3, 4, 6, 7
EXAMPLES = [("ab", "cd"), ("efg", "h"), ("abc", "defg"), ("a", "bcdefghijk"), ("k", "l"), ("ij", "k"),
            ("m", "abcd"), ("lm", "abcd")]


def example_tokens(prompt: str, response: str) -> int:
    return min(len(prompt) + len(response) + 1, SEQ)


def finetune_config(folder: Path, *, dataset: dict | None = None, **run):
    """A fine-tuning run on ``EXAMPLES`` (in order, one example per row unless ``dataset`` packs)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = write_lines(folder / "ft.jsonl", [{"prompt": p, "response": r} for p, r in EXAMPLES])
    char_tokenizer().save(str(folder / "tokenizer.json"))
    return load_config_dict({
        "max_seq_len": SEQ, "global_train_batch_size": 2, "device_train_microbatch_size": 2, "precision": "fp32",
        "model": {"d_model": 32, "n_heads": 4, "n_layers": 1, "vocab_size": 32, "max_seq_len": SEQ,
                  "attn_config": {"alibi": True, "attn_uses_sequence_id": True}},
        "tokenizer": {"name": str(folder / "tokenizer.json")},
        "train_loader": {"dataset": {"source": "finetune_jsonl", "local": str(data), "shuffle": False,
                                     **(dataset or {})}},
        "run_folder": str(folder / "run"), "max_duration": "4ba", "eval_interval": 0, "progress_bar": False,
        "log_to_console": False, "scheduler": {"t_warmup": "1ba"}, "callbacks": {"speed_monitor": {"window_size": 1}},
        **run,
    })


def fit(cfg, parts=None):
    """(parts, result, metrics.jsonl records) of a run of ``cfg`` in this process. ``parts``: those
    of an earlier run of ``cfg`` (its compiled step), for a run that resumes from its checkpoints
    and run folder alone, as a new process would."""
    with contextlib.redirect_stdout(io.StringIO()):
        parts = parts or build_run(cfg)
        try:
            result = Trainer(parts).fit()
        finally:
            parts.train_loader.close()
    lines = (Path(cfg.run_folder) / "metrics.jsonl").read_text().splitlines()
    return parts, result, [json.loads(line) for line in lines]


def train_records(records: list[dict]) -> dict[int, dict]:
    return {record["step"]: record for record in records if "train/loss" in record}


# ----------------------------------------------------------------------------- counting rows


def test_padding_is_the_last_segment_without_a_trained_label():
    # rows as build_rows lays them out: one example with padding, one filling the row, two packed
    # with padding, and one packed pair filling the row (a padding id that is also EOS, so the
    # input ids cannot tell padding apart)
    labels = np.array([[X, X, 2, EOS, X, X, X, X], [X, 1, 2, 3, 4, 5, 6, EOS], [X, 1, EOS, X, 4, EOS, X, X],
                       [X, 1, EOS, X, 4, 5, 6, EOS], [X] * SEQ])
    sequence_id = np.array([[0, 0, 0, 0, 1, 1, 1, 1], [0] * SEQ, [0, 0, 0, 1, 1, 1, 2, 2],
                            [0, 0, 0, 1, 1, 1, 1, 1], [0] * SEQ])  # the last: an eval batch's filler row
    np.testing.assert_array_equal(row_tokens(labels, sequence_id), [4, 8, 6, 8, 0])
    input_ids = np.full(labels.shape, PAD)
    assert batch_tokens({"input_ids": input_ids, "labels": labels, "sequence_id": sequence_id}) == 26
    assert batch_tokens({"input_ids": input_ids}) == 5 * SEQ  # packed text rows: every position


@pytest.mark.parametrize("packing_ratio", [None, 2.0, "auto"])
def test_row_counts_are_the_examples_lengths(packing_ratio):
    # every example once, however rows are packed: the rows hold exactly its tokens within max_seq_len
    tokenizer = char_tokenizer()
    stitched = []
    for prompt, response in EXAMPLES:
        ids = [tokenizer.backend.token_to_id(ch) for ch in prompt + response] + [EOS]
        stitched.append((ids, [X] * len(prompt) + ids[len(prompt):]))
    rows = build_rows(stitched, max_seq_len=SEQ, pad_token_id=PAD, pack=packing_ratio is not None,
                      packing_ratio=None if packing_ratio == "auto" else packing_ratio)
    counts = row_tokens(rows.labels, rows.sequence_id)
    assert int(counts.sum()) == sum(example_tokens(p, r) for p, r in EXAMPLES)
    assert len(counts) == len(rows.input_ids) and counts.min() > 0


def test_every_process_counts_the_whole_global_batch(tmp_path):
    # batches of 6 of the 8 rows: each epoch's last 2 rows are dropped, and every process, which
    # draws 3 rows, counts all 6
    cfg = finetune_config(tmp_path, dataset={"shuffle": True}, global_train_batch_size=6)
    single = build_loaders(cfg, cache_dir=str(tmp_path / "cache"))[0]
    expected = [batch_tokens(next(single)) for _ in range(3)]
    assert len(set(expected)) > 1  # each epoch's batch holds other rows
    loaders = [build_loaders(cfg, cache_dir=str(tmp_path / "cache"), process_index=index, process_count=2)[0]
               for index in range(2)]
    counters = [TrainTokens(loader, 6 * SEQ) for loader in loaders]
    for step in range(3):
        counts = []
        for loader, counter in zip(loaders, counters):
            state = loader.state_dict()
            counts.append(counter.count(next(loader), (state["epoch"], state["sample_in_epoch"])))
        assert counts == [expected[step]] * 2


# ----------------------------------------------------------------------------- runs


def test_finetune_run_logs_tokens_without_padding_and_mfu_with_it(tmp_path):
    parts, result, records = fit(finetune_config(tmp_path))
    steps = train_records(records)
    per_step = [example_tokens(*EXAMPLES[i]) + example_tokens(*EXAMPLES[i + 1]) for i in range(0, 8, 2)]
    assert per_step == [10, 16, 7, 13]  # of 16 positions per batch
    assert [steps[step]["train/time/token"] for step in range(1, 5)] == list(np.cumsum(per_step))
    assert result.tokens == sum(per_step) == 46
    for step in range(2, 5):  # a one-step window: the rate is the step's tokens over its time
        record = steps[step]
        rate = record["train/tokens_per_second"] / record["train/batches_per_second"]
        assert rate == pytest.approx(per_step[step - 1])
        assert record["train/throughput/tokens_per_sec"] == pytest.approx(record["train/tokens_per_second"])
        # FLOPs (and MFU) count every position, as Foundry's flops_per_batch does
        flops = record["train/flops_per_second_per_device"] / record["train/batches_per_second"]
        assert flops == pytest.approx(parts.flops_per_batch)


# ----------------------------------------------------------------------------- durations


@pytest.mark.parametrize("key, value", [("max_duration", "100tok"), ("scheduler.t_warmup", "64tok"),
                                        ("eval_interval", "1ktok")])
def test_durations_in_tokens_are_refused_on_finetuning_data(tmp_path, key, value):
    section, _, name = key.rpartition(".")
    setting = {section: {name: value}} if section else {name: value}
    with pytest.raises(ConfigError, match=rf": {key}: '{value}' counts tokens, .* give it in ba or ep$"):
        finetune_config(tmp_path, **setting)  # when the config is read
    load_config_dict(setting)  # packed text: a fixed number of tokens per batch


def test_rows_an_epoch_leaves_out_are_noticed(tmp_path):
    """The last incomplete batch of each epoch is dropped; when that is a noticeable part of the
    data (here 2 of 8 rows), the run says so at start."""
    cfg = finetune_config(tmp_path, global_train_batch_size=3, device_train_microbatch_size=3, max_duration="1ep")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        parts = build_run(cfg)
    parts.train_loader.close()
    assert parts.total_batches == 2
    assert ("notice: an epoch of the training data is 2 batches of 3 rows: the other 2 of its 8 rows are left out "
            "of each epoch") in out.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        parts = build_run(finetune_config(tmp_path / "even"))  # 8 rows in batches of 2: nothing left out
    parts.train_loader.close()
    assert "left out of each epoch" not in out.getvalue()


def test_too_few_fine_tuning_rows_for_a_batch_suggest_only_what_helps(tmp_path):
    """Fine-tuning rows hold one example each: a shorter max_seq_len would make no more of them."""
    with pytest.raises(ConfigError) as error:
        build_run(finetune_config(tmp_path, global_train_batch_size=16, device_train_microbatch_size=16))
    assert "fewer than one global batch of 16: lower global_train_batch_size, or add data" in str(error.value)

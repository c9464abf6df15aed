"""Attention kept within each document of packed text rows (``model.attn_config.attn_uses_sequence_id``),
with document ids derived from the rows' tokens as LLM Foundry's text loader derives them
(llmfoundry/data/text_data.py, ConcatenatedSequenceCollatorWrapper): the running count of the
separator token, shifted one place when the separator (EOS) ends a document. Expected ids are
written out by hand from that rule."""

from __future__ import annotations

import numpy as np
import pytest

from jaxtrain.config import ConfigError, load_config_dict
from jaxtrain.config.schema import AttnConfig, Config, DatasetConfig, LoaderConfig, ModelConfig, TokenizerConfig
from jaxtrain.data import build_loaders
from jaxtrain.data.loader import BatchLoader, document_ids

E = 9  # separator token in the hand-written rows


def test_document_ids_follow_foundrys_rule():
    rows = np.array([[1, 2, E, 3, 4, E, 5, 6],
                     [E, 1, 2, 3, E, E, 4, 5],
                     [1, 2, 3, 4, 5, 6, 7, 8]])
    # EOS ends a document: the EOS itself belongs to the document it ends
    np.testing.assert_array_equal(document_ids(rows, E, starts_documents=False), [[0, 0, 0, 1, 1, 1, 2, 2],
                                                                                  [0, 1, 1, 1, 1, 2, 3, 3],
                                                                                  [0, 0, 0, 0, 0, 0, 0, 0]])
    # BOS starts a document: it belongs to the document it starts
    np.testing.assert_array_equal(document_ids(rows, E, starts_documents=True), [[0, 0, 1, 1, 1, 2, 2, 2],
                                                                                 [1, 1, 1, 1, 2, 3, 3, 3],
                                                                                 [0, 0, 0, 0, 0, 0, 0, 0]])
    assert document_ids(rows, E, starts_documents=False).dtype == np.int32


def test_loader_batches_carry_document_ids_in_training_and_evaluation():
    rows = np.array([[1, E, 2, 3], [4, 5, E, 6], [E, 7, 8, 9], [1, 2, 3, 4]], np.int32)
    loader = BatchLoader(rows, global_batch_size=2, shuffle=False, separator=(E, False))
    batch = next(loader)
    np.testing.assert_array_equal(batch["sequence_id"], document_ids(batch["input_ids"], E, starts_documents=False))
    assert batch["sequence_id"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    evaluation = list(BatchLoader(rows, global_batch_size=None, shuffle=False, separator=(E, True)).batches(3))
    assert [b["sequence_id"][:2].tolist() for b in evaluation] == [[[0, 1, 1, 1], [0, 0, 1, 1]],
                                                                    [[0, 0, 0, 0], [0, 0, 0, 0]]]
    assert "sequence_id" not in next(BatchLoader(rows, global_batch_size=2, shuffle=False))
    with pytest.raises(ValueError, match="take no document separator"):
        BatchLoader(rows, global_batch_size=2, sequence_id=np.zeros_like(rows), separator=(E, False))


def _config(tmp_path, masking: bool, **dataset) -> Config:
    (tmp_path / "docs").mkdir(exist_ok=True)
    for index in range(12):
        (tmp_path / "docs" / f"doc{index}.txt").write_text(f"word_{index} = {index}\n" * (2 + index % 4))
    data = DatasetConfig(source="text", local=str(tmp_path / "docs"), **dataset)
    return Config(max_seq_len=32, global_train_batch_size=4,
                  model=ModelConfig(vocab_size=512, attn_config=AttnConfig(alibi=True, attn_uses_sequence_id=masking)),
                  tokenizer=TokenizerConfig(name="bpe:default", kwargs={"vocab_size": 512}),
                  train_loader=LoaderConfig(dataset=data), eval_loader=LoaderConfig(dataset=data))


def test_text_rows_split_at_the_tokenizers_eos_or_the_configured_bos(tmp_path):
    cache = str(tmp_path / "cache")
    train, evaluation, tokenizer = build_loaders(_config(tmp_path, True), cache_dir=cache)
    batch = next(train)
    eos = tokenizer.eos_token_id
    assert (batch["input_ids"] == eos).any()  # the short documents are packed several to a row
    np.testing.assert_array_equal(batch["sequence_id"], document_ids(batch["input_ids"], eos, starts_documents=False))
    assert "sequence_id" in next(evaluation.batches(4))
    # documents that begin with a marker token: split before it
    marker = int(batch["input_ids"][0, 0])
    train = build_loaders(_config(tmp_path, True, bos_token_id=marker), cache_dir=cache)[0]
    batch = next(train)
    np.testing.assert_array_equal(batch["sequence_id"], document_ids(batch["input_ids"], marker, starts_documents=True))
    # without masking the batches are as before: no ids
    assert "sequence_id" not in next(build_loaders(_config(tmp_path, False), cache_dir=cache)[0])


def test_one_boundary_token_and_a_valid_id():
    base = {"model": {"vocab_size": 512, "attn_config": {"attn_uses_sequence_id": True}}}
    with pytest.raises(ConfigError, match=r"train_loader\.dataset\.bos_token_id: and eos_token_id \(0\) both mark "
                                          r"document boundaries: keep eos_token_id if documents end with EOS"):
        load_config_dict({**base, "train_loader": {"dataset": {"eos_token_id": 0, "bos_token_id": 1}}})
    with pytest.raises(ConfigError, match=r"eval_loader\.dataset\.bos_token_id: 512 is not a token id of a "
                                          r"vocabulary of 512"):
        load_config_dict({**base, "eval_loader": {"dataset": {"bos_token_id": 512}}})
    assert load_config_dict({**base, "train_loader": {"dataset": {"bos_token_id": 1}}}).train_loader.dataset.bos_token_id == 1


def test_perplexity_batches_split_documents_as_training_does():
    from jaxtrain.eval.perplexity import text_batches

    documents = [[1, 2, 3], [4, 5], [6, 7, 8, 1]]
    batch = next(text_batches(documents, seq_len=6, batch_size=2, eos_token_id=E, separate_documents=True))
    np.testing.assert_array_equal(batch["input_ids"], [[1, 2, 3, E, 4, 5], [E, 6, 7, 8, 1, E]])
    np.testing.assert_array_equal(batch["sequence_id"], document_ids(batch["input_ids"], E, starts_documents=False))
    assert batch["sequence_id"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 1, 1]]
    assert "sequence_id" not in next(text_batches(documents, seq_len=6, batch_size=2, eos_token_id=E))

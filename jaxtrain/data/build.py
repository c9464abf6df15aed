"""From a config's datasets to the train and eval ``BatchLoader``s: sources, tokenizer, packed rows, order."""

from __future__ import annotations

import os

import numpy as np

from jaxtrain.config.schema import ConfigError
from jaxtrain.data.finetune import finetune_documents, finetune_rows
from jaxtrain.data.loader import BatchLoader
from jaxtrain.data.mds.rows import TokenRows
from jaxtrain.data.order import SampleOrder, order_options, stream_weights
from jaxtrain.data.packing import load_or_pack
from jaxtrain.data.remote import open_mds_datasets, token_rows
from jaxtrain.data.shuffle import pseudo_shards
from jaxtrain.data.sources import Documents, jsonl_documents, mds_documents, text_documents
from jaxtrain.data.stdlib_corpus import stdlib_documents
from jaxtrain.data.tfds_source import tfds_documents
from jaxtrain.data.tokenizer import Tokenizer, bpe_train_max_chars, capped_texts, load_tokenizer

SOURCES = ("python_stdlib", "text", "jsonl", "mds", "tfds", "finetune_jsonl")
# Training batches are gathered by this many background threads when train_loader.num_workers is
# unset (remote streams: none, they predownload shards on a thread of their own).
DEFAULT_NUM_WORKERS = 1


def documents_for(dataset, *, key: str) -> Documents:
    """The documents a ``DatasetConfig`` names."""
    source = dataset.source
    if source == "mds":
        return mds_documents(open_mds_datasets(dataset, key=key), text_field=dataset.text_field, key=key)
    if source not in SOURCES:
        raise ConfigError(f"{key}.source={source!r} is unknown: use one of {', '.join(SOURCES)}")
    if dataset.remote:
        raise ConfigError(f"{key}.remote is set, but {source} sources read local files only: unset it or use mds")
    if source == "tfds":
        return tfds_documents(dataset, key=key)
    if source == "python_stdlib":
        return stdlib_documents(dataset.split, holdout_fraction=dataset.holdout_fraction,
                                max_files=dataset.max_files, key=key)
    if source == "text":
        return text_documents(dataset.local, dataset.split, max_files=dataset.max_files, key=key)
    if source == "finetune_jsonl":
        return finetune_documents(dataset.local, dataset.split, key=key)[0]
    return jsonl_documents(dataset.local, dataset.split, text_field=getattr(dataset, "text_field", "text"),
                           max_files=dataset.max_files, key=key)


def _pad_id(tokenizer: Tokenizer) -> int:
    # Padding rows are never trained on (labels are IGNORE_INDEX), so any valid id will do.
    return 0 if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def _packed_rows(cfg, dataset, documents: Documents, tokenizer: Tokenizer, cache_dir: str, key: str) -> np.ndarray:
    max_seq_len = dataset.max_seq_len or cfg.max_seq_len
    eos_token_id = dataset.eos_token_id if dataset.eos_token_id is not None else tokenizer.eos_token_id
    if eos_token_id is None:
        raise ConfigError(f"{key}.eos_token_id is unset and the tokenizer has no EOS token: set one of them")
    return load_or_pack(documents, tokenizer, cache_dir=cache_dir, max_seq_len=max_seq_len, eos_token_id=eos_token_id)


def _rows_for(cfg, dataset, documents: Documents, tokenizer: Tokenizer, cache_dir: str, key: str):
    """Packed token rows, or ``FinetuneRows`` (inputs, labels, sequence ids) for ``finetune_jsonl``."""
    if dataset.source == "finetune_jsonl":
        return finetune_rows(cfg, dataset, tokenizer, key=key)
    return _packed_rows(cfg, dataset, documents, tokenizer, cache_dir, key)


def _split_rows(rows) -> tuple[np.ndarray, dict]:
    """(input rows, BatchLoader keyword arguments for labels and sequence ids)."""
    labels = getattr(rows, "labels", None)
    if labels is None:
        return rows, {}
    return rows.input_ids, {"labels": labels, "sequence_id": rows.sequence_id}


def _document_separator(cfg, dataset, tokenizer: Tokenizer, key: str) -> dict:
    """BatchLoader's ``separator`` for packed text rows when the model keeps attention within each
    document (``attn_uses_sequence_id``): the BOS that starts documents, else the EOS that ends them."""
    if not cfg.model.attn_config.attn_uses_sequence_id or dataset.source == "finetune_jsonl":
        return {}
    if dataset.bos_token_id is not None:
        return {"separator": (dataset.bos_token_id, True)}
    eos_token_id = dataset.eos_token_id if dataset.eos_token_id is not None else tokenizer.eos_token_id
    if eos_token_id is None:
        raise ConfigError(f"{key}: model.attn_config.attn_uses_sequence_id needs the token between documents, and "
                          f"the tokenizer has no EOS: set {key}.eos_token_id (or bos_token_id if documents begin with BOS)")
    return {"separator": (eos_token_id, False)}


def _stream_shards(datasets) -> list[np.ndarray]:
    """Each dataset's shard sizes (one stream per dataset), empty shards left out as the rows leave them."""
    return [np.array([int(entry["samples"]) for entry in mds.shards if int(entry["samples"])], np.int64)
            for mds in datasets]


def _mds_token_rows(cfg, dataset, key: str) -> tuple[TokenRows, list[np.ndarray]] | None:
    """(rows, shard sizes of each stream) of a pre-tokenized MDS dataset (a ``tokens`` column), or None."""
    if dataset.source != "mds":
        return None
    datasets = open_mds_datasets(dataset, key=key)
    if not all("tokens" in mds.columns for mds in datasets if len(mds)):
        return None
    bytes_dtype = str((dataset.extra or {}).get("token_encoding_type", "int64"))
    if dataset.remote:
        return token_rows(datasets, dataset, seq_len=dataset.max_seq_len or cfg.max_seq_len, bytes_dtype=bytes_dtype,
                          key=key), _stream_shards(datasets)
    rows = TokenRows(datasets, seq_len=dataset.max_seq_len or cfg.max_seq_len, bytes_dtype=bytes_dtype, key=key)
    return rows, _stream_shards(datasets)


def _weighted(weights) -> bool:
    return any(getattr(weight, name) is not None for weight in weights for name in ("proportion", "repeat", "choose"))


def _stream_packed_rows(cfg, dataset, tokenizer: Tokenizer, cache_dir: str, key: str):
    """Text MDS streams with weights: each stream packed on its own, so rows never straddle streams;
    the weights (``choose``, ``epoch_size``, proportions) then count packed rows, not documents.

    Returns (rows, shard sizes of each stream) or None when the dataset is not such a mix.
    """
    if dataset.source != "mds" or not dataset.streams or not _weighted(stream_weights(dataset, key=key)):
        return None
    streams = []
    for mds in open_mds_datasets(dataset, key=key):
        documents = mds_documents([mds], text_field=dataset.text_field, key=key)
        streams.append(_packed_rows(cfg, dataset, documents, tokenizer, cache_dir, key))
    return np.concatenate(streams), [pseudo_shards(len(rows)) for rows in streams]


def train_order(dataset, streams: list[np.ndarray], *, seed: int, key: str = "train_loader.dataset") -> SampleOrder:
    """The ``SampleOrder`` a ``DatasetConfig`` asks for over streams of shards of the given sizes."""
    weights = stream_weights(dataset, key=key)
    if len(weights) != len(streams):  # rows packed together from several streams: one stream
        if _weighted(weights):
            raise ConfigError(f"{key}.streams: proportion/repeat/choose need the streams' rows kept apart; use MDS "
                              f"streams (pre-tokenized or text) for a weighted mix")
        weights = None
    return SampleOrder(streams, weights, seed=seed, key=key, **order_options(dataset, key=key))


def _pretokenized_tokenizer(cfg, dataset, cache_dir: str) -> Tokenizer:
    if cfg.tokenizer.name == "bpe:default":
        written = os.path.join(os.path.expanduser(dataset.local or "."), "tokenizer.json")
        hint = f" ({written} is the one `jaxtrain data prepare` wrote)" if os.path.isfile(written) else ""
        raise ConfigError(f"train_loader.dataset is pre-tokenized MDS, so tokenizer.name=bpe:default has no text to train "
                          f"on: set tokenizer.name to the tokenizer.json the dataset was tokenized with{hint}")
    return load_tokenizer(cfg.tokenizer, cache_dir=cache_dir)


def build_loaders(cfg, *, cache_dir: str, process_index: int = 0,
                  process_count: int = 1) -> tuple[BatchLoader, BatchLoader | None, Tokenizer]:
    """(train loader, eval loader or None, tokenizer) for a ``Config``.

    The tokenizer and the packed rows are cached under ``cache_dir``; a second call with the
    same inputs reads them back without training or tokenising. The eval loader has no global
    batch size: iterate it with ``batches(batch_size)``.
    """
    train_dataset = cfg.train_loader.dataset
    if cfg.train_loader.drop_last is False:
        raise ConfigError("train_loader.drop_last=false is not supported: training batches have a fixed shape; set it to true")
    key = "train_loader.dataset"
    seed = cfg.seed if train_dataset.shuffle_seed is None else train_dataset.shuffle_seed
    order_options(train_dataset, key=key)  # a mistake in the order options fails before any tokenizing
    stream_weights(train_dataset, key=key)
    pretokenized = _mds_token_rows(cfg, train_dataset, key)
    streams = None
    if pretokenized is not None:
        train_rows, streams = pretokenized
        tokenizer = _pretokenized_tokenizer(cfg, train_dataset, cache_dir)
    else:
        train_documents = documents_for(train_dataset, key="train_loader.dataset")
        max_chars = bpe_train_max_chars(cfg.tokenizer.kwargs)
        tokenizer = load_tokenizer(
            cfg.tokenizer,
            cache_dir=cache_dir,
            train_texts=capped_texts(train_documents.texts, max_chars),
            train_fingerprint=f"{train_documents.fingerprint}:{max_chars}",
        )
        mixed = _stream_packed_rows(cfg, train_dataset, tokenizer, cache_dir, key)
        if mixed is not None:
            train_rows, streams = mixed
        else:
            train_rows = _rows_for(cfg, train_dataset, train_documents, tokenizer, cache_dir, key)
    train_rows, train_extra = _split_rows(train_rows)
    if streams is None:
        streams = [pseudo_shards(int(train_rows.shape[0]))]
    loader_cfg = cfg.train_loader
    num_workers = loader_cfg.num_workers
    if num_workers is None:  # streamed rows predownload their shards on a thread of their own
        num_workers = 0 if getattr(train_rows, "prefetch", None) is not None else DEFAULT_NUM_WORKERS
    train_loader = BatchLoader(train_rows, global_batch_size=cfg.global_train_batch_size,
                               process_index=process_index, process_count=process_count,
                               pad_token_id=_pad_id(tokenizer), order=train_order(train_dataset, streams, seed=seed),
                               num_workers=num_workers, prefetch_factor=loader_cfg.prefetch_factor,
                               **train_extra, **_document_separator(cfg, train_dataset, tokenizer, key))
    if cfg.eval_loader is None:
        return train_loader, None, tokenizer
    eval_dataset = cfg.eval_loader.dataset
    if eval_dataset.source == "python_stdlib" and eval_dataset.split == "train":
        raise ConfigError("eval_loader.dataset.split=train would evaluate on training data: set it to eval")
    eval_rows = _mds_token_rows(cfg, eval_dataset, "eval_loader.dataset")
    eval_name = f"mds:{eval_dataset.local}"
    if eval_rows is not None:
        eval_rows = eval_rows[0]
    else:
        eval_documents = documents_for(eval_dataset, key="eval_loader.dataset")
        eval_rows, eval_name = _rows_for(cfg, eval_dataset, eval_documents, tokenizer, cache_dir,
                                         "eval_loader.dataset"), eval_documents.name
    eval_rows, eval_extra = _split_rows(eval_rows)
    if eval_rows.shape[0] == 0:
        raise ConfigError(f"eval_loader.dataset: {eval_name} has too few tokens for one sequence: add data")
    eval_loader = BatchLoader(eval_rows, global_batch_size=None, shuffle=False, process_index=process_index,
                              process_count=process_count, pad_token_id=_pad_id(tokenizer),
                              name="eval_loader", **eval_extra,
                              **_document_separator(cfg, eval_dataset, tokenizer, "eval_loader.dataset"))
    return train_loader, eval_loader, tokenizer

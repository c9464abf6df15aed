"""Data: the embedded stdlib corpus, text/JSONL sources, tokenizers, packing and loaders."""

from jaxtrain.data.build import build_loaders
from jaxtrain.data.loader import BatchLoader, epoch_order
from jaxtrain.data.packing import load_or_pack, pack_documents, pack_token_lists
from jaxtrain.data.sources import Documents, jsonl_documents, text_documents
from jaxtrain.data.stdlib_corpus import list_stdlib_files, split_files, stdlib_documents
from jaxtrain.data.tokenizer import EOS_TOKEN, Tokenizer, load_tokenizer

__all__ = [
    "EOS_TOKEN", "BatchLoader", "Documents", "Tokenizer", "build_loaders", "epoch_order", "jsonl_documents",
    "list_stdlib_files", "load_or_pack", "load_tokenizer", "pack_documents", "pack_token_lists", "split_files",
    "stdlib_documents", "text_documents",
]

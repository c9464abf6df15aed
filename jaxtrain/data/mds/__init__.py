"""MDS, MosaicML Streaming's shard format: jaxtrain's own writer and reader, byte-compatible both ways."""

from jaxtrain.data.mds.encodings import check_encoding, decode, encode, encoded_size
from jaxtrain.data.mds.reader import MDSDataset, Shard, dataset_root, mds_datasets
from jaxtrain.data.mds.rows import TokenRows
from jaxtrain.data.mds.writer import MDSWriter, parse_size

__all__ = [
    "MDSDataset", "MDSWriter", "Shard", "TokenRows", "check_encoding", "dataset_root", "decode", "encode",
    "encoded_size", "mds_datasets", "parse_size",
]

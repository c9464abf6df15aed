"""Shard-preserving shuffles of an epoch's samples: MosaicML Streaming's algorithms, sample for sample.

``get_shuffle(algo, shard_sizes, num_canonical_nodes, seed, epoch, block_size)`` returns exactly
what ``streaming.base.shuffle.get_shuffle`` returns. Units (shards, or the parts of shards an
epoch takes) are shuffled once for the run and cut into ``num_canonical_nodes`` equal contiguous
parts; each epoch reorders the units inside each part and mixes samples within a unit
(``py1s``), a block (``py1b``, ``py1br``), or a randomly sized window around each unit
(``py1e``, the default); ``py2s`` scatters samples twice, ``naive`` shuffles everything.
``interleave`` visits the parts round robin, the global order ``SampleOrder`` trains in.

``num_canonical_nodes`` defaults to Streaming's value for one physical node (1 for ``py1e``,
``py1br``, ``py1b`` and ``naive``; 64 for ``py1s`` and ``py2s``) whatever the process or host
count, so a run resumed on a different number of hosts keeps its order. ``shuffle_block_size``
defaults to Streaming's ``max(4_000_000 // ncn, 1 << 18)``.
"""

from __future__ import annotations

import numpy as np

SHUFFLE_ALGOS = ("py1e", "py1br", "py1s", "py1b", "py2s", "naive", "none")
DEFAULT_SHUFFLE_ALGO = "py1e"
# Streaming's canonical node count for one physical node: per-shard algorithms need many
# canonical nodes to mix shards; the block algorithms mix within one.
_MANY_NODE_ALGOS = ("py1s", "py2s")
MANY_CANONICAL_NODES = 64
# Packed rows from text, JSONL or the stdlib corpus have no shards: they are cut into
# pseudo-shards of this many rows, so they go through the same shuffles as MDS shards.
PSEUDO_SHARD_ROWS = 1024


def default_num_canonical_nodes(algo: str) -> int:
    """Streaming's canonical node count for a single physical node, for ``algo``."""
    return MANY_CANONICAL_NODES if algo in _MANY_NODE_ALGOS else 1


def default_block_size(num_canonical_nodes: int) -> int:
    """Streaming's ``shuffle_block_size`` default for ``num_canonical_nodes``."""
    return max(4_000_000 // num_canonical_nodes, 1 << 18)


def pseudo_shards(num_rows: int, rows_per_shard: int = PSEUDO_SHARD_ROWS) -> np.ndarray:
    """int64 sizes of consecutive pseudo-shards covering ``num_rows`` rows."""
    sizes = np.full(num_rows // rows_per_shard, rows_per_shard, np.int64)
    if num_rows % rows_per_shard:
        sizes = np.append(sizes, num_rows % rows_per_shard)
    return sizes


# ----------------------------------------------------------------------------- shuffles


def _spans(shard_sizes) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.asarray(shard_sizes, np.int64).reshape(-1)
    ends = np.cumsum(sizes)
    return ends - sizes, sizes


def _permuted(rng: np.random.Generator, count: int) -> np.ndarray:
    """A permutation of ``range(count)`` drawn as ``rng.shuffle`` would permute a list of that length."""
    order = np.arange(count)
    rng.shuffle(order)
    return order


def _cut(begins: np.ndarray, sizes: np.ndarray, num_parts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lay the spans end to end and cut them at the boundaries of ``num_parts`` equal parts.

    Returns (begin, size, part) of each piece; pieces are in layout order, and a span that crosses
    a part boundary becomes two pieces (never one of zero size).
    """
    total = int(sizes.sum())
    layout_ends = np.cumsum(sizes)
    layout_starts = layout_ends - sizes
    bounds = np.arange(1, num_parts + 1, dtype=np.int64) * total // num_parts
    cuts = np.union1d(layout_ends[sizes > 0], bounds)
    cuts = cuts[cuts > 0]
    starts = np.concatenate([[0], cuts[:-1]]).astype(np.int64)
    span = np.searchsorted(layout_starts, starts, side="right") - 1
    # A span of size zero shares its start with the next one: searchsorted picks the last, non-empty one.
    piece_begins = begins[span] + starts - layout_starts[span]
    part = np.searchsorted(bounds, starts, side="right")
    return piece_begins, cuts - starts, part


def _epoch_pieces(shard_sizes, num_canonical_nodes: int, seed: int, epoch: int):
    """Pieces of the run's shard layout, reordered within each canonical node for ``epoch``.

    Returns (begins, sizes, node bounds into the piece list, epoch generator).
    """
    begins, sizes = _spans(shard_sizes)
    run_order = _permuted(np.random.default_rng(seed), len(sizes))
    begins, sizes, part = _cut(begins[run_order], sizes[run_order], num_canonical_nodes)
    node_bounds = np.searchsorted(part, np.arange(num_canonical_nodes + 1))
    rng = np.random.default_rng(seed + epoch)
    order = np.arange(len(sizes))
    for node in range(num_canonical_nodes):
        low, high = node_bounds[node], node_bounds[node + 1]
        order[low:high] = low + _permuted(rng, high - low)
    return begins[order], sizes[order], node_bounds, rng


def _shuffled_range(rng: np.random.Generator, begin: int, size: int, dtype=np.int64) -> np.ndarray:
    values = np.arange(begin, begin + size, dtype=dtype)
    rng.shuffle(values)
    return values


def _block_bounds(block_size: int) -> tuple[int, int]:
    return int(0.75 * block_size), int(1.25 * block_size)


def _shuffle_py1s(shard_sizes, num_canonical_nodes, seed, epoch, block_size):
    begins, sizes, _, rng = _epoch_pieces(shard_sizes, num_canonical_nodes, seed, epoch)
    parts = [_shuffled_range(rng, int(b), int(s)) for b, s in zip(begins, sizes)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _shuffle_py1b(shard_sizes, num_canonical_nodes, seed, epoch, block_size):
    begins, sizes, node_bounds, rng = _epoch_pieces(shard_sizes, num_canonical_nodes, seed, epoch)
    ids = _ranges(begins, sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)])[node_bounds]
    for node in range(num_canonical_nodes):
        for start in range(int(starts[node]), int(starts[node + 1]), block_size):
            rng.shuffle(ids[start:min(start + block_size, int(starts[node + 1]))])
    return ids


def _shuffle_py1br(shard_sizes, num_canonical_nodes, seed, epoch, block_size):
    begins, sizes, node_bounds, rng = _epoch_pieces(shard_sizes, num_canonical_nodes, seed, epoch)
    ids = _ranges(begins, sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)])[node_bounds]
    low, high = _block_bounds(block_size)
    staggers = rng.integers(0, low, (num_canonical_nodes,))
    for node in range(num_canonical_nodes):
        first, last, stagger = int(starts[node]), int(starts[node + 1]), int(staggers[node])
        blocks, position = [], first
        while position < last:
            width = int(rng.integers(low, high))
            start, stop = max(position - stagger, first), min(position + width - stagger, last)
            blocks.append((start, stop))
            position += stop - start
        for start, stop in blocks:
            rng.shuffle(ids[start:stop])
    return ids


def _shuffle_py1e(shard_sizes, num_canonical_nodes, seed, epoch, block_size):
    begins, sizes, node_bounds, rng = _epoch_pieces(shard_sizes, num_canonical_nodes, seed, epoch)
    low, high = _block_bounds(block_size)
    out = []
    for node in range(num_canonical_nodes):
        node_sizes = sizes[node_bounds[node]:node_bounds[node + 1]]
        node_begins = begins[node_bounds[node]:node_bounds[node + 1]]
        count = int(node_sizes.sum())
        if count == 0:
            continue  # more canonical nodes than samples: this one has none
        # Samples of each piece, mixed within the piece, laid out piece after piece.
        samples = _ranges(node_begins, node_sizes)
        offset = 0
        for size in node_sizes.tolist():
            rng.shuffle(samples[offset:offset + size])
            offset += size
        # Then each piece's samples move by a uniform shift, at most half a random block either way
        # (less when the piece is larger than the block), staying inside the canonical node.
        positions = np.arange(count, dtype=np.float64)
        offset = 0
        for size in node_sizes.tolist():
            reach = max((int(rng.integers(low, high)) - size) / 2, 0)
            lower, upper = max(-reach, -offset), min(reach, count - offset - size)
            positions[offset:offset + size] += rng.uniform(low=lower, high=upper, size=size)
            offset += size
        out.append(samples[np.argsort(positions)])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _shuffle_py2s(shard_sizes, num_canonical_nodes, seed, epoch, block_size):
    begins, sizes = _spans(shard_sizes)
    run_rng = np.random.default_rng(seed)
    run_order = _permuted(run_rng, len(sizes))
    # Every shard's samples are scattered once for the run, in the run's shard order.
    samples = [_shuffled_range(run_rng, int(begins[s]), int(sizes[s])) for s in run_order]
    layout = np.concatenate(samples) if samples else np.zeros(0, np.int64)
    starts, piece_sizes, part = _cut(np.concatenate([[0], np.cumsum(sizes[run_order])[:-1]]).astype(np.int64),
                                     sizes[run_order], num_canonical_nodes)
    node_bounds = np.searchsorted(part, np.arange(num_canonical_nodes + 1))
    rng = np.random.default_rng(seed + epoch)
    out = []
    for node in range(num_canonical_nodes):
        low, high = node_bounds[node], node_bounds[node + 1]
        for piece in (low + _permuted(rng, high - low)).tolist():
            values = layout[starts[piece]:starts[piece] + piece_sizes[piece]].copy()
            rng.shuffle(values)
            out.append(values)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _shuffle_naive(shard_sizes, num_canonical_nodes, seed, epoch, block_size):
    return np.random.default_rng(seed + epoch).permutation(int(np.sum(shard_sizes, dtype=np.int64)))


def _shuffle_none(shard_sizes, num_canonical_nodes, seed, epoch, block_size):
    return np.arange(int(np.sum(shard_sizes, dtype=np.int64)), dtype=np.int64)


def _ranges(begins: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(b, b + s)`` for each (b, s)."""
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    starts = np.cumsum(sizes) - sizes
    return np.arange(total, dtype=np.int64) + np.repeat(begins - starts, sizes)


_SHUFFLES = {"py1e": _shuffle_py1e, "py1br": _shuffle_py1br, "py1s": _shuffle_py1s, "py1b": _shuffle_py1b,
             "py2s": _shuffle_py2s, "naive": _shuffle_naive, "none": _shuffle_none}


def get_shuffle(algo: str, shard_sizes, num_canonical_nodes: int, seed: int, epoch: int,
                block_size: int = 1 << 18) -> np.ndarray:
    """int64[sum(shard_sizes)]: the shuffled sample ids of ``epoch``, as Streaming's ``get_shuffle``.

    ``shard_sizes`` are the samples of each shard (or shuffle unit) in order; sample ids number
    them consecutively. ``none`` is the identity. Shards of no samples are not supported (Streaming
    shuffles them into other positions); ``SampleOrder`` drops them before it gets here.
    """
    if algo not in _SHUFFLES:
        raise ValueError(f"unknown shuffle algorithm {algo!r}: use one of {', '.join(SHUFFLE_ALGOS)}")
    if num_canonical_nodes < 1 or block_size < 1 or seed < 0 or epoch < 0:
        raise ValueError(f"get_shuffle needs num_canonical_nodes >= 1, block_size >= 1, seed >= 0, epoch >= 0 "
                         f"(got {num_canonical_nodes}, {block_size}, {seed}, {epoch})")
    return np.asarray(_SHUFFLES[algo](shard_sizes, int(num_canonical_nodes), int(seed), int(epoch), int(block_size)),
                      np.int64)


def interleave(num_samples: int, num_canonical_nodes: int) -> np.ndarray:
    """int64[num_samples]: positions of a shuffle visited round robin over its canonical nodes.

    The shuffle's samples fall into ``num_canonical_nodes`` consecutive parts (part ``c`` starts at
    ``c * n // ncn``); the global order takes the first sample of each part, then the second of
    each, and so on, skipping parts that have run out.
    """
    if num_canonical_nodes == 1:
        return np.arange(num_samples, dtype=np.int64)
    bounds = np.arange(num_canonical_nodes + 1, dtype=np.int64) * num_samples // num_canonical_nodes
    lengths = np.diff(bounds)
    steps = np.arange(int(lengths.max(initial=0)), dtype=np.int64)[:, None]
    positions = bounds[None, :-1] + steps
    return positions[steps < lengths[None, :]]

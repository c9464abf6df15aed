"""The sample order of a training epoch: MosaicML Streaming's stream mixing and shard-local shuffles.

An epoch is built in three steps, each a pure function of its inputs, as MosaicML Streaming
builds it, so a dataset trained here and by Streaming sees the same samples in the same order:

1. **Stream weights** (``stream_choose``): how many samples each stream contributes per epoch.
   A stream has at most one of ``proportion`` (relative: every stream must have one; the epoch
   holds ``extra.epoch_size`` samples, default the sum of the streams' sizes), ``repeat``
   (absolute: ``int(repeat * stream size)``) or ``choose`` (absolute: that many samples). With
   no weights at all, each stream contributes itself once, or its share of ``epoch_size``.
2. **Resampling** (``resample``): a stream's count is spread over its shards; whole repeats
   take every sample of a shard, a fractional remainder takes granules of
   ``sampling_granularity`` samples from shards chosen at random per epoch (``balanced``) or
   once for the run (``fixed``), then random samples within each partly taken shard. The
   result is a list of *shuffle units* (a shard, or the part of a shard taken) and the dataset
   row behind each unit's samples.
3. **Shuffle** (``get_shuffle``): a permutation of the units' samples that keeps shards
   together. Units are shuffled once for the run and cut into ``num_canonical_nodes`` equal
   contiguous parts; each epoch reorders the units inside each part and mixes samples within a
   unit (``py1s``), a block (``py1b``, ``py1br``), or a randomly sized window around each unit
   (``py1e``, the default); ``py2s`` scatters samples twice, ``naive`` shuffles everything.
   ``get_shuffle`` returns exactly what ``streaming.base.shuffle.get_shuffle`` returns.

The global order of the epoch then visits the canonical nodes round robin (position ``k``
takes the next sample of part ``k % num_canonical_nodes``), which is the order Streaming's
partitioning gives when all canonical nodes run side by side; unlike Streaming it does not
repeat samples to even out parts of unequal length. Nothing here depends on the number of
processes or devices: each process takes its slice of every global batch.

``num_canonical_nodes`` defaults to Streaming's value for one physical node (1 for ``py1e``,
``py1br``, ``py1b`` and ``naive``; 64 for ``py1s`` and ``py2s``) whatever the process or host
count, so a run resumed on a different number of hosts keeps its order; the loader stores it
in its state. ``shuffle_block_size`` defaults to Streaming's ``max(4_000_000 // ncn, 1 << 18)``.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from jaxtrain.config.schema import ConfigError

SHUFFLE_ALGOS = ("py1e", "py1br", "py1s", "py1b", "py2s", "naive", "none")
DEFAULT_SHUFFLE_ALGO = "py1e"
SAMPLING_METHODS = ("balanced", "fixed")
# Streaming's canonical node count for one physical node: per-shard algorithms need many
# canonical nodes to mix shards; the block algorithms mix within one.
_MANY_NODE_ALGOS = ("py1s", "py2s")
MANY_CANONICAL_NODES = 64
# Packed rows from text, JSONL or the stdlib corpus have no shards: they are cut into
# pseudo-shards of this many rows, so they go through the same shuffles as MDS shards.
PSEUDO_SHARD_ROWS = 1024
WEIGHT_KEYS = ("proportion", "repeat", "choose")


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
    them consecutively. ``none`` is the identity.
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


# ----------------------------------------------------------------------------- stream mixing


@dataclasses.dataclass(frozen=True)
class StreamWeight:
    """A stream's weight: at most one of ``proportion``, ``repeat`` or ``choose``."""

    name: str = "stream"
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None


def stream_choose(samples_per_stream, weights: list[StreamWeight], epoch_size: int | None, seed: int,
                  key: str = "train_loader.dataset") -> np.ndarray:
    """int64 samples each stream contributes to every epoch (Streaming's weighting rules)."""
    samples = np.asarray(samples_per_stream, np.int64)
    relative = weights[0].proportion is not None
    unspecified = True
    for weight in weights:
        if (weight.proportion is not None) != relative:
            raise ConfigError(f"{key}.streams.{weight.name}: proportion cannot be mixed with repeat, choose or no weight "
                              f"in other streams: give every stream a proportion, or none of them")
        if any(getattr(weight, name) is not None for name in WEIGHT_KEYS):
            unspecified = False
    if relative or (unspecified and epoch_size):
        total = int(epoch_size) if epoch_size else int(samples.sum())
        if relative:
            shares = np.array([weight.proportion for weight in weights], np.float64)
        else:
            shares = samples.astype(np.float64)
        if shares.sum() <= 0:
            raise ConfigError(f"{key}.streams: every proportion is 0: give at least one stream a positive proportion")
        shares /= shares.sum()
        chosen = (total * shares).astype(np.int64)
        shortfall = total - int(chosen.sum())
        chosen[np.random.default_rng(seed).choice(len(weights), shortfall, False)] += 1
        return chosen
    if epoch_size:
        raise ConfigError(f"{key}.extra.epoch_size is set, but streams are weighted by repeat or choose, which fix the "
                          f"epoch size themselves: unset epoch_size, or weight the streams by proportion")
    chosen = np.zeros(len(weights), np.int64)
    for index, weight in enumerate(weights):
        if weight.repeat is not None:
            chosen[index] = int(weight.repeat * samples[index])
        elif weight.choose is not None:
            chosen[index] = int(weight.choose)
        else:
            chosen[index] = samples[index]
    return chosen


def shard_choose(samples_per_shard, choose: int, granularity: int, seed: int, epoch: int,
                 use_epoch: bool) -> np.ndarray:
    """int64 samples to take from each shard of one stream (Streaming's ``get_sampling``).

    Whole repeats take every shard the same number of times; the fractional rest is filled with
    granules of ``granularity`` samples from shards picked in a random order (per epoch when
    ``use_epoch``).
    """
    sizes = np.asarray(samples_per_shard, np.int64)
    total = int(sizes.sum())
    if choose % total == 0:
        return sizes * choose // total
    picks = (sizes + granularity - 1) // granularity
    pick_shard = np.repeat(np.arange(len(sizes)), picks)
    pick_size = np.full(int(picks.sum()), granularity, np.int64)
    pick_size[np.cumsum(picks) - 1] = sizes - (picks - 1) * granularity
    ordering = np.random.default_rng(seed + epoch if use_epoch else seed).permutation(len(pick_size))
    rest = choose % total
    taken = np.minimum(pick_size[ordering], np.maximum(rest - (np.cumsum(pick_size[ordering]) - pick_size[ordering]), 0))
    counts = sizes * (choose // total)
    np.add.at(counts, pick_shard[ordering], taken)
    return counts


# ----------------------------------------------------------------------------- the epoch order


@dataclasses.dataclass(frozen=True)
class OrderParams:
    """What fixes a run's order besides the data: stored in the loader state, so resumes keep it."""

    shuffle_algo: str = DEFAULT_SHUFFLE_ALGO
    num_canonical_nodes: int = 1
    shuffle_block_size: int = 1 << 22
    shuffle_seed: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class SampleOrder:
    """The global row order of each epoch over streams of shards (see the module doc).

    ``streams`` holds each stream's shard sizes (rows per shard, empty shards left out); rows
    are numbered consecutively across streams and shards. ``order(epoch)`` is the int64 list of
    rows of that epoch, ``epoch_size`` long, the same for every process count.
    """

    def __init__(self, streams: list, weights: list[StreamWeight] | None = None, *, seed: int = 0,
                 shuffle_algo: str = DEFAULT_SHUFFLE_ALGO, num_canonical_nodes: int | None = None,
                 shuffle_block_size: int | None = None, sampling_method: str = "balanced",
                 sampling_granularity: int = 1, epoch_size: int | None = None, key: str = "train_loader.dataset"):
        self.streams = [np.asarray(sizes, np.int64).reshape(-1) for sizes in streams]
        self.streams = [sizes[sizes > 0] for sizes in self.streams]
        self.weights = list(weights) if weights is not None else [StreamWeight(f"{i}") for i in range(len(streams))]
        self.key = key
        if len(self.weights) != len(self.streams):
            raise ValueError(f"{len(self.weights)} stream weights for {len(self.streams)} streams")
        if shuffle_algo not in SHUFFLE_ALGOS:
            raise ConfigError(f"{key}.extra.shuffle_algo={shuffle_algo!r} is unknown: use one of {', '.join(SHUFFLE_ALGOS)}")
        if sampling_method not in SAMPLING_METHODS:
            raise ConfigError(f"{key}.extra.sampling_method={sampling_method!r} is unknown: use balanced or fixed")
        ncn = default_num_canonical_nodes(shuffle_algo) if num_canonical_nodes is None else int(num_canonical_nodes)
        block = default_block_size(ncn) if shuffle_block_size is None else int(shuffle_block_size)
        for name, value, least in (("num_canonical_nodes", ncn, 1), ("shuffle_block_size", block, 1),
                                   ("sampling_granularity", sampling_granularity, 1)):
            if value < least:
                raise ConfigError(f"{key}.extra.{name}={value} must be a positive integer")
        if seed < 0:
            raise ConfigError(f"{key}.shuffle_seed={seed} must be non-negative (Streaming's seeds are): pick another seed")
        self.params = OrderParams(shuffle_algo, ncn, block, int(seed))
        self.sampling_method = sampling_method
        self.sampling_granularity = int(sampling_granularity)
        self.epoch_size_setting = epoch_size
        per_stream = np.array([int(sizes.sum()) for sizes in self.streams], np.int64)
        for weight, count in zip(self.weights, per_stream):
            if count == 0 and len(self.streams) > 1:
                raise ConfigError(f"{key}.streams.{weight.name} holds no samples: remove the stream or add data")
        self.choose_per_stream = stream_choose(per_stream, self.weights, epoch_size, int(seed), key)
        self.epoch_size = int(self.choose_per_stream.sum())
        self._natural = bool((self.choose_per_stream == per_stream).all())
        self._offsets = np.concatenate([[0], np.cumsum(per_stream)]).astype(np.int64)
        self._lock = threading.Lock()
        self._cache: dict[int, np.ndarray] = {}

    @classmethod
    def over_rows(cls, num_rows: int, **kwargs) -> SampleOrder:
        """One stream of ``num_rows`` packed rows, cut into pseudo-shards of ``PSEUDO_SHARD_ROWS``."""
        return cls([pseudo_shards(num_rows)], **kwargs)

    @property
    def num_rows(self) -> int:
        return int(self._offsets[-1])

    def with_params(self, params: OrderParams) -> SampleOrder:
        """The same data and weights under other order parameters (a checkpoint's)."""
        return SampleOrder(self.streams, self.weights, seed=params.shuffle_seed, shuffle_algo=params.shuffle_algo,
                           num_canonical_nodes=params.num_canonical_nodes, shuffle_block_size=params.shuffle_block_size,
                           sampling_method=self.sampling_method, sampling_granularity=self.sampling_granularity,
                           epoch_size=self.epoch_size_setting, key=self.key)

    def resample(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shuffle unit sizes, row of each unit sample) of ``epoch`` (Streaming's ``resample_streams``)."""
        if self._natural:
            return np.concatenate(self.streams), np.arange(self.num_rows, dtype=np.int64)
        seed, shuffled = self.params.shuffle_seed, self.params.shuffle_algo != "none"
        balanced = self.sampling_method == "balanced"
        rng = np.random.default_rng(seed + epoch if balanced else seed)
        units, rows = [], []
        for sizes, choose, offset in zip(self.streams, self.choose_per_stream.tolist(), self._offsets[:-1].tolist()):
            counts = shard_choose(sizes, choose, self.sampling_granularity, seed, epoch, shuffled and balanced)
            shard_offsets = offset + np.cumsum(sizes) - sizes
            for size, count, start in zip(sizes.tolist(), counts.tolist(), shard_offsets.tolist()):
                repeats, rest = divmod(count, size)
                units += [size] * repeats
                rows += [np.arange(start, start + size, dtype=np.int64)] * repeats
                if rest:
                    units.append(rest)
                    rows.append(np.sort(start + rng.choice(size, rest, False)))
        return np.array(units, np.int64), (np.concatenate(rows) if rows else np.zeros(0, np.int64))

    def compute(self, epoch: int) -> np.ndarray:
        """int64[epoch_size]: the rows of ``epoch`` in training order (uncached)."""
        units, rows = self.resample(epoch)
        p = self.params
        if p.shuffle_algo == "none":
            return rows
        order = get_shuffle(p.shuffle_algo, units, p.num_canonical_nodes, p.shuffle_seed, epoch, p.shuffle_block_size)
        if p.num_canonical_nodes > 1:
            order = order[interleave(len(order), p.num_canonical_nodes)]
        return order if self._natural else rows[order]

    def __call__(self, epoch: int) -> np.ndarray:
        """``compute(epoch)``, cached (the two most recently used epochs; safe to call from several threads)."""
        with self._lock:
            order = self._cache.pop(epoch, None)
            self._cache[epoch] = self.compute(epoch) if order is None else order  # most recently used last
            while len(self._cache) > 2:
                del self._cache[next(iter(self._cache))]
            return self._cache[epoch]


# ----------------------------------------------------------------------------- config


def _number(value, key: str, *, integer: bool):
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{key}={value!r} must be a non-negative number")
    if isinstance(value, str):
        text = value.strip().lower()
        scale = {"k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}.get(text[-1:], 1) if integer else 1
        try:
            value = float(text[:-1] if scale != 1 else text) * scale
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not a number: write e.g. 1000, 10k or 2.5m") from None
    if not isinstance(value, (int, float)) or value != value:
        raise ConfigError(f"{key}={value!r} must be a non-negative number")
    if value < 0:
        raise ConfigError(f"{key}={value!r} must be non-negative")
    if integer:
        if value != int(value):
            raise ConfigError(f"{key}={value!r} must be a whole number")
        return int(value)
    return float(value)


def stream_weight(name: str, stream: dict, key: str) -> StreamWeight:
    """The ``StreamWeight`` of one ``streams`` entry (ConfigError for two weights or a negative one)."""
    given = [weight for weight in WEIGHT_KEYS if stream.get(weight) is not None]
    if len(given) > 1:
        raise ConfigError(f"{key}.streams.{name} sets {' and '.join(given)}: give at most one of proportion, repeat, "
                          f"choose (the others are derived)")
    values = {weight: _number(stream[weight], f"{key}.streams.{name}.{weight}", integer=weight == "choose")
              for weight in given}
    return StreamWeight(name, **values)


def _int_option(extra: dict, name: str, key: str) -> int | None:
    if extra.get(name) is None:
        return None
    value = _number(extra[name], f"{key}.extra.{name}", integer=True)
    if value < 1 and name != "epoch_size":
        raise ConfigError(f"{key}.extra.{name}={extra[name]!r} must be a positive integer")
    return value


def order_options(dataset, *, key: str) -> dict:
    """``SampleOrder`` keyword arguments from a ``DatasetConfig`` (its ``extra`` holds Streaming's options)."""
    extra = dataset.extra or {}
    algo = str(extra.get("shuffle_algo") or DEFAULT_SHUFFLE_ALGO).lower()
    if algo not in SHUFFLE_ALGOS:
        raise ConfigError(f"{key}.extra.shuffle_algo={extra.get('shuffle_algo')!r} is unknown: use one of "
                          f"{', '.join(SHUFFLE_ALGOS)}")
    if not dataset.shuffle:
        algo = "none"
    method = str(extra.get("sampling_method") or "balanced").lower()
    if method not in SAMPLING_METHODS:
        raise ConfigError(f"{key}.extra.sampling_method={extra.get('sampling_method')!r} is unknown: use balanced or fixed")
    batching = extra.get("batching_method")
    if batching not in (None, "random"):
        raise ConfigError(f"{key}.extra.batching_method={batching!r} is not supported: batches mix streams at random; "
                          f"unset it or set it to random")
    return {
        "shuffle_algo": algo,
        "num_canonical_nodes": _int_option(extra, "num_canonical_nodes", key),
        "shuffle_block_size": _int_option(extra, "shuffle_block_size", key),
        "sampling_method": method,
        "sampling_granularity": _int_option(extra, "sampling_granularity", key) or 1,
        "epoch_size": _int_option(extra, "epoch_size", key) or None,
    }


def stream_weights(dataset, *, key: str) -> list[StreamWeight]:
    """One ``StreamWeight`` per stream of a ``DatasetConfig`` (one unweighted stream when it has none)."""
    if not dataset.streams:
        return [StreamWeight("stream")]
    return [stream_weight(str(name), dict(stream or {}), key) for name, stream in dataset.streams.items()]

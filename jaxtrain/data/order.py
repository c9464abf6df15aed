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
3. **Shuffle** (``jaxtrain.data.shuffle.get_shuffle``): a permutation of the units' samples
   that keeps shards together, exactly as ``streaming.base.shuffle.get_shuffle`` gives it.

The global order of the epoch then visits the canonical nodes round robin (position ``k``
takes the next sample of part ``k % num_canonical_nodes``), which is the order Streaming's
partitioning gives when all canonical nodes run side by side; unlike Streaming it does not
repeat samples to even out parts of unequal length. Nothing here depends on the number of
processes or devices: each process takes its slice of every global batch.

``num_canonical_nodes`` and ``shuffle_block_size`` default to Streaming's values for one
physical node (``jaxtrain.data.shuffle``) whatever the process or host count, so a run resumed
on a different number of hosts keeps its order; the loader stores them in its state.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from jaxtrain.config.schema import ConfigError
from jaxtrain.data.shuffle import (
    DEFAULT_SHUFFLE_ALGO, SHUFFLE_ALGOS, default_block_size, default_num_canonical_nodes, get_shuffle, interleave,
    pseudo_shards,
)

SAMPLING_METHODS = ("balanced", "fixed")
WEIGHT_KEYS = ("proportion", "repeat", "choose")


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

"""KV-cache decoding for MPT: one compiled program runs the prefill and a ``lax.while_loop`` of
single-token steps, with greedy, temperature, top-k and top-p sampling, EOS and stop sequences.

Prompts of different lengths are padded on the left or the right; every token carries its
position in its own sequence (-1 for padding), so ALiBi distances and learned positions are
those of the unpadded prompt and the logits equal a full forward pass over each sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PADDING_SIDES = ("left", "right")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 turns it off)")


@dataclasses.dataclass
class Generation:
    """What ``generate`` returns: per prompt, the new tokens (ending with the EOS or stop sequence
    that ended it, if any), whether it stopped early, and timings."""

    tokens: list[list[int]]
    stopped: list[bool]
    logits: np.ndarray | None  # float32 [batch, max_new_tokens, vocab] when asked for
    compile_seconds: float
    seconds: float  # the compiled program's run time, prefill included

    @property
    def tokens_per_second(self) -> float:
        return sum(len(t) for t in self.tokens) / max(self.seconds, 1e-9)


def pad_prompts(prompts: Sequence[Sequence[int]], *, pad_token_id: int, padding_side: str = "left",
                min_length: int = 0):
    """``(input_ids, positions)``, both int32 ``[batch, width]``, ``width`` the longest prompt or
    ``min_length`` if that is more; positions are -1 on padding."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side={padding_side!r}; use one of {PADDING_SIDES}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(min_length, *(len(p) for p in prompts))
    ids = np.full((len(prompts), longest), pad_token_id, np.int32)
    positions = np.full((len(prompts), longest), -1, np.int32)
    for row, prompt in enumerate(prompts):
        start = longest - len(prompt) if padding_side == "left" else 0
        ids[row, start : start + len(prompt)] = prompt
        positions[row, start : start + len(prompt)] = np.arange(len(prompt))
    return ids, positions


def sample_logits(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens ``[batch]`` from float32 logits ``[batch, vocab]``."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.float32(sampling.temperature)
    blocked = jnp.finfo(jnp.float32).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, blocked, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # the smallest set of most likely tokens whose mass reaches top_p (always at least one)
        keep = mass_before < jnp.float32(sampling.top_p)
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, blocked, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def stop_table(stop_sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """Stop sequences right-aligned in an int32 ``[n, longest]`` table, -1 where shorter."""
    sequences = [list(s) for s in stop_sequences if len(s)]
    width = max((len(s) for s in sequences), default=1)
    table = np.full((len(sequences), width), -1, np.int32)
    for row, sequence in enumerate(sequences):
        table[row, width - len(sequence) :] = sequence
    return table


def _decode_program(graphdef, params, input_ids, positions, stops, rng, *, max_new_tokens: int, sampling: Sampling,
                    eos_token_id: int | None, pad_token_id: int, compute_dtype, return_logits: bool):
    model = nnx.merge(graphdef, params)
    batch, prompt_len = input_ids.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens, compute_dtype)
    logits, cache = model.decode(input_ids, positions, cache, compute_dtype=compute_dtype)
    last_slot = jnp.argmax(jnp.where(positions >= 0, jnp.arange(prompt_len), -1), axis=1)
    next_logits = jnp.take_along_axis(logits, last_slot[:, None, None], axis=1)[:, 0]
    next_position = jnp.max(positions, axis=1) + 1
    width = stops.shape[1]
    # generated tokens, after width-1 columns that match nothing (so a stop needs enough new tokens)
    history = jnp.full((batch, width - 1 + max_new_tokens), -2, jnp.int32)
    all_logits = jnp.zeros((batch, max_new_tokens if return_logits else 0, logits.shape[-1]), jnp.float32)
    done = jnp.zeros((batch,), bool)

    def cond(carry):
        step, done = carry[0], carry[5]
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, next_logits, next_position, history, done, all_logits, rng = carry
        rng, key = jax.random.split(rng)
        token = jnp.where(done, pad_token_id, sample_logits(next_logits, key, sampling))
        history = jax.lax.dynamic_update_slice(history, token[:, None], (0, width - 1 + step))
        if return_logits:
            all_logits = jax.lax.dynamic_update_slice(all_logits, next_logits[:, None], (0, step, 0))
        hit = jnp.zeros_like(done)
        if eos_token_id is not None:
            hit = token == eos_token_id
        if stops.shape[0]:
            window = jax.lax.dynamic_slice(history, (0, step), (batch, width))
            matches = (stops[None] == window[:, None]) | (stops[None] < 0)
            hit = hit | jnp.any(jnp.all(matches, axis=-1), axis=-1)
        done = done | hit
        # finished rows write a masked slot, so they never disturb the others
        position = jnp.where(done, -1, next_position)
        logits, cache = model.decode(token[:, None], position[:, None], cache, compute_dtype=compute_dtype)
        return step + 1, cache, logits[:, 0], next_position + 1, history, done, all_logits, rng

    carry = (jnp.int32(0), cache, next_logits, next_position, history, done, all_logits, rng)
    step, _, _, _, history, done, all_logits, _ = jax.lax.while_loop(cond, body, carry)
    return history[:, width - 1 :], step, done, all_logits


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, treedef, abstract_leaves: tuple, static: tuple):
    fn = jax.jit(functools.partial(_decode_program, graphdef, **dict(static)))
    return fn.lower(*jax.tree.unflatten(treedef, abstract_leaves)).compile()


def generate(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_sequences: Sequence[Sequence[int]] = (),
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    padding_side: str = "left",
    seed: int = 0,
    compute_dtype=jnp.float32,
    return_logits: bool = False,
    pad_to: int = 0,
) -> Generation:
    """Continue each token-id prompt by up to ``max_new_tokens`` tokens (stopping at EOS or a stop sequence).

    The program is compiled once per batch size and padded prompt width: ``pad_to`` pads the
    prompts to at least that many tokens, so calls whose prompts share a length bucket share it
    (padding changes no output)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    width = max(pad_to, *(len(p) for p in prompts)) if prompts else pad_to
    if width + max_new_tokens > model.max_seq_len:
        raise ValueError(f"prompt of {width} tokens + max_new_tokens={max_new_tokens} exceeds the "
                         f"model's max_seq_len={model.max_seq_len}; shorten the prompt or ask for fewer tokens")
    input_ids, positions = pad_prompts(prompts, pad_token_id=pad_token_id, padding_side=padding_side, min_length=pad_to)
    graphdef, params = nnx.split(model)
    args = (params, input_ids, positions, stop_table(stop_sequences), jax.random.key(seed))
    static = (("max_new_tokens", max_new_tokens), ("sampling", sampling), ("eos_token_id", eos_token_id),
              ("pad_token_id", pad_token_id), ("compute_dtype", jnp.dtype(compute_dtype)),
              ("return_logits", return_logits))
    start = time.perf_counter()
    leaves, treedef = jax.tree.flatten(args)
    program = _compiled(graphdef, treedef, tuple(_abstract(leaf) for leaf in leaves), static)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tokens, steps, done, all_logits = jax.device_get(program(*args))
    seconds = time.perf_counter() - start
    results = []
    for row in range(len(prompts)):
        row_tokens = [int(t) for t in tokens[row, : int(steps)]]
        if done[row]:
            row_tokens = row_tokens[: _end_of(row_tokens, eos_token_id, stop_sequences)]
        results.append(row_tokens)
    return Generation(results, [bool(d) for d in done], np.asarray(all_logits) if return_logits else None,
                      compile_seconds, seconds)


def _abstract(x):
    x = jnp.asarray(x) if isinstance(x, np.ndarray) else x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _end_of(tokens: list[int], eos_token_id: int | None, stop_sequences: Sequence[Sequence[int]]) -> int:
    """Length up to and including the first EOS or completed stop sequence."""
    for end in range(1, len(tokens) + 1):
        if eos_token_id is not None and tokens[end - 1] == eos_token_id:
            return end
        if any(len(s) and end >= len(s) and tokens[end - len(s) : end] == list(s) for s in stop_sequences):
            return end
    return len(tokens)

"""KV-cache decoding for MPT: one compiled program runs the prefill and a ``lax.while_loop`` of
single-token steps, with greedy, temperature, top-k and top-p sampling (as transformers' warpers
compute them), EOS ids, stop token sequences and stop strings.

Prompts of different lengths are padded on the left or the right; every token carries its
position in its own sequence (-1 for padding), so ALiBi distances and learned positions are
those of the unpadded prompt and the logits equal a full forward pass over each sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PADDING_SIDES = ("left", "right")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: ``temperature`` 0 is greedy; ``top_k`` 0, ``top_p`` 1 and
    ``min_p`` 0 are off. ``repetition_penalty`` (1 is off; CTRL's, as transformers' ``repetition_penalty``): the
    logit of every token already in the prompt or the text generated so far is divided by it where
    positive and multiplied by it where negative, before the temperature, greedy decoding included."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1] (0 turns it off)")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be a finite number > 0 (1 turns "
                             f"it off; above 1 discourages repeats)")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 turns it off)")


@dataclasses.dataclass
class Generation:
    """What ``generate`` returns: per prompt, the new tokens (ending with the EOS, stop sequence or
    the token completing a stop string that ended it, if any), whether it ended so rather than at
    ``max_new_tokens``, and timings."""

    tokens: list[list[int]]
    stopped: list[bool]
    logits: np.ndarray | None  # the model's float32 [batch, max_new_tokens, vocab] (no penalty), when asked for
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


def warp_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """The float32 logits ``[batch, vocab]`` that sampling draws from (up to a constant per row):
    divided by the temperature, then top-k (tokens below the k-th largest value removed, ties
    kept), then top-p (tokens removed, least likely first, while the removed mass stays <= 1 - p:
    what is left is the smallest set of most likely tokens whose mass reaches p, never empty; of
    equal logits the lower id is removed first), then min-p (tokens less likely than ``min_p``
    times the most likely one removed). Removed tokens are -inf. These are transformers'
    ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper`` and ``MinPLogitsWarper``,
    in the order ``generate`` applies them.
    Temperature 0 (greedy) returns the logits unchanged."""
    logits = logits.astype(jnp.float32)
    if sampling.temperature == 0.0:
        return logits
    # from the largest logit down, so that a tiny temperature sends the others to -inf, never to +inf
    temperature = np.float32(max(sampling.temperature, np.finfo(np.float32).tiny))
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(logits, axis=-1, stable=True)  # ascending, equal logits in id order
        mass = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
        remove = (mass <= jnp.float32(1.0 - sampling.top_p)).at[:, -1].set(False)
        remove = jnp.take_along_axis(remove, jnp.argsort(order, axis=-1), axis=-1)  # back to id order
        logits = jnp.where(remove, -jnp.inf, logits)
    if sampling.min_p > 0.0:  # p < min_p * p_max, compared as probabilities, as transformers compares them
        probs = jax.nn.softmax(logits, axis=-1)
        logits = jnp.where(probs < np.float32(sampling.min_p) * jnp.max(probs, axis=-1, keepdims=True), -jnp.inf,
                           logits)
    return logits


def penalize_repeats(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """``logits [batch, vocab]`` with ``Sampling.repetition_penalty`` applied to the ids ``seen``
    (bool ``[batch, vocab]``), as transformers' ``RepetitionPenaltyLogitsProcessor`` applies it."""
    logits = logits.astype(jnp.float32)
    if penalty == 1.0:
        return logits
    penalized = jnp.where(logits < 0, logits * np.float32(penalty), logits / np.float32(penalty))
    return jnp.where(seen, penalized, logits)


def sample_logits(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens ``[batch]`` from float32 logits ``[batch, vocab]``: the argmax at temperature 0,
    else a draw from ``warp_logits``."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, warp_logits(logits, sampling), axis=-1).astype(jnp.int32)


def stop_table(stop_sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """Stop sequences right-aligned in an int32 ``[n, longest]`` table, -1 where shorter."""
    sequences = [list(s) for s in stop_sequences if len(s)]
    width = max((len(s) for s in sequences), default=1)
    table = np.full((len(sequences), width), -1, np.int32)
    for row, sequence in enumerate(sequences):
        table[row, width - len(sequence) :] = sequence
    return table


def stop_string_table(stop_strings: Sequence[str], token_texts: Sequence[str], vocab_size: int) -> np.ndarray:
    """Stop strings as automata over token ids: int32 ``[n, vocab_size, longest + 1]``, where
    ``[i, token, state]`` is the state after the text of ``token`` follows a text in ``state``. A
    state counts the characters of stop string ``i`` that the text so far ends with (Knuth-Morris-
    Pratt); reaching the string's length means the text contains it, wherever the token boundaries
    fall. Ids without a text (beyond ``token_texts``, special tokens as "") leave the state as is."""
    longest = max((len(s) for s in stop_strings), default=0)
    table = np.zeros((len(stop_strings), vocab_size, longest + 1), np.int32)
    for row, stop in enumerate(stop_strings):
        fail = [0] * len(stop)  # longest proper prefix of stop[: q + 1] that is also its suffix
        for q in range(1, len(stop)):
            k = fail[q - 1]
            while k and stop[q] != stop[k]:
                k = fail[k - 1]
            fail[q] = k + (stop[q] == stop[k])
        chars = set(stop)
        table[row] = np.arange(longest + 1)  # no text: the state stays
        for token in range(min(vocab_size, len(token_texts))):
            text = token_texts[token]
            if not text:
                continue
            if chars.isdisjoint(text):
                table[row, token, : len(stop)] = 0
                continue
            for start in range(len(stop)):
                q = start
                for char in text:
                    while q and stop[q] != char:
                        q = fail[q - 1]
                    q += stop[q] == char
                    if q == len(stop):
                        break
                table[row, token, start] = q
        table[row, :, len(stop) :] = len(stop)  # found stays found
    return table


def _decode_program(graphdef, params, input_ids, positions, stops, stop_strings, stop_lengths, rng, *,
                    max_new_tokens: int, sampling: Sampling, eos_token_ids: tuple[int, ...], pad_token_id: int,
                    compute_dtype, return_logits: bool):
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
    text_state = jnp.zeros((batch, stop_strings.shape[0]), jnp.int32)
    ended = jnp.full((batch,), -1, jnp.int32)  # the step whose token ended each row
    penalty = sampling.repetition_penalty
    vocab = logits.shape[-1]
    # the ids each row's text holds so far (its prompt, padding left out), for the repetition penalty
    seen = jnp.zeros((batch, vocab if penalty != 1.0 else 0), jnp.bool_)
    if penalty != 1.0:
        seen = seen.at[jnp.arange(batch)[:, None], jnp.where(positions >= 0, input_ids, vocab)].set(True, mode="drop")

    def cond(carry):
        step, ended = carry[0], carry[5]
        return (step < max_new_tokens) & ~jnp.all(ended >= 0)

    def body(carry):
        step, cache, next_logits, next_position, history, ended, text_state, all_logits, rng, seen = carry
        done = ended >= 0
        rng, key = jax.random.split(rng)
        scores = penalize_repeats(next_logits, seen, penalty) if penalty != 1.0 else next_logits
        token = jnp.where(done, pad_token_id, sample_logits(scores, key, sampling))
        if penalty != 1.0:
            seen = seen.at[jnp.arange(batch), token].set(True)
        history = jax.lax.dynamic_update_slice(history, token[:, None], (0, width - 1 + step))
        if return_logits:
            all_logits = jax.lax.dynamic_update_slice(all_logits, next_logits[:, None], (0, step, 0))
        hit = jnp.zeros_like(done)
        for eos in eos_token_ids:
            hit = hit | (token == eos)
        if stops.shape[0]:
            window = jax.lax.dynamic_slice(history, (0, step), (batch, width))
            matches = (stops[None] == window[:, None]) | (stops[None] < 0)
            hit = hit | jnp.any(jnp.all(matches, axis=-1), axis=-1)
        if stop_strings.shape[0]:
            text_state = stop_strings[jnp.arange(stop_strings.shape[0])[None], token[:, None], text_state]
            hit = hit | jnp.any(text_state >= stop_lengths[None], axis=-1)
        ended = jnp.where(done | ~hit, ended, step)
        # finished rows write a masked slot, so they never disturb the others
        position = jnp.where(ended >= 0, -1, next_position)
        logits, cache = model.decode(token[:, None], position[:, None], cache, compute_dtype=compute_dtype)
        return step + 1, cache, logits[:, 0], next_position + 1, history, ended, text_state, all_logits, rng, seen

    carry = (jnp.int32(0), cache, next_logits, next_position, history, ended, text_state, all_logits, rng, seen)
    step, _, _, _, history, ended, _, all_logits, _, _ = jax.lax.while_loop(cond, body, carry)
    return history[:, width - 1 :], step, ended, all_logits


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
    stop_strings: Sequence[str] = (),
    token_texts: Sequence[str] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = 0,
    padding_side: str = "left",
    seed: int = 0,
    compute_dtype=jnp.float32,
    return_logits: bool = False,
    pad_to: int = 0,
) -> Generation:
    """Continue each prompt (a sequence of token ids; a 2-D array is one prompt per row) by up to
    ``max_new_tokens`` tokens. A row ends with the token that is an EOS id (``eos_token_id``: one id
    or several), completes a stop sequence of ids (``stop_sequences``), or completes a stop string
    in the generated text (``stop_strings``, which need ``token_texts``: the text of each token id,
    as ``jaxtrain.inference.cli.token_texts`` reads them from a tokenizer); the others go on.

    ``pad_token_id`` fills padding and finished rows (it is masked and never returned; None: 0).
    The longest prompt plus ``max_new_tokens`` must fit the model's ``max_seq_len``. Seeds are
    32-bit. The program is compiled once per batch size, padded prompt width and options: ``pad_to``
    pads the prompts to at least that many tokens, so calls whose prompts share a length bucket
    share it (padding changes no output). ``seconds`` times the compiled program alone."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    vocab_size = model.wte.embedding.shape[0]
    prompts = _token_lists(prompts, vocab_size)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                         f"model's max_seq_len={model.max_seq_len}; shorten the prompt or ask for fewer tokens")
    pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
    if not 0 <= pad_token_id < vocab_size:
        raise ValueError(f"pad_token_id={pad_token_id} is outside the model's vocabulary (0..{vocab_size - 1})")
    try:
        eos = () if eos_token_id is None else (eos_token_id,) if np.ndim(eos_token_id) == 0 else tuple(eos_token_id)
        eos = tuple(operator.index(e) for e in eos)
    except TypeError:
        raise ValueError(f"eos_token_id={eos_token_id!r}: give a token id, a sequence of them, or None") from None
    if not 0 <= operator.index(seed) < 2**32:
        raise ValueError(f"seed={seed} must be in [0, 2**32)")
    if stop_strings and token_texts is None:
        raise ValueError("stop_strings need token_texts, the text of each token id")
    if any(not s for s in stop_strings):
        raise ValueError("an empty stop string would end every row before its first token")
    strings = (stop_string_table(stop_strings, token_texts, vocab_size) if stop_strings
               else np.zeros((0, 1, 1), np.int32))
    input_ids, positions = pad_prompts(prompts, pad_token_id=pad_token_id, padding_side=padding_side, min_length=pad_to)
    graphdef, params = nnx.split(model)
    args = (params, input_ids, positions, stop_table(stop_sequences), strings,
            np.asarray([len(s) for s in stop_strings], np.int32), jax.random.key(seed))
    static = (("max_new_tokens", max_new_tokens), ("sampling", sampling), ("eos_token_ids", eos),
              ("pad_token_id", pad_token_id), ("compute_dtype", jnp.dtype(compute_dtype)),
              ("return_logits", return_logits))
    start = time.perf_counter()
    leaves, treedef = jax.tree.flatten(args)
    program = _compiled(graphdef, treedef, tuple(_abstract(leaf) for leaf in leaves), static)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tokens, steps, ended, all_logits = jax.device_get(program(*args))
    seconds = time.perf_counter() - start
    results = [[int(t) for t in tokens[row, : int(ended[row]) + 1 if ended[row] >= 0 else int(steps)]]
               for row in range(len(prompts))]
    return Generation(results, [bool(e >= 0) for e in ended], np.asarray(all_logits) if return_logits else None,
                      compile_seconds, seconds)


def _token_lists(prompts, vocab_size: int) -> list[list[int]]:
    """Prompts as lists of ints, each id checked against the model's vocabulary."""
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) != 2:
        raise ValueError(f"prompts: an array of prompts must be 2-D, not of shape {np.shape(prompts)}")
    lists = []
    for index, prompt in enumerate(prompts, 1):
        if np.ndim(prompt) != 1:
            raise ValueError("prompts: give one sequence of token ids per prompt")
        ids = np.asarray(prompt)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt {index}: token ids must be integers, not {ids.dtype}")
        outside = ids[(ids < 0) | (ids >= vocab_size)]
        if outside.size:
            raise ValueError(f"prompt {index}: token id {int(outside[0])} is outside the model's vocabulary "
                             f"(0..{vocab_size - 1})")
        lists.append([int(t) for t in ids])
    if not lists or any(not p for p in lists):
        raise ValueError("every prompt needs at least one token")
    return lists


def _abstract(x):
    x = jnp.asarray(x) if isinstance(x, np.ndarray) else x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

"""Continuous batching on the device: a fixed number of batch slots, each holding one request's
sequence in its rows of one preallocated cache, so that requests join and leave between decode
segments without changing a shape (nothing recompiles).

A request joins a free slot at a segment boundary: its prompt is prefilled into a one-row cache
(prefill_request), which `admit` writes into the slot's rows of the batch cache together with the
row's sampling settings. decode_slots then runs a segment for every slot at once, each row with
its own temperature, top-k, top-p, seed and token limit; a row stops at a stop token or at its
limit on the device (its cache length no longer advances), and `retire` stops rows the host ends
(a stop string, a client that left). Rows of free slots run along, masked out of the hotness.

Cache layout: every cache leaf has the batch as its leading axis, each row owning the same
number of consecutive entries (KVCache: num_kv_heads per row; recurrent states: one), so a
one-row cache fits any family's batch cache at offset slot * rows_per_row."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dynaexq_jax.model.config import ModelConfig
from dynaexq_jax.model.families import family
from dynaexq_jax.serving.generate import decode_step, prefill_logits
from dynaexq_jax.serving.hotness import ema_update
from dynaexq_jax.serving.sampling import sample_rows


@struct.dataclass
class Slots:
    """The device state of the batch slots. cache: the family's cache for B rows; last int32 [B]:
    each row's latest token (the next step's input); done bool [B]: rows with no live request;
    generated int32 [B]: tokens its request has produced; limit int32 [B]: its max_tokens; keys
    uint32 [B, 2]: PRNGKey(seed); temperature f32 [B] (0: greedy), top_k int32 [B], top_p f32 [B]."""
    cache: object
    last: jax.Array
    done: jax.Array
    generated: jax.Array
    limit: jax.Array
    keys: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @property
    def batch(self) -> int:
        return self.last.shape[0]


def init_slots(cfg: ModelConfig, batch: int, max_len: int, dtype) -> Slots:
    """B free slots over an empty cache of max_len positions."""
    zeros = functools.partial(jnp.zeros, (batch,))
    return Slots(cache=family(cfg.model_type).init_cache(cfg, batch, max_len, dtype), last=zeros(jnp.int32),
                 done=jnp.ones((batch,), bool), generated=zeros(jnp.int32), limit=zeros(jnp.int32),
                 keys=jnp.zeros((batch, 2), jnp.uint32), temperature=zeros(jnp.float32), top_k=zeros(jnp.int32),
                 top_p=jnp.ones((batch,), jnp.float32))


def prefill_len(n: int, chunk: int, max_len: int) -> int:
    """The padded length of an n-token prompt: a power of two (>= 16) up to `chunk`, whole chunks
    above it, at most max_len (n <= max_len), so that few prompt shapes compile."""
    return min(1 << max(4, (n - 1).bit_length()), -(-n // chunk) * chunk, max_len)


@jax.jit
def _first_token(logits, mass_sum, length, key, temperature, top_k, top_p):
    first = sample_rows(logits, key[None], jnp.zeros((1,), jnp.int32), temperature[None], top_k[None], top_p[None])
    return first[0], mass_sum / jnp.maximum(length, 1).astype(jnp.float32)


def prefill_request(params, cfg: ModelConfig, prompt, max_len: int, dtype, *, seed: int, temperature: float,
                    top_k: int, top_p: float, backend: str = "xla", chunk: int):
    """Prefill one prompt (a token-id list, at most max_len tokens) into a fresh one-row cache of
    max_len positions and sample its first token (token index 0 of its key, as generate does).
    Returns (first token: a device int32 scalar, the row's cache, its key, the prompt's mean
    router mass f32 [L_moe, E])."""
    n = len(prompt)
    tokens = np.zeros((1, prefill_len(n, chunk, max_len)), np.int32)
    tokens[0, :n] = prompt
    cache = family(cfg.model_type).init_cache(cfg, 1, max_len, dtype)
    logits, cache, mass_sum = prefill_logits(params, cfg, tokens, np.array([n], np.int32), cache, backend=backend,
                                             chunk=chunk)
    key = jax.random.PRNGKey(seed)
    first, mass = _first_token(logits, mass_sum, jnp.int32(n), key, jnp.float32(temperature), jnp.int32(top_k),
                               jnp.float32(top_p))
    return first, cache, key, mass


@functools.partial(jax.jit, donate_argnames=("slots",))
def admit(slots: Slots, row_cache, slot, first, limit, key, temperature, top_k, top_p) -> Slots:
    """Write a prefilled request into slot `slot` (int32 scalar): its one-row cache, first token,
    token limit (max_tokens, >= 2: a request done at its first token never takes a slot) and
    sampling settings."""
    def put(big, row):
        return jax.lax.dynamic_update_slice_in_dim(big, row.astype(big.dtype), slot * row.shape[0], axis=0)
    return Slots(cache=jax.tree.map(put, slots.cache, row_cache), last=slots.last.at[slot].set(first),
                 done=slots.done.at[slot].set(False), generated=slots.generated.at[slot].set(1),
                 limit=slots.limit.at[slot].set(limit), keys=slots.keys.at[slot].set(key),
                 temperature=slots.temperature.at[slot].set(temperature), top_k=slots.top_k.at[slot].set(top_k),
                 top_p=slots.top_p.at[slot].set(top_p))


@functools.partial(jax.jit, donate_argnames=("slots",))
def retire(slots: Slots, rows) -> Slots:
    """Stop the rows marked in rows (bool [B]): their requests ended on the host."""
    return slots.replace(done=slots.done | rows)


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "alpha", "backend"), donate_argnames=("slots",))
def decode_slots(params, cfg: ModelConfig, slots: Slots, stop_ids, scores, *, steps: int, alpha: float,
                 backend: str = "xla"):
    """`steps` decode steps for every slot. stop_ids int32 [n_stop]; scores f32 [L_moe, E] the
    hotness EMA, one step per decode step that has a live row (a step with none is no step).
    Returns (tokens int32 [steps, B], done-after-token bool [steps, B], slots, mass f32 [steps,
    L_moe, E] over the live rows, scores)."""

    def step(carry, _):
        s, scores = carry
        logits, cache, mass = decode_step(params, cfg, s.cache, s.last, s.done, backend)
        # A finished row's length stays where it ended, so an idle slot never runs off its cache.
        cache = cache.replace(lengths=jnp.where(s.done, s.cache.lengths, cache.lengths))
        tok = sample_rows(logits, s.keys, s.generated, s.temperature, s.top_k, s.top_p)
        tok = jnp.where(s.done, s.last, tok)
        generated = s.generated + (~s.done)
        done = s.done | jnp.isin(tok, stop_ids) | (generated >= s.limit)
        scores = jnp.where(jnp.any(~s.done), ema_update(scores, mass, alpha), scores)
        return (s.replace(cache=cache, last=tok, done=done, generated=generated), scores), (tok, done, mass)

    (slots, scores), (toks, dones, mass) = jax.lax.scan(step, (slots, scores), None, length=steps)
    return toks, dones, slots, mass, scores

"""Token sampling from an explicit PRNG key: greedy, temperature, top-k, top-p."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dynaexq_jax.errors import SamplingError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k 0 means no top-k cut; top_p 1.0 means no nucleus cut."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise SamplingError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise SamplingError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _keep(logits: jax.Array, top_k, top_p) -> jax.Array:
    """logits f32 [B, V] (divided by the temperature) with every token outside the top_k (0: no
    cut) and outside the smallest set of likeliest tokens whose probability reaches top_p (1: no
    cut) set to -inf. top_k, top_p: scalars or [B, 1] (one per row)."""
    V = logits.shape[-1]
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.broadcast_to(jnp.where(top_k > 0, jnp.minimum(top_k, V), V), (logits.shape[0], 1))
    kth = jnp.take_along_axis(sorted_logits, k - 1, axis=-1)
    # The nucleus is taken among the top-k (ties with the k-th kept, as the cut below keeps them).
    sorted_logits = jnp.where(sorted_logits < kth, -jnp.inf, sorted_logits)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    last = jnp.minimum(jnp.sum(cum < top_p, axis=-1, keepdims=True), V - 1)
    cutoff = jnp.take_along_axis(sorted_logits, last, axis=-1)
    return jnp.where(logits < jnp.maximum(kth, cutoff), -jnp.inf, logits)


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """jnp.argmax(logits, -1) as int32 [B] (the first maximum; the first NaN where a row has one) in
    two plain reductions: XLA CPU runs argmax's (value, index) reduction as scalar code, 270 us
    a step at [32, 4096], against 90 us for these."""
    V = logits.shape[-1]
    top = logits.max(axis=-1, keepdims=True)
    return jnp.where((logits == top) | jnp.isnan(logits), jnp.arange(V, dtype=jnp.int32), V).min(axis=-1)


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """logits f32 [B, V] -> token ids int32 [B]: one setting and one key for the whole batch."""
    if s.greedy:
        return greedy_tokens(logits)
    logits = logits.astype(jnp.float32) / s.temperature
    if (s.top_k and s.top_k < logits.shape[-1]) or s.top_p < 1.0:
        logits = _keep(logits, s.top_k, s.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_rows(logits: jax.Array, keys: jax.Array, index: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """One setting and one key per row (a server's requests): logits f32 [B, V]; keys uint32 [B, 2]
    (jax.random.PRNGKey of each row's seed), drawn at fold_in(key, index) with index int32 [B] the
    row's token index (as generate folds in the step); temperature f32 [B] (0: greedy), top_k int32
    [B], top_p f32 [B] -> token ids int32 [B]."""
    logits = logits.astype(jnp.float32)
    sampled = temperature > 0
    greedy = greedy_tokens(logits)

    def draw():
        scaled = logits / jnp.where(sampled, temperature, 1.0)[:, None]
        kept = _keep(scaled, top_k[:, None], top_p[:, None])
        drawn = jax.vmap(jax.random.categorical)(jax.vmap(jax.random.fold_in)(keys, index), kept)
        return jnp.where(sampled, drawn, greedy).astype(jnp.int32)
    # The sort and the draws only when a row samples: inside a decode scan on the CPU they cost
    # more than the rest of a small model's step.
    return jax.lax.cond(jnp.any(sampled), draw, lambda: greedy)

"""Expert hotness: the selected probability mass per token (DynaExq, arXiv 2511.15015)

    c[l, e] = (1/N) * sum over tokens t of 1[e in topk(t)] * p[t, e]

computed on the device from a forward pass's RouterInfo, for the N real (unmasked) tokens, and
its exponential moving average, advanced one step at a time:

    S <- alpha * S + (1 - alpha) * c

What one step is differs by caller, each with the mass it has:
  * decode (generate.decode_segment): one step per token position, c = that step's mass over the
    batch's unfinished sequences;
  * prefill (generate.prefill, when the controller counts it): one step for the whole prompt,
    c = the mass over all its real tokens;
  * scoring (scoring.score_chunk): one step per position, c = that position's mass averaged over
    the batch's real rows, so a chunk of C positions advances the EMA as C decode steps would
    (ema_over_positions; a position of padding only is no step);
  * replay (runtime.replay): a recorded trace keeps only each chunk's mean mass, which is taken
    as the mass of each of the chunk's `chunk` steps (ema_update with steps=chunk).
ema_update is plain arithmetic (numpy or jax arrays alike); ema_over_positions runs in jax."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# The EMA factor per step unless a caller chooses another (the engine's default, EngineConfig.alpha).
ALPHA = 0.9


def selected_mass(ids: tuple[jax.Array, ...], probs: tuple[jax.Array, ...], num_experts: int,
                  token_mask: jax.Array) -> jax.Array:
    """ids/probs: per MoE layer [B, T, k]; token_mask: bool [B, T] -> f32 [L_moe, E]."""
    if not ids:
        return jnp.zeros((0, num_experts), jnp.float32)
    n = jnp.maximum(token_mask.sum(), 1).astype(jnp.float32)
    w = token_mask[..., None].astype(jnp.float32)
    rows = []
    for i, p in zip(ids, probs):
        rows.append(jnp.zeros((num_experts,), jnp.float32).at[i.reshape(-1)].add((p * w).reshape(-1)) / n)
    return jnp.stack(rows)


def position_mass(ids: tuple[jax.Array, ...], probs: tuple[jax.Array, ...], num_experts: int,
                  positions: int, valid: jax.Array | None = None) -> jax.Array:
    """Per position, the selected mass averaged over the batch's rows that are real there (valid
    bool [B, C], default all): ids/probs per MoE layer [B, C, k] -> f32 [C, L_moe, E] (zero where
    no row is real)."""
    if not ids:
        return jnp.zeros((positions, 0, num_experts), jnp.float32)
    w = jnp.ones(ids[0].shape[:2], jnp.float32) if valid is None else valid.astype(jnp.float32)
    n = jnp.maximum(w.sum(0), 1.0)[:, None]
    rows = [((jax.nn.one_hot(i, num_experts, dtype=jnp.float32) * p[..., None]).sum(2) * w[..., None]).sum(0) / n
            for i, p in zip(ids, probs)]
    return jnp.stack(rows, axis=1)


def ema_update(scores, mass, alpha: float, steps: int = 1):
    """`steps` EMA steps that all see the same mass: S <- alpha^steps S + (1 - alpha^steps) c.
    scores, mass: [L_moe, E]."""
    decay = alpha ** steps
    return decay * scores + (1 - decay) * mass


def ema_over_positions(scores, mass, alpha: float, active=None):
    """One EMA step per position, mass [C, L_moe, E] in position order, in closed form:
    S_C = alpha^C S_0 + (1 - alpha) sum_c alpha^(C-1-c) m_c. active: bool [C], default all: a
    position where no row is real (padding) is no step at all."""
    a = jnp.ones(mass.shape[0], jnp.float32) if active is None else active.astype(jnp.float32)
    after = jnp.cumsum(a[::-1])[::-1] - a          # active positions after each one
    return alpha ** a.sum() * scores + (1 - alpha) * jnp.einsum("c,cle->le", a * alpha ** after, mass)

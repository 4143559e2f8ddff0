"""Expert hotness: the selected probability mass per token (method.md section 1)

    c[l, e] = (1/N) * sum over tokens t of 1[e in topk(t)] * p[t, e]

computed on the device from a forward pass's RouterInfo, for the N real (unmasked) tokens."""
from __future__ import annotations

import jax
import jax.numpy as jnp


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

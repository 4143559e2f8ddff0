"""The mixed-tier MoE expert op on the grouped Pallas kernels.

Same signature and semantics as dynaexq_jax.model.moe.moe_experts_reference:
  x [T, H], ids/weights [T, k], experts: ExpertPools  ->  [T, H] in x.dtype

  1. flatten the T*k (token, expert) pairs and look up (tier, slot) of each expert;
  2. sort the pairs by (tier, slot): each tier's pairs are one contiguous run of rows, and inside
     it each slot's pairs form one group; group offsets are computed on device (no host sync);
  3. per tier with a non-empty pool (each tier has its own format, so its own kernel
     specialization): gate+up kernel into the shared h buffer, then down kernel (routing weight
     applied in the epilogue) into the shared y buffer; rows of other tiers pass through;
  4. un-sort with a gather and sum the k contributions of each token in f32 (a gather and a
     fixed-order sum rather than a scatter-add, so results are deterministic).
Pairs whose expert sits on a tier that is out of range or has an empty pool contribute nothing,
and slots are clipped into the pool, exactly as in the reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dynaexq_jax.model.moe import ExpertPools
from pallas_kernels import compat
from pallas_kernels.grouped_matmul import api
from pallas_kernels.grouped_matmul.tiling import TileConfig, default_config


def sort_pairs(ids, experts: ExpertPools):
    """ids [T, k] -> (order int32 [P]: pair index of each sorted row, offsets: per tier int32 [S_t+1]
    row offsets of its slots in the sorted order (None for an empty pool))."""
    sizes = jnp.array([p.size for p in experts.pools], jnp.int32)             # [n_tiers]
    n_tiers = len(experts.pools)
    e = ids.reshape(-1)                                                          # [P]
    tier, slot = experts.tier[e], experts.slot[e]
    size = sizes[jnp.clip(tier, 0, n_tiers - 1)]                               # [P] pool size of each pair
    tier = jnp.where((tier >= 0) & (tier < n_tiers) & (size > 0), tier, n_tiers)  # invalid pairs sort last
    slot = jnp.clip(slot, 0, jnp.maximum(size - 1, 0))
    s_max = max(p.size for p in experts.pools) or 1
    order = jnp.argsort(tier * s_max + slot, stable=True).astype(jnp.int32)

    offsets = []
    tier_start = jnp.int32(0)
    for t, pool in enumerate(experts.pools):
        on_t = tier == t
        if pool.size == 0:
            offsets.append(None)
            continue
        counts = jnp.zeros((pool.size,), jnp.int32).at[jnp.where(on_t, slot, 0)].add(on_t.astype(jnp.int32))
        offsets.append(tier_start + jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts)]))
        tier_start = tier_start + on_t.sum(dtype=jnp.int32)
    return order, offsets


def _configs(tiles, rows: int, num_experts: int) -> tuple[TileConfig, TileConfig]:
    if tiles is None:
        c = default_config(rows, num_experts)
        return c, c
    if isinstance(tiles, TileConfig):
        return tiles, tiles
    gate_up_cfg, down_cfg = tiles
    return gate_up_cfg, down_cfg


@functools.partial(jax.jit, static_argnames=("interpret", "tiles"))
def moe_experts_pallas(x, ids, weights, experts: ExpertPools, *, interpret: bool | None = None, tiles=None):
    """x [T, H], ids int32 [T, k], weights [T, k] -> [T, H] (x.dtype).
    interpret: None = interpret mode unless the default backend is a GPU.
    tiles: None (chosen per shape), a TileConfig for both kernels, or (gate_up, down) configs."""
    interpret = compat.default_interpret() if interpret is None else interpret
    t_tokens, hidden = x.shape
    k = ids.shape[1]
    pairs = t_tokens * k
    cfg_gu, cfg_dn = _configs(tiles, pairs, experts.num_experts)
    rows = max(pairs, cfg_gu.block_m, cfg_dn.block_m)       # Pallas tiles need >= block_m rows

    order, offsets = sort_pairs(ids, experts)
    src = jnp.zeros((rows,), jnp.int32).at[:pairs].set(order)                  # padding rows: pair 0
    x_sorted = x[src // k]                                                       # [rows, H]
    row_w = jnp.zeros((rows,), jnp.float32).at[:pairs].set(weights.reshape(-1).astype(jnp.float32)[order])

    if all(offs is None for offs in offsets):
        return jnp.zeros_like(x)
    inter = next(p.gate.n for p in experts.pools if p.size)
    h = jnp.zeros((rows, inter), x.dtype)
    for pool, offs in zip(experts.pools, offsets):
        if offs is not None:
            h = api.gate_up(x_sorted, pool.gate, pool.up, offs, out=h, config=cfg_gu, interpret=interpret)
    y = jnp.zeros((rows, hidden), jnp.float32)
    for pool, offs in zip(experts.pools, offsets):
        if offs is not None:
            y = api.down(h, pool.down, offs, row_w, out=y, config=cfg_dn, interpret=interpret)

    inverse = jnp.zeros((pairs,), jnp.int32).at[order].set(jnp.arange(pairs, dtype=jnp.int32))
    return y[inverse].reshape(t_tokens, k, hidden).sum(axis=1).astype(x.dtype)

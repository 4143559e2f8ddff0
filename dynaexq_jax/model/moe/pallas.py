"""The Pallas backend of the MoE op: the adapter from ExpertPools to the grouped kernels of
pallas_kernels (plain arrays, static format metadata).

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
and slots are clipped into the pool (base.py's contract).
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from dynaexq_jax.errors import QuantFormatError
from dynaexq_jax.model.moe.base import ExpertPools
from pallas_kernels import compat
from pallas_kernels.grouped_matmul import SWIGLU, Activation, TileConfig, default_config, down, gate_up
from pallas_kernels.packing import KernelFormatError

INTERPRET_WARNING = ("the pallas MoE backend found no GPU and runs the Pallas kernels in the interpreter, "
                     "orders of magnitude slower than on a GPU (about 10 tokens/s on the default model); "
                     "on a CPU use the default backend, xla")


@functools.cache
def _warn_interpreted() -> None:
    """Once per process: the interpreter is a correctness tool, not a way to serve."""
    warnings.warn(INTERPRET_WARNING, stacklevel=2)


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


@functools.partial(jax.jit, static_argnames=("interpret", "tiles", "activation"))
def moe_experts_pallas(x, ids, weights, experts: ExpertPools, *, interpret: bool | None = None, tiles=None,
                       activation: Activation = SWIGLU):
    """x [T, H], ids int32 [T, k], weights [T, k] -> [T, H] (x.dtype); the pools' biases (if any) and
    the activation go into the kernels' epilogues.
    interpret: None = interpret mode (with a warning, once per process) unless the default backend
    is a GPU. tiles: None (chosen per shape), a TileConfig for both kernels, or (gate_up, down)."""
    if interpret is None:
        interpret = compat.default_interpret()
        if interpret:
            _warn_interpreted()
    t_tokens, hidden = x.shape
    k = ids.shape[1]
    pairs = t_tokens * k
    cfg_gu, cfg_dn = _configs(tiles, pairs, experts.num_experts)
    rows = max(pairs, cfg_gu.block_m, cfg_dn.block_m)       # Pallas tiles need >= block_m rows

    order, offsets = sort_pairs(ids, experts)
    if all(offs is None for offs in offsets):
        return jnp.zeros_like(x)
    src = jnp.zeros((rows,), jnp.int32).at[:pairs].set(order)                  # padding rows: pair 0
    x_sorted = x[src // k]                                                       # [rows, H]
    row_w = jnp.zeros((rows,), jnp.float32).at[:pairs].set(weights.reshape(-1).astype(jnp.float32)[order])

    inter = next(p.gate.n for p in experts.pools if p.size)
    h = jnp.zeros((rows, inter), x.dtype)
    y = jnp.zeros((rows, hidden), jnp.float32)
    try:
        for pool, offs in zip(experts.pools, offsets):
            if offs is not None:
                h = gate_up(x_sorted, pool.gate.data, pool.up.data, offs, fmt=pool.gate.fmt.kernel_format,
                            gate_scales=pool.gate.scales, up_scales=pool.up.scales, out=h, config=cfg_gu,
                            interpret=interpret, gate_bias=pool.gate_bias, up_bias=pool.up_bias,
                            activation=activation, gate_zeros=pool.gate.zeros, up_zeros=pool.up.zeros)
        for pool, offs in zip(experts.pools, offsets):
            if offs is not None:
                y = down(h, pool.down.data, offs, row_w, fmt=pool.down.fmt.kernel_format, scales=pool.down.scales,
                         out=y, config=cfg_dn, interpret=interpret, bias=pool.down_bias, zeros=pool.down.zeros)
    except KernelFormatError as e:          # a format the kernels cannot read: the model's typed error
        raise QuantFormatError(str(e)) from e

    inverse = jnp.zeros((pairs,), jnp.int32).at[order].set(jnp.arange(pairs, dtype=jnp.int32))
    return y[inverse].reshape(t_tokens, k, hidden).sum(axis=1).astype(x.dtype)

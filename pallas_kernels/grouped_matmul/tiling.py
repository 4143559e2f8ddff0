"""Tile configurations and the per-tile group metadata shared by every grouped-matmul backend.

Rows of the left operand are sorted by group: group g owns rows [offsets[g], offsets[g+1]). A row
tile never straddles two groups: group g is cut into ceil(size_g / block_m) tiles that start at
offsets[g] (not at a multiple of block_m), so each tile reads the weights of exactly one slot and
masks only its tail. The tile list is built on device from the offsets (no host sync) and padded
to a static upper bound; padding tiles are empty (lo == hi) and exit at once.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """block_m rows x block_n columns per program; block_k = rows of the stored weight read per K
    step (for packed formats an upper bound: a step never crosses a quantization group, so it
    uses one scale row). Every block dim is a power of two and, being a Triton dot dim, >= 16."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"TileConfig.{name}={v}: must be a power of two >= 16")


# Decode: a handful of rows per expert, the kernel streams weights (memory-bound). Small row tiles
# waste little MMA work on masked rows; narrow column tiles give enough programs to keep every
# SM streaming (8 experts x 768/64 = 96 programs per kernel at batch 1); a deep pipeline of
# small K steps keeps loads in flight. (num_stages is lowered where the shared memory of the
# format's tiles would not fit; see pallas_triton.SMEM_BUDGET.)
DECODE = TileConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=4)
# Prefill: many rows per expert, each weight tile is reused across block_m rows (compute-bound);
# 8 warps hold the two [64, 128] f32 accumulators of gate+up without spilling.
PREFILL = TileConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)
DEFAULT_CONFIGS = {"decode": DECODE, "prefill": PREFILL}


def default_config(rows: int, num_experts: int) -> TileConfig:
    """rows = routed (token, expert) pairs; decode tiles while an expert gets < 32 rows on average."""
    return DECODE if rows < 32 * num_experts else PREFILL


def max_tiles(rows: int, groups: int, block_m: int) -> int:
    """Upper bound of sum_g ceil(size_g / block_m) over at most `groups` non-empty groups whose
    sizes add up to at most `rows`: each non-empty group wastes at most block_m - 1 rows."""
    return max(1, (rows + min(groups, rows) * (block_m - 1)) // block_m)


def group_tiles(group_offsets: jax.Array, rows: int, block_m: int) -> jax.Array:
    """group_offsets: int32 [G+1], non-decreasing, offsets[G] <= rows.
    Returns int32 [3, max_tiles]: (group, lo, hi) per row tile, rows [lo, hi) with hi - lo <= block_m;
    tiles past the real ones have lo == hi == 0."""
    offsets = group_offsets.astype(jnp.int32)
    lo_g, hi_g = offsets[:-1], offsets[1:]                      # [G]
    n_g = (hi_g - lo_g + block_m - 1) // block_m                # tiles per group [G]
    end_g = jnp.cumsum(n_g)                                     # [G]
    t = jnp.arange(max_tiles(rows, lo_g.shape[0], block_m), dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(end_g, t, side="right"), lo_g.shape[0] - 1).astype(jnp.int32)
    lo = lo_g[g] + (t - (end_g[g] - n_g[g])) * block_m
    hi = jnp.minimum(lo + block_m, hi_g[g])
    real = t < end_g[-1]
    return jnp.stack([g, jnp.where(real, lo, 0), jnp.where(real, hi, 0)])

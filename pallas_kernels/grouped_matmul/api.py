"""Grouped mixed-bit matmul ops: one signature, several implementations.

  gate_up(x, gate, up, group_offsets)           -> SiLU(x @ Wg[g]) * (x @ Wu[g])     [M, N], x.dtype
  down(h, w, group_offsets, row_weights)        -> row_weight * (h @ Wd[g])          [M, N], f32

Rows are sorted by group; group g (pool slot g) owns rows [offsets[g], offsets[g+1]); the weights
are a QTensor stack [S, K, N] in any quant.py format. Rows outside every group keep their value in
`out` (zeros by default), so several calls (one per tier) can fill one buffer.

implementation: "triton" (Pallas, Triton lowering; interpret mode off GPU) or "xla" (the pure-JAX
reference). A Mosaic GPU kernel would be one more entry with the same signature.
"""
from __future__ import annotations

import jax.numpy as jnp

from dynaexq_jax.model.quant import QTensor
from pallas_kernels import compat
from pallas_kernels.grouped_matmul import pallas_triton, reference
from pallas_kernels.grouped_matmul.tiling import TileConfig, default_config, group_tiles

IMPLEMENTATIONS = ("triton", "xla")


def _check(implementation: str, group_offsets, w: QTensor):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown grouped-matmul implementation '{implementation}' (use one of {IMPLEMENTATIONS})")
    if w.data.ndim != 3 or group_offsets.shape != (w.data.shape[0] + 1,):
        raise ValueError(f"group_offsets must be [S+1] for weights [S, K, N]; got {group_offsets.shape} "
                         f"and {w.data.shape}")


def _pad_rows(a, rows: int):
    """Pallas tiles read block_m rows at a time: give arrays with fewer rows zero padding."""
    return a if a.shape[0] >= rows else jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def gate_up(x, gate: QTensor, up: QTensor, group_offsets, *, out=None, config: TileConfig | None = None,
            implementation: str = "triton", interpret: bool | None = None):
    """x [M, K], gate/up [S, K, N], group_offsets int32 [S+1] -> [M, N] in x.dtype."""
    _check(implementation, group_offsets, gate)
    m = x.shape[0]
    out = jnp.zeros((m, gate.n), x.dtype) if out is None else out
    if implementation == "xla":
        return reference.gate_up_reference(x, gate, up, group_offsets, out)
    config = config or default_config(m, gate.data.shape[0])
    interpret = compat.default_interpret() if interpret is None else interpret
    tiles = group_tiles(group_offsets, m, config.block_m)
    y = pallas_triton.gate_up(_pad_rows(x, config.block_m), gate, up, tiles, _pad_rows(out, config.block_m),
                              config=config, interpret=interpret)
    return y[:m]


def down(h, w: QTensor, group_offsets, row_weights, *, out=None, config: TileConfig | None = None,
         implementation: str = "triton", interpret: bool | None = None):
    """h [M, K], w [S, K, N], group_offsets int32 [S+1], row_weights [M] -> [M, N] f32."""
    _check(implementation, group_offsets, w)
    m = h.shape[0]
    out = jnp.zeros((m, w.n), jnp.float32) if out is None else out
    if implementation == "xla":
        return reference.down_reference(h, w, group_offsets, row_weights, out)
    config = config or default_config(m, w.data.shape[0])
    interpret = compat.default_interpret() if interpret is None else interpret
    tiles = group_tiles(group_offsets, m, config.block_m)
    y = pallas_triton.down(_pad_rows(h, config.block_m), w, tiles, _pad_rows(row_weights, config.block_m),
                           _pad_rows(out, config.block_m), config=config, interpret=interpret)
    return y[:m]

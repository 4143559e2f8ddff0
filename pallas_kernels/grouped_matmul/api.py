"""Grouped mixed-bit matmul ops over plain arrays: one signature, several implementations.

  gate_up(x, gate, up, group_offsets, fmt=...)             -> SiLU(x @ Wg[g]) * (x @ Wu[g])   [M, N], x.dtype
  down(h, w, group_offsets, row_weights, fmt=...)          -> row_weight * (h @ Wd[g])        [M, N], f32

Optional per-slot biases ([S, N]: gate_bias/up_bias, bias) are added to the products, and
gate_up's activation (activation.py: SwiGLU, or gpt-oss's clamped SwiGLU) is static metadata;
without them the kernels are the plain SwiGLU ones.

Rows are sorted by group; group g (pool slot g) owns rows [offsets[g], offsets[g+1]). A weight is
a stack [S, K, N] stored as `data` in `fmt` (packing.py: uint8 [S, K/p, N] plus scales
[S, K/group, N] for int formats, and zeros of the scales' shape for asymmetric ones (fmt.zero),
float [S, K, N] without scales). Rows outside every group keep
their value in `out` (zeros by default), so several calls (one per format) can fill one buffer.

implementation: "triton" (Pallas, Triton lowering; interpret mode off GPU) or "xla" (the pure-JAX
reference). A Mosaic GPU kernel would be one more entry with the same signature.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels.grouped_matmul import pallas_triton, reference
from pallas_kernels.grouped_matmul.activation import SWIGLU, Activation
from pallas_kernels.grouped_matmul.tiling import TileConfig, default_config, group_tiles
from pallas_kernels.packing import WeightFormat, check_weights

IMPLEMENTATIONS = ("triton", "xla")


def _check(implementation: str, group_offsets, data, scales, fmt: WeightFormat, zeros=None) -> tuple[int, int]:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown grouped-matmul implementation '{implementation}' (use one of {IMPLEMENTATIONS})")
    if data.ndim != 3 or group_offsets.shape != (data.shape[0] + 1,):
        raise ValueError(f"group_offsets must be [S+1] for weights [S, K, N]; got {group_offsets.shape} "
                         f"and {data.shape}")
    return check_weights(data, scales, fmt, zeros)


def _pad_rows(a, rows: int):
    """Pallas tiles read block_m rows at a time: give arrays with fewer rows zero padding."""
    return a if a.shape[0] >= rows else jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def gate_up(x, gate, up, group_offsets, *, fmt: WeightFormat, gate_scales=None, up_scales=None, out=None,
            config: TileConfig | None = None, implementation: str = "triton", interpret: bool | None = None,
            gate_bias=None, up_bias=None, activation: Activation = SWIGLU, gate_zeros=None, up_zeros=None):
    """x [M, K], gate/up [S, K/p, N] in fmt (+ scales and zeros [S, K/g, N], + biases [S, N]),
    group_offsets int32 [S+1] -> [M, N] in x.dtype."""
    _, n = _check(implementation, group_offsets, gate, gate_scales, fmt, gate_zeros)
    check_weights(up, up_scales, fmt, up_zeros)
    if up.shape != gate.shape:
        raise ValueError(f"gate and up weights must have one shape; got {gate.shape} and {up.shape}")
    m = x.shape[0]
    out = jnp.zeros((m, n), x.dtype) if out is None else out
    if implementation == "xla":
        return reference.gate_up_reference(x, gate, up, group_offsets, fmt=fmt, gate_scales=gate_scales,
                                           up_scales=up_scales, out=out, gate_bias=gate_bias, up_bias=up_bias,
                                           activation=activation, gate_zeros=gate_zeros, up_zeros=up_zeros)
    config = config or default_config(m, gate.shape[0])
    interpret = compat.default_interpret() if interpret is None else interpret
    tiles = group_tiles(group_offsets, m, config.block_m)
    y = pallas_triton.gate_up(_pad_rows(x, config.block_m), (gate, gate_scales, gate_zeros), (up, up_scales, up_zeros),
                              tiles, _pad_rows(out, config.block_m), fmt=fmt, config=config, interpret=interpret,
                              biases=(gate_bias, up_bias), activation=activation)
    return y[:m]


def down(h, w, group_offsets, row_weights, *, fmt: WeightFormat, scales=None, out=None,
         config: TileConfig | None = None, implementation: str = "triton", interpret: bool | None = None,
         bias=None, zeros=None):
    """h [M, K], w [S, K/p, N] in fmt (+ scales and zeros [S, K/g, N], + bias [S, N]), group_offsets
    int32 [S+1], row_weights [M] -> [M, N] f32."""
    _, n = _check(implementation, group_offsets, w, scales, fmt, zeros)
    m = h.shape[0]
    out = jnp.zeros((m, n), jnp.float32) if out is None else out
    if implementation == "xla":
        return reference.down_reference(h, w, group_offsets, row_weights, fmt=fmt, scales=scales, out=out,
                                        bias=bias, zeros=zeros)
    config = config or default_config(m, w.shape[0])
    interpret = compat.default_interpret() if interpret is None else interpret
    tiles = group_tiles(group_offsets, m, config.block_m)
    y = pallas_triton.down(_pad_rows(h, config.block_m), (w, scales, zeros), tiles,
                           _pad_rows(row_weights, config.block_m), _pad_rows(out, config.block_m), fmt=fmt,
                           config=config, interpret=interpret, bias=bias)
    return y[:m]

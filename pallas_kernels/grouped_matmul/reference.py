"""Pure-JAX references of the grouped mixed-bit matmuls (dense, f32, HIGHEST precision).

Semantics shared with every backend: rows of x are sorted by group; group g (= pool slot g) owns
rows [offsets[g], offsets[g+1]). Rows outside [offsets[0], offsets[G]) are not written: they keep
the value they have in `out` (zeros when out is None).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.activation import SWIGLU, Activation, glu
from pallas_kernels.packing import WeightFormat, dequantize

_HIGHEST = jax.lax.Precision.HIGHEST


def row_groups(group_offsets: jax.Array, rows: int):
    """-> (group of each row int32 [rows] (clipped into range), row is in some group bool [rows])."""
    r = jnp.arange(rows, dtype=jnp.int32)
    g = jnp.searchsorted(group_offsets[1:], r, side="right").astype(jnp.int32)
    inside = (r >= group_offsets[0]) & (r < group_offsets[-1])
    return jnp.minimum(g, group_offsets.shape[0] - 2), inside


def _grouped_dot(x, data, scales, fmt: WeightFormat, group_offsets, bias=None, zeros=None):
    """x [M, K] @ w[group(row)] (+ bias[group(row)]) -> f32 [M, N] (the dequantized slot of each row's group)."""
    g, inside = row_groups(group_offsets, x.shape[0])
    w_rows = dequantize(data, scales, fmt, zeros=zeros)[g]                # [M, K, N]
    y = jnp.einsum("mk,mkn->mn", x.astype(jnp.float32), w_rows, precision=_HIGHEST)
    return (y if bias is None else y + bias.astype(jnp.float32)[g]), inside


def gate_up_reference(x, gate, up, group_offsets, *, fmt: WeightFormat, gate_scales=None, up_scales=None,
                      out=None, gate_bias=None, up_bias=None, activation: Activation = SWIGLU,
                      gate_zeros=None, up_zeros=None):
    """x [M, K], gate/up [S, K/p, N] in fmt (+ scales and zeros [S, K/g, N], + biases [S, N]),
    offsets int32 [S+1] -> activation(x@Wg + bg, x@Wu + bu) [M, N], x.dtype (SiLU(x@Wg) * (x@Wu) by
    default)."""
    g, inside = _grouped_dot(x, gate, gate_scales, fmt, group_offsets, gate_bias, gate_zeros)
    u, _ = _grouped_dot(x, up, up_scales, fmt, group_offsets, up_bias, up_zeros)
    h = glu(g, u, activation).astype(x.dtype)
    out = jnp.zeros(h.shape, x.dtype) if out is None else out
    return jnp.where(inside[:, None], h, out)


def down_reference(h, w, group_offsets, row_weights, *, fmt: WeightFormat, scales=None, out=None, bias=None,
                   zeros=None):
    """h [M, K], w [S, K/p, N] in fmt (+ scales and zeros [S, K/g, N], + bias [S, N]), offsets int32
    [S+1], row_weights [M] -> row_weights * (h@Wd + bd) [M, N], f32."""
    y, inside = _grouped_dot(h, w, scales, fmt, group_offsets, bias, zeros)
    y = y * row_weights.astype(jnp.float32)[:, None]
    out = jnp.zeros(y.shape, jnp.float32) if out is None else out
    return jnp.where(inside[:, None], y, out)

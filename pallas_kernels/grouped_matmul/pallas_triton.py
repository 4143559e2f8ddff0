"""Grouped mixed-bit matmuls in Pallas with the Triton lowering.

Grid: (row tile t, column tile j). Tile t covers rows [lo, hi) of one group (see tiling.py); the
group is a pool slot, so every program streams the weights of one expert, K step by K step:

  packed formats (uint8 [S, K*bits/8, N], scales [S, K/g, N]; p sub-tiles per block): a step
  reads `bkb` byte rows of one quantization block (of each of its planes: int3 has three);
  shift-and-mask j of those bytes is an independent sub-tile holding weight rows
  block*g + j*g/p + [off, off + bkb)  (packing.py's layout), so it is multiplied with exactly that
  column slice of x. The step's partial sum is scaled once by the block's scale row (per column),
  since one step never leaves one block: no interleave, no join; asymmetric formats add the
  block's zero row times the step's row sums of x.
  float formats (bf16/fp16/f32 [S, K, N]): a step is a plain [bk, bn] tile.

Accumulation is f32. Integer codes are exact in bf16/fp16, so dots run in x's dtype.
A row tile starts at the group's first row, not at a multiple of block_m; near the end of the
array it is shifted back (row0 = min(lo, M - block_m)) so that every load and store stays in
bounds, and the store is masked to [lo, hi). Rows of x outside the group are read but their
results are never stored. The output buffer is aliased in and out: rows of other groups (other
tiers) pass through untouched.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import compat
from pallas_kernels.grouped_matmul.activation import SWIGLU, Activation, glu
from pallas_kernels.grouped_matmul.tiling import TileConfig
from pallas_kernels.packing import KernelFormatError, WeightFormat, check_weights, code_parts


def _largest_pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


# Shared memory a kernel may use for its pipeline: ~99 KiB per block on sm_86 / sm_89 / sm_120
# (the A6000 and RTX 5090 of the paper), more on A100 / H100; one budget keeps every target valid.
SMEM_BUDGET = 96 * 1024


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static shape of one kernel specialization."""
    m: int              # rows of x and of the output (>= bm)
    k: int              # logical reduction dim
    n: int              # output columns
    bm: int
    bn: int
    bkb: int            # stored rows per K step (of each plane)
    fmt: WeightFormat
    group: int          # logical rows per scale row (k for float formats)
    compute_dtype: np.dtype
    w_dtype: np.dtype   # of the stored weights (uint8 for int formats)

    @property
    def p(self) -> int:
        return self.fmt.subtiles

    @property
    def set_rows(self) -> int:
        """K rows per sub-tile of a quantization block (g / p; the stored rows of each of the
        block's planes); k for float formats."""
        return self.group // self.p

    @property
    def steps(self) -> int:
        return self.k // self.p // self.bkb

    def num_stages(self, config: TileConfig, n_weights: int) -> int:
        """Pipeline depth that fits SMEM_BUDGET: Triton keeps one copy of each K step's x and
        weight tiles in shared memory per stage."""
        x_bytes = self.bm * self.bkb * self.p * self.compute_dtype.itemsize
        w_bytes = n_weights * self.fmt.planes * self.bkb * self.bn * self.w_dtype.itemsize
        return max(1, min(config.num_stages, SMEM_BUDGET // (x_bytes + w_bytes)))


def make_plan(x_shape, x_dtype, w_data, w_scales, w_zeros, fmt: WeightFormat, config: TileConfig) -> _Plan:
    """Validate shapes against the Triton constraints and pick the block sizes.
    w_data/w_scales/w_zeros: arrays or ShapeDtypeStructs (zeros: None unless fmt.zero) of one
    weight stack in fmt."""
    m, k = x_shape
    wk, n = check_weights(w_data, w_scales, fmt, w_zeros)
    if wk != k:
        raise ValueError(f"grouped matmul: x has K={k} but the weights have K={wk}")
    bn = _largest_pow2_divisor(n, config.block_n)
    if bn < 16:
        raise ValueError(f"grouped matmul: N={n} needs a power-of-two divisor >= 16 for the Triton kernel")
    if fmt.is_int:
        group = fmt.group_for(k)
        bkb = _largest_pow2_divisor(group // fmt.subtiles, config.block_k)
        if bkb < 16:
            raise KernelFormatError(
                f"format {fmt.name}: a quantization block's sub-tiles hold {group // fmt.subtiles} rows; the "
                f"Triton kernel needs a power-of-two divisor >= 16 of it (use a larger group)")
        cd = np.dtype(x_dtype)
    else:
        group = k
        bkb = _largest_pow2_divisor(k, config.block_k)
        if bkb < 16:
            raise ValueError(f"grouped matmul: K={k} needs a power-of-two divisor >= 16 for the Triton kernel")
        cd = np.dtype(jnp.promote_types(x_dtype, w_data.dtype))
    if max(int(np.prod(w_data.shape)), m * max(k, n)) >= 2**31:
        raise ValueError(f"grouped matmul: operands of 2**31 elements or more overflow the kernel's int32 "
                         f"offsets (weights {w_data.shape}, x [{m}, {k}]); split the pool")
    if m < config.block_m:
        raise ValueError(f"grouped matmul: {m} rows < block_m={config.block_m}; pad the rows first")
    return _Plan(m=m, k=k, n=n, bm=config.block_m, bn=bn, bkb=bkb, fmt=fmt, group=group,
                 compute_dtype=cd, w_dtype=np.dtype(w_data.dtype))


def _x_subtiles(x_ref, row0, s, plan: _Plan):
    """The p column slices of x [bm, bkb] that multiply the p unpacked sub-tiles of K step s."""
    rows = pl.ds(row0, plan.bm)
    if not plan.fmt.is_int:
        return [plgpu.load(x_ref.at[rows, pl.ds(s * plan.bkb, plan.bkb)]).astype(plan.compute_dtype)]
    block, off = _quant_block(s, plan), _offset_in_block(s, plan)
    return [plgpu.load(x_ref.at[rows, pl.ds(block * plan.group + j * plan.set_rows + off, plan.bkb)])
            .astype(plan.compute_dtype) for j in range(plan.p)]


def _quant_block(s, plan: _Plan):
    """Quantization block (= scale row) of K step s. lax.div, not //: jnp's floor division emits
    sign fix-ups the Triton lowering rejects, and s >= 0 anyway."""
    per_block = plan.set_rows // plan.bkb
    return s if per_block == 1 else jax.lax.div(s, jnp.int32(per_block))


def _offset_in_block(s, plan: _Plan):
    """The first row of K step s inside its block's sub-tiles (and planes)."""
    return s * plan.bkb - _quant_block(s, plan) * plan.set_rows


def _step_product(w_refs, slot, s, n0, xs, plan: _Plan):
    """sum_j xs[j] @ W_j for K step s of slot `slot`, columns [n0, n0+bn) -> f32 [bm, bn]."""
    data_ref, scale_ref, zero_ref = w_refs
    cols = pl.ds(n0, plan.bn)
    dot = functools.partial(jax.lax.dot, preferred_element_type=jnp.float32)
    if not plan.fmt.is_int:
        w = plgpu.load(data_ref.at[slot, pl.ds(s * plan.bkb, plan.bkb), cols])     # [bkb, bn]
        return dot(xs[0], w.astype(plan.compute_dtype))
    # The step's rows of each plane of its block (one plane but for int3): [bkb, bn] each.
    first = _quant_block(s, plan) * plan.fmt.planes * plan.set_rows + _offset_in_block(s, plan)
    planes = [plgpu.load(data_ref.at[slot, pl.ds(first + i * plan.set_rows, plan.bkb), cols]).astype(jnp.int32)
              for i in range(plan.fmt.planes)]
    acc = None
    for j in range(plan.p):
        q = sum(((planes[i] >> at) & ((1 << bits) - 1)) << low
                for i, at, bits, low in code_parts(plan.fmt, j)) - plan.fmt.offset     # [bkb, bn]
        part = dot(xs[j], q.astype(plan.compute_dtype))
        acc = part if acc is None else acc + part
    scale = plgpu.load(scale_ref.at[slot, _quant_block(s, plan), cols]).astype(jnp.float32)    # [bn]
    if zero_ref is None:
        return acc * scale[None, :]
    zero = plgpu.load(zero_ref.at[slot, _quant_block(s, plan), cols]).astype(jnp.float32)      # [bn]
    x_sum = sum(x.astype(jnp.float32).sum(axis=1) for x in xs)                 # [bm]: this step's rows
    return acc * scale[None, :] + x_sum[:, None] * zero[None, :]


def _tile(meta_ref, plan: _Plan):
    """-> (slot, lo, hi, row0, n0) of this program."""
    t, j = pl.program_id(0), pl.program_id(1)
    slot, lo, hi = meta_ref[0, t], meta_ref[1, t], meta_ref[2, t]
    row0 = jnp.minimum(lo, plan.m - plan.bm)
    n0 = pl.multiple_of(j * plan.bn, plan.bn)
    return slot, lo, hi, row0, n0


def _store_rows(o_ref, value, row0, lo, hi, n0, plan: _Plan):
    rows = row0 + jnp.arange(plan.bm, dtype=jnp.int32)
    mask = jnp.broadcast_to(((rows >= lo) & (rows < hi))[:, None], (plan.bm, plan.bn))
    plgpu.store(o_ref.at[pl.ds(row0, plan.bm), pl.ds(n0, plan.bn)], value.astype(o_ref.dtype), mask=mask)


def _split_weights(refs, fmt: WeightFormat, count: int):
    """refs -> [(data_ref, scale_ref or None, zero_ref or None)] * count, rest."""
    n = 3 if fmt.zero else 2 if fmt.is_int else 1       # the arrays of one weight (_weight_args)
    out = []
    for _ in range(count):
        out.append((*refs[:n], *[None] * (3 - n)))
        refs = refs[n:]
    return out, refs


def _bias_row(bias_ref, slot, n0, plan: _Plan):
    """The bias of slot `slot`, columns [n0, n0+bn) -> f32 [1, bn]."""
    return plgpu.load(bias_ref.at[slot, pl.ds(n0, plan.bn)]).astype(jnp.float32)[None, :]


def _gate_up_kernel(meta_ref, x_ref, *refs, plan: _Plan, act: Activation, has_bias: bool):
    # meta [3, T] int32; x [M, K]; gate/up data [S, K*bits/8, N] (+ scales, + zeros [S, K/g, N]);
    # (has_bias: gate/up biases [S, N]); h_in (aliased) and h_out [M, N]
    (gate, up), refs = _split_weights(refs, plan.fmt, 2)
    (gb_ref, ub_ref), (_, h_ref) = (refs[:2], refs[2:]) if has_bias else ((None, None), refs)
    slot, lo, hi, row0, n0 = _tile(meta_ref, plan)

    @pl.when(lo < hi)
    def _():
        def body(s, acc):
            xs = _x_subtiles(x_ref, row0, s, plan)
            return (acc[0] + _step_product(gate, slot, s, n0, xs, plan),
                    acc[1] + _step_product(up, slot, s, n0, xs, plan))

        zero = jnp.zeros((plan.bm, plan.bn), jnp.float32)
        g, u = jax.lax.fori_loop(0, plan.steps, body, (zero, zero))
        if has_bias:
            g, u = g + _bias_row(gb_ref, slot, n0, plan), u + _bias_row(ub_ref, slot, n0, plan)
        _store_rows(h_ref, glu(g, u, act), row0, lo, hi, n0, plan)


def _down_kernel(meta_ref, h_ref, *refs, plan: _Plan, has_bias: bool):
    # meta [3, T] int32; h [M, K]; down data [S, K*bits/8, N] (+ scales, + zeros); (has_bias: bias [S, N]);
    # row weights [M] f32; y_in (aliased) and y_out [M, N] f32
    (down,), refs = _split_weights(refs, plan.fmt, 1)
    (b_ref,), (rw_ref, _, y_ref) = (refs[:1], refs[1:]) if has_bias else ((None,), refs)
    slot, lo, hi, row0, n0 = _tile(meta_ref, plan)

    @pl.when(lo < hi)
    def _():
        def body(s, acc):
            return acc + _step_product(down, slot, s, n0, _x_subtiles(h_ref, row0, s, plan), plan)

        acc = jax.lax.fori_loop(0, plan.steps, body, jnp.zeros((plan.bm, plan.bn), jnp.float32))
        if has_bias:
            acc = acc + _bias_row(b_ref, slot, n0, plan)
        rw = plgpu.load(rw_ref.at[pl.ds(row0, plan.bm)])                       # [bm] f32
        _store_rows(y_ref, acc * rw[:, None], row0, lo, hi, n0, plan)


def _kernel_suffix(plan: _Plan, has_bias: bool = False, act: Activation = SWIGLU) -> str:
    """Names the specialization in profiles: int4, int8, ..., or the float weights' dtype (+ _bias,
    + the activation when not SwiGLU)."""
    name = f"int{plan.fmt.bits}" if plan.fmt.is_int else plan.w_dtype.name
    return name + ("_bias" if has_bias else "") + ("" if act == SWIGLU else f"_{act.kind}")


def _check_biases(biases, slots: int, n: int) -> list:
    """Biases (each [S, N] or all None) -> the kernel arguments (f32 [S, N] each; [] when absent)."""
    if all(b is None for b in biases):
        return []
    for b in biases:
        if b is None or tuple(b.shape) != (slots, n):
            raise ValueError(f"grouped matmul: biases must be given together, each [{slots}, {n}]; got "
                             f"{[None if b is None else list(b.shape) for b in biases]}")
    return [b.astype(jnp.float32) for b in biases]


def _weight_args(w, fmt: WeightFormat):
    """(data, scales, zeros) -> the kernel arguments fmt reads."""
    data, scales, zeros = w
    return [data, scales, zeros] if fmt.zero else [data, scales] if fmt.is_int else [data]


def gate_up(x, gate, up, tiles, out, *, fmt: WeightFormat, config: TileConfig, interpret: bool,
            biases=(None, None), activation: Activation = SWIGLU):
    """x [M, K] (M >= block_m), gate/up (data [S, K*bits/8, N], scales and zeros [S, K/g, N] or None) in fmt, of one
    shape; tiles int32 [3, T] (tiling.group_tiles), out [M, N] x.dtype (aliased); biases: (gate, up)
    [S, N] each, or None -> out with rows of every tile set to activation(x@Wg + bg, x@Wu + bu)
    (default SiLU(x@Wg) * (x@Wu))."""
    plan = make_plan(x.shape, x.dtype, *gate, fmt, config)
    bias_args = _check_biases(biases, gate[0].shape[0], plan.n)
    args = [tiles, x, *_weight_args(gate, fmt), *_weight_args(up, fmt), *bias_args, out]
    return pl.pallas_call(
        functools.partial(_gate_up_kernel, plan=plan, act=activation, has_bias=bool(bias_args)),
        out_shape=jax.ShapeDtypeStruct(out.shape, out.dtype),
        grid=(tiles.shape[1], plan.n // plan.bn),
        input_output_aliases={len(args) - 1: 0},
        compiler_params=compat.triton_params(config.num_warps, plan.num_stages(config, n_weights=2)),
        interpret=interpret,
        name=f"moe_gate_up_{_kernel_suffix(plan, bool(bias_args), activation)}",
    )(*args)


def down(h, w, tiles, row_weights, out, *, fmt: WeightFormat, config: TileConfig, interpret: bool, bias=None):
    """h [M, K] (M >= block_m), w (data [S, K*bits/8, N], scales and zeros [S, K/g, N] or None) in fmt, tiles int32
    [3, T], row_weights f32 [M], out [M, N] f32 (aliased), bias [S, N] or None -> out with rows of
    every tile set to row_weight * (h@Wd + bd)."""
    plan = make_plan(h.shape, h.dtype, *w, fmt, config)
    bias_args = _check_biases((bias,), w[0].shape[0], plan.n)
    args = [tiles, h, *_weight_args(w, fmt), *bias_args, row_weights.astype(jnp.float32), out]
    return pl.pallas_call(
        functools.partial(_down_kernel, plan=plan, has_bias=bool(bias_args)),
        out_shape=jax.ShapeDtypeStruct(out.shape, out.dtype),
        grid=(tiles.shape[1], plan.n // plan.bn),
        input_output_aliases={len(args) - 1: 0},
        compiler_params=compat.triton_params(config.num_warps, plan.num_stages(config, n_weights=1)),
        interpret=interpret,
        name=f"moe_down_{_kernel_suffix(plan, bool(bias_args))}",
    )(*args)

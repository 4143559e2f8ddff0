"""The Pallas grouped mixed-bit matmuls (plain arrays + static format metadata) against their
pure-JAX references: in interpret mode on a CPU, compiled for real on a GPU (interpret=None
everywhere). The MoE op built on them is in test_moe_backends.py. Inputs are
random on every run: the seed is drawn from os.urandom (or taken from DYNAEXQ_TEST_SEED to
reproduce a failure) and printed in every assertion message."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax.model.quant import parse_format, quantize
from pallas_kernels import compat
from pallas_kernels.grouped_matmul import (
    DECODE,
    PREFILL,
    SWIGLU,
    TileConfig,
    clamped_swiglu,
    down,
    down_reference,
    gate_up,
    gate_up_reference,
    group_tiles,
    max_tiles,
)
from pallas_kernels.packing import FLOAT, KernelFormatError, WeightFormat, check_weights

FORMATS = ("f32", "bf16", "fp16", "int8", "int4", "int2")
# (format, x dtype): every format with bf16 activations, plus f32 / fp16 activations where the
# compute dtype changes (f32 dots, mixed float weights promoted to f32, fp16 dots on int codes),
# and per-channel scales (one scale row for all of K: several K steps per scale row).
CASES = [(f, "bfloat16") for f in FORMATS] + [
    ("f32", "float32"), ("int4", "float32"), ("bf16", "float16"), ("int2", "float16"),
    ("int8:channel", "bfloat16"), ("int4:channel", "float32")]
# Small tiles so that small shapes still span several row/column tiles and K steps; block_k=16
# splits a quantization block over several K steps (more than one step per scale row).
SMALL = TileConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
SPLIT_K = TileConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2)
CONFIGS = (DECODE, PREFILL, SMALL, SPLIT_K)


def _seed() -> int:
    return int(os.environ.get("DYNAEXQ_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


def _fmt(kind: str, rng, k: int):
    """A random valid group size for `kind` and input dim k (>= 16 stored rows per block)."""
    if kind in ("f32", "bf16", "fp16") or ":" in kind:
        return parse_format(kind)
    p = 8 // int(kind[3:])
    groups = [g for g in (16 * p, 32 * p, 64 * p, 128) if k % g == 0]
    return parse_format(f"{kind}:g{rng.choice(groups)}")


def _offsets(rng, rows: int, slots: int) -> np.ndarray:
    """Random group offsets [slots+1] inside [0, rows): ragged, some groups empty, rows left over
    before the first and after the last group."""
    start = int(rng.integers(0, min(4, rows) + 1))
    end = int(rng.integers(start, rows + 1))
    cuts = np.sort(rng.integers(start, end + 1, slots - 1))
    if slots >= 3:
        j = rng.integers(0, slots - 2)
        cuts[j] = cuts[j + 1]                                   # at least one empty group
    return np.concatenate([[start], cuts, [end]]).astype(np.int32)


def _assert_close(actual, expected, dtype, seed, what):
    a = np.asarray(jnp.asarray(actual, jnp.float32))
    e = np.asarray(jnp.asarray(expected, jnp.float32))
    assert np.isfinite(a).all(), f"{what}: NaN/inf in the kernel output (seed={seed})"
    # f32 accumulation in a different order; outputs rounded once to `dtype`.
    eps = float(jnp.finfo(dtype).eps)
    scale = max(float(np.abs(e).max()), 1e-3)
    tol = 2 * eps * scale + 1e-5 * scale
    err = float(np.abs(a - e).max())
    assert err <= tol, f"{what}: max |err| {err:.3g} > {tol:.3g} (scale {scale:.3g}, seed={seed})"


class _Weights:
    """A random weight stack [s, k, n] quantized by the model's quantize, as the kernels take it."""

    def __init__(self, rng, fmt, s, k, n):
        q = jax.device_put(quantize((rng.standard_normal((s, k, n)) * 0.1).astype(np.float32), fmt))
        self.data, self.scales, self.fmt = q.data, q.scales, q.fmt.kernel_format


@pytest.mark.parametrize("kind,x_dtype", CASES)
def test_gate_up_kernel_matches_reference(kind, x_dtype):
    seed = _seed()
    rng = np.random.default_rng(seed)
    s, k, n = int(rng.integers(1, 6)), int(rng.choice([64, 128, 192, 256])), int(rng.choice([32, 64, 96, 128]))
    m = int(rng.integers(1, 90))
    fmt = _fmt(kind, rng, k)
    config = CONFIGS[rng.integers(len(CONFIGS))]
    gate, up = _Weights(rng, fmt, s, k, n), _Weights(rng, fmt, s, k, n)
    x = jnp.asarray(rng.standard_normal((m, k)), x_dtype)
    offsets = jnp.asarray(_offsets(rng, m, s))
    out = jnp.asarray(rng.standard_normal((m, n)), x_dtype)      # rows outside every group must survive
    what = f"gate_up {fmt} x={x_dtype} S={s} K={k} N={n} M={m} offsets={offsets.tolist()} {config}"

    kw = dict(fmt=gate.fmt, gate_scales=gate.scales, up_scales=up.scales, out=out)
    got = gate_up(x, gate.data, up.data, offsets, config=config, **kw)
    want = gate_up_reference(x, gate.data, up.data, offsets, **kw)
    assert got.shape == (m, n) and got.dtype == x.dtype, what
    _assert_close(got, want, x.dtype, seed, what)


@pytest.mark.parametrize("kind,x_dtype", CASES)
def test_down_kernel_matches_reference(kind, x_dtype):
    seed = _seed()
    rng = np.random.default_rng(seed)
    s, k, n = int(rng.integers(1, 6)), int(rng.choice([64, 128, 256])), int(rng.choice([32, 64, 96, 128]))
    m = int(rng.integers(1, 90))
    fmt = _fmt(kind, rng, k)
    config = CONFIGS[rng.integers(len(CONFIGS))]
    w = _Weights(rng, fmt, s, k, n)
    h = jnp.asarray(rng.standard_normal((m, k)), x_dtype)
    row_w = jnp.asarray(rng.random(m), jnp.float32)
    offsets = jnp.asarray(_offsets(rng, m, s))
    what = f"down {fmt} h={x_dtype} S={s} K={k} N={n} M={m} offsets={offsets.tolist()} {config}"

    got = down(h, w.data, offsets, row_w, fmt=w.fmt, scales=w.scales, config=config)
    want = down_reference(h, w.data, offsets, row_w, fmt=w.fmt, scales=w.scales)
    assert got.shape == (m, n) and got.dtype == jnp.float32, what
    _assert_close(got, want, jnp.float32, seed, what)


@pytest.mark.parametrize("kind,x_dtype", [("bf16", "bfloat16"), ("int4", "float32"), ("int8", "bfloat16")])
def test_gpt_oss_epilogues_match_reference(kind, x_dtype):
    """Per-slot biases in both kernels and gpt-oss's clamped SwiGLU, with a limit that clamps a
    good share of the gate and up products."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    s, k, n, m = int(rng.integers(2, 6)), 128, int(rng.choice([32, 64, 96])), int(rng.integers(20, 90))
    fmt = _fmt(kind, rng, k)
    config = CONFIGS[rng.integers(len(CONFIGS))]
    gate, up = _Weights(rng, fmt, s, k, n), _Weights(rng, fmt, s, k, n)
    dn = _Weights(rng, _fmt(kind, rng, 2 * n), s, 2 * n, k)
    gb, ub = (jnp.asarray(rng.standard_normal((s, n)), jnp.float32) for _ in range(2))
    db = jnp.asarray(rng.standard_normal((s, k)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((m, k)), x_dtype)
    # Every row in some group (so that the epilogue shows everywhere), groups ragged.
    offsets = jnp.asarray(np.concatenate([[0], np.sort(rng.integers(0, m + 1, s - 1)), [m]]).astype(np.int32))
    act = clamped_swiglu(1.702, 0.5)
    what = f"gpt-oss epilogues {fmt} x={x_dtype} S={s} N={n} M={m} offsets={offsets.tolist()} {config}"

    kw = dict(fmt=gate.fmt, gate_scales=gate.scales, up_scales=up.scales, gate_bias=gb, up_bias=ub, activation=act)
    got = gate_up(x, gate.data, up.data, offsets, config=config, **kw)
    _assert_close(got, gate_up_reference(x, gate.data, up.data, offsets, **kw), x.dtype, seed, what)
    g = np.asarray(gate_up_reference(x, gate.data, up.data, offsets, fmt=gate.fmt, gate_scales=gate.scales,
                                     up_scales=up.scales, activation=SWIGLU), np.float32)
    assert not np.allclose(g, np.asarray(jnp.asarray(got, jnp.float32)), atol=0.05), "the epilogue changed nothing"

    h = jnp.asarray(rng.standard_normal((m, 2 * n)), x_dtype)
    row_w = jnp.asarray(rng.random(m), jnp.float32)
    kw = dict(fmt=dn.fmt, scales=dn.scales, bias=db)
    got = down(h, dn.data, offsets, row_w, config=config, **kw)
    _assert_close(got, down_reference(h, dn.data, offsets, row_w, **kw), jnp.float32, seed, what)


def test_kernels_one_row_and_all_empty_groups():
    """A single routed row, and a call whose groups are all empty (writes nothing)."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    fmt = parse_format("int4:g32")
    gate, up, w = _Weights(rng, fmt, 3, 64, 32), _Weights(rng, fmt, 3, 64, 32), _Weights(rng, fmt, 3, 32, 64)
    x = jnp.asarray(rng.standard_normal((1, 64)), jnp.bfloat16)
    one = jnp.array([0, 0, 1, 1], jnp.int32)
    kw = dict(fmt=gate.fmt, gate_scales=gate.scales, up_scales=up.scales)
    _assert_close(gate_up(x, gate.data, up.data, one, **kw), gate_up_reference(x, gate.data, up.data, one, **kw),
                  jnp.bfloat16, seed, "gate_up, one row")
    none = jnp.array([1, 1, 1, 1], jnp.int32)
    out = jnp.full((1, 64), 7.0, jnp.float32)
    y = down(jnp.asarray(rng.standard_normal((1, 32)), jnp.bfloat16), w.data, none, jnp.ones((1,)), fmt=w.fmt,
             scales=w.scales, out=out)
    assert np.array_equal(np.asarray(y), np.asarray(out)), f"empty groups wrote rows (seed={seed})"


def test_group_tiles_cover_each_group_once():
    seed = _seed()
    rng = np.random.default_rng(seed)
    tiles_fn = jax.jit(group_tiles, static_argnums=(1, 2))
    shapes = [(int(rng.integers(1, 300)), int(rng.integers(1, 20)), bm) for bm in (16, 64)] + [(1, 1, 16)]
    for rows, slots, bm in shapes * 8:
        offsets = _offsets(rng, rows, slots)
        tiles = np.asarray(tiles_fn(jnp.asarray(offsets), rows, bm))
        assert tiles.shape == (3, max_tiles(rows, slots, bm))
        g, lo, hi = tiles
        real = lo < hi
        assert np.all(hi - lo <= bm) and np.all(lo[~real] == hi[~real])
        covered = np.zeros(rows, int)
        for gi, a, b in zip(g[real], lo[real], hi[real]):
            assert offsets[gi] <= a < b <= offsets[gi + 1], f"tile outside its group (seed={seed})"
            covered[a:b] += 1
        inside = np.zeros(rows, int)
        inside[offsets[0]:offsets[-1]] = 1
        assert np.array_equal(covered, inside), f"rows not covered exactly once (seed={seed})"


def test_format_and_shape_errors_are_clear():
    rng = np.random.default_rng(0)
    x = jnp.zeros((4, 64), jnp.bfloat16)
    offs = jnp.array([0, 4], jnp.int32)
    w = _Weights(rng, parse_format("int2:g32"), 1, 64, 32)            # 8 byte rows per block
    with pytest.raises(KernelFormatError, match="int2:g32"):
        gate_up(x, w.data, w.data, offs, fmt=w.fmt, gate_scales=w.scales, up_scales=w.scales, interpret=True)
    with pytest.raises(KernelFormatError, match="scales must be"):
        down(x, w.data, offs, jnp.ones((4,)), fmt=w.fmt, interpret=True)
    w = _Weights(rng, parse_format("bf16"), 1, 64, 24)                # N=24: no pow2 divisor >= 16
    with pytest.raises(ValueError, match="N=24"):
        down(x, w.data, offs, jnp.ones((4,)), fmt=FLOAT, interpret=True)
    with pytest.raises(ValueError, match="group_offsets"):
        gate_up(x, w.data, w.data, jnp.array([0, 2, 4], jnp.int32), fmt=FLOAT, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(block_m=24, block_n=64, block_k=64)
    for bad in (dict(kind="int", bits=5), dict(kind="int", bits=3, group=12), dict(kind="int", bits=4, group=33),
                dict(kind="float", bits=16), dict(kind="fp8")):
        with pytest.raises(KernelFormatError, match="WeightFormat"):
            WeightFormat(**bad)
    assert compat.default_interpret() is (jax.default_backend() != "gpu")


@pytest.mark.parametrize("kind", ["f32", "bf16", "int8", "int4:g32", "int3:g64", "int2:g64", "int4:channel",
                                  "int2:g32:hqq", "int3:g32:hqq"])
def test_model_formats_map_onto_kernel_formats(kind):
    """What the model quantizes, the kernels' static metadata describes (same packing, same name,
    zeros where the quantizer is asymmetric); weights that do not match it are refused by name."""
    q = quantize(np.ones((2, 128, 32), np.float32), kind)
    fmt = q.fmt.kernel_format
    assert (fmt.is_int, fmt.subtiles, fmt.offset) == (q.fmt.is_int, q.fmt.subtiles, q.fmt.offset if q.fmt.is_int else 0)
    assert q.data.shape == (2, q.fmt.packed_rows(128), 32) == (2, 128 * (q.fmt.bits if q.fmt.is_int else 8) // 8, 32)
    assert fmt.zero == q.fmt.has_zeros == (q.zeros is not None)
    assert fmt.name == ((q.fmt.name.replace(":hqq", ":zero") if fmt.zero else q.fmt.name) if q.fmt.is_int else "float")
    assert check_weights(q.data, q.scales, fmt, q.zeros) == (128, 32)
    if not fmt.is_int:
        return
    with pytest.raises(KernelFormatError, match="scales must be"):
        check_weights(q.data, q.scales[..., :1], fmt, q.zeros)
    if fmt.zero:
        for bad in (None, q.zeros[..., :1]):
            with pytest.raises(KernelFormatError, match="zeros must be"):
                check_weights(q.data, q.scales, fmt, bad)
    else:
        with pytest.raises(KernelFormatError, match="symmetric"):
            check_weights(q.data, q.scales, fmt, q.scales)

"""Pallas grouped mixed-bit matmuls and the mixed-tier MoE op against their pure-JAX references:
in interpret mode on a CPU, compiled for real on a GPU (interpret=None everywhere). Inputs are
random on every run: the seed is drawn from os.urandom (or taken from DYNAEXQ_TEST_SEED to
reproduce a failure) and printed in every assertion message."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax.errors import QuantFormatError
from dynaexq_jax.model.moe import ExpertPools, moe_experts, moe_experts_reference, quantize_experts, route
from dynaexq_jax.model.quant import parse_format, quantize
from pallas_kernels import compat
from pallas_kernels.grouped_matmul import (DECODE, PREFILL, TileConfig, default_config, down, down_reference,
                                           gate_up, gate_up_reference, group_tiles, max_tiles)
from pallas_kernels.moe import moe_experts_pallas, sort_pairs

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


def _weights(rng, fmt, s, k, n):
    return quantize((rng.standard_normal((s, k, n)) * 0.1).astype(np.float32), fmt)


@pytest.mark.parametrize("kind,x_dtype", CASES)
def test_gate_up_kernel_matches_reference(kind, x_dtype):
    seed = _seed()
    rng = np.random.default_rng(seed)
    s, k, n = int(rng.integers(1, 6)), int(rng.choice([64, 128, 192, 256])), int(rng.choice([32, 64, 96, 128]))
    m = int(rng.integers(1, 90))
    fmt = _fmt(kind, rng, k)
    config = CONFIGS[rng.integers(len(CONFIGS))]
    gate, up = _weights(rng, fmt, s, k, n), _weights(rng, fmt, s, k, n)
    x = jnp.asarray(rng.standard_normal((m, k)), x_dtype)
    offsets = jnp.asarray(_offsets(rng, m, s))
    out = jnp.asarray(rng.standard_normal((m, n)), x_dtype)      # rows outside every group must survive
    what = f"gate_up {fmt} x={x_dtype} S={s} K={k} N={n} M={m} offsets={offsets.tolist()} {config}"

    got = gate_up(x, gate, up, offsets, out=out, config=config)
    want = gate_up_reference(x, gate, up, offsets, out)
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
    w = _weights(rng, fmt, s, k, n)
    h = jnp.asarray(rng.standard_normal((m, k)), x_dtype)
    row_w = jnp.asarray(rng.random(m), jnp.float32)
    offsets = jnp.asarray(_offsets(rng, m, s))
    what = f"down {fmt} h={x_dtype} S={s} K={k} N={n} M={m} offsets={offsets.tolist()} {config}"

    got = down(h, w, offsets, row_w, config=config)
    want = down_reference(h, w, offsets, row_w)
    assert got.shape == (m, n) and got.dtype == jnp.float32, what
    _assert_close(got, want, jnp.float32, seed, what)


def test_kernels_one_row_and_all_empty_groups():
    """A single routed row, and a call whose groups are all empty (writes nothing)."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    fmt = parse_format("int4:g32")
    gate, up, w = _weights(rng, fmt, 3, 64, 32), _weights(rng, fmt, 3, 64, 32), _weights(rng, fmt, 3, 32, 64)
    x = jnp.asarray(rng.standard_normal((1, 64)), jnp.bfloat16)
    one = jnp.array([0, 0, 1, 1], jnp.int32)
    _assert_close(gate_up(x, gate, up, one), gate_up_reference(x, gate, up, one),
                  jnp.bfloat16, seed, "gate_up, one row")
    none = jnp.array([1, 1, 1, 1], jnp.int32)
    out = jnp.full((1, 64), 7.0, jnp.float32)
    y = down(jnp.asarray(rng.standard_normal((1, 32)), jnp.bfloat16), w, none, jnp.ones((1,)), out=out)
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


def _random_pools(rng, tiers, e, h, i):
    """Random float experts split at random between tiers; a random slot order in each pool."""
    gate = (rng.standard_normal((e, h, i)) * 0.1).astype(np.float32)
    up = (rng.standard_normal((e, h, i)) * 0.1).astype(np.float32)
    dn = (rng.standard_normal((e, i, h)) * 0.1).astype(np.float32)
    tier = rng.integers(0, len(tiers), e).astype(np.int32)
    slot = np.zeros(e, np.int32)
    pools = []
    for t, spec in enumerate(tiers):
        members = rng.permutation(np.flatnonzero(tier == t))
        slot[members] = np.arange(len(members))
        # A pool may hold spare slots no expert is assigned to (sized by the budget, not the split).
        spare = int(rng.integers(0, 2))
        pick = np.concatenate([members, rng.integers(0, e, spare)]).astype(int)
        fmt = _fmt(spec, rng, min(h, i))
        pools.append(quantize_experts(gate[pick], up[pick], dn[pick], fmt))
    return ExpertPools(tuple(pools), jnp.asarray(tier), jnp.asarray(slot))


@pytest.mark.parametrize("tiers,x_dtype", [
    (("bf16", "int4"), "bfloat16"),
    (("int4", "int2"), "bfloat16"),
    (("fp16", "int8"), "float32"),
    (("f32", "int2"), "float32"),
])
def test_moe_mixed_tiers_matches_reference(tiers, x_dtype):
    seed = _seed()
    rng = np.random.default_rng(seed)
    e, h, i = int(rng.integers(4, 17)), int(rng.choice([64, 128, 256])), int(rng.choice([64, 128]))
    k = int(rng.integers(1, min(e, 4) + 1))
    t = int(rng.choice([1, int(rng.integers(2, 40))]))
    experts = _random_pools(rng, tiers, e, h, i)
    x = jnp.asarray(rng.standard_normal((t, h)), x_dtype)
    ids, w, _ = route(x, jnp.asarray(rng.standard_normal((h, e)), jnp.float32), k, bool(rng.integers(2)))
    what = (f"moe tiers={[p.fmt.name for p in experts.pools]} x={x_dtype} E={e} H={h} I={i} T={t} k={k} "
            f"tier={np.asarray(experts.tier).tolist()}")

    got = moe_experts_pallas(x, ids, w, experts)              # interpret=None -> interpret on CPU
    want = moe_experts_reference(x, ids, w, experts)
    assert got.shape == x.shape and got.dtype == x.dtype, what
    # The kernels keep h = SiLU(g)*u in x's dtype between the two matmuls (the reference keeps f32).
    _assert_close(got, want, jnp.bfloat16 if x_dtype != "float32" else jnp.float32, seed, what)


def test_moe_prefill_tiles_and_backend_dispatch():
    """Enough rows per expert for the default prefill tiles; via dynaexq_jax.model.moe.moe_experts."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    e, h, i, k, t = 4, 64, 32, 2, 70
    assert default_config(t * k, e) == PREFILL and default_config(8, 128) == DECODE
    experts = _random_pools(rng, ("bf16", "int4:g32"), e, h, i)
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    ids, w, _ = route(x, jnp.asarray(rng.standard_normal((h, e)), jnp.float32), k, True)
    got = moe_experts(x, ids, w, experts, backend="pallas")
    _assert_close(got, moe_experts_reference(x, ids, w, experts), jnp.bfloat16, seed, "moe prefill")


def test_moe_empty_pool_and_invalid_tiers_contribute_nothing():
    seed = _seed()
    rng = np.random.default_rng(seed)
    e, h, i = 6, 64, 32
    full = _random_pools(rng, ("int8:g32",), e, h, i).pools[0]
    empty = quantize_experts(np.zeros((0, h, i), np.float32), np.zeros((0, h, i), np.float32),
                             np.zeros((0, i, h), np.float32), "bf16")
    tier = np.zeros(e, np.int32)
    tier[[1, 4]] = 1          # on the empty pool: skipped, as in the reference
    tier[2] = 5               # no such tier
    experts = ExpertPools((full, empty), jnp.asarray(tier), jnp.arange(e, dtype=jnp.int32))
    x = jnp.asarray(rng.standard_normal((5, h)), jnp.float32)
    ids, w, _ = route(x, jnp.asarray(rng.standard_normal((h, e)), jnp.float32), 3, False)
    got = moe_experts_pallas(x, ids, w, experts, tiles=(SMALL, DECODE))
    _assert_close(got, moe_experts_reference(x, ids, w, experts), jnp.float32, seed, "moe empty pool")


def test_sort_pairs_groups_by_tier_then_slot():
    seed = _seed()
    rng = np.random.default_rng(seed)
    experts = _random_pools(rng, ("bf16", "int4:g32"), 10, 64, 32)
    ids = jnp.asarray(rng.integers(0, 10, (7, 3)), jnp.int32)
    order, offsets = sort_pairs(ids, experts)
    e = np.asarray(ids).reshape(-1)[np.asarray(order)]
    tier, slot = np.asarray(experts.tier)[e], np.asarray(experts.slot)[e]
    for t, offs in enumerate(offsets):
        offs = np.asarray(offs)
        for s in range(len(offs) - 1):
            assert np.all((tier[offs[s]:offs[s + 1]] == t) & (slot[offs[s]:offs[s + 1]] == s)), f"seed={seed}"
    last = [np.asarray(o) for o in offsets if o is not None][-1]
    assert last[-1] == ids.size, f"seed={seed}"


def test_format_and_shape_errors_are_clear():
    rng = np.random.default_rng(0)
    x = jnp.zeros((4, 64), jnp.bfloat16)
    offs = jnp.array([0, 4], jnp.int32)
    w = _weights(rng, parse_format("int2:g32"), 1, 64, 32)            # 8 byte rows per block
    with pytest.raises(QuantFormatError, match="int2:g32"):
        gate_up(x, w, w, offs, interpret=True)
    w = _weights(rng, parse_format("bf16"), 1, 64, 24)                # N=24: no pow2 divisor >= 16
    with pytest.raises(ValueError, match="N=24"):
        down(x, w, offs, jnp.ones((4,)), interpret=True)
    with pytest.raises(ValueError, match="group_offsets"):
        gate_up(x, w, w, jnp.array([0, 2, 4], jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(block_m=24, block_n=64, block_k=64)
    assert compat.default_interpret() is (jax.default_backend() != "gpu")

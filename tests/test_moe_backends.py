"""The MoE op's conformance suite: every backend on the same cases against the dense reference.

Backends: "xla" (XLA plus the CPU kernel for every tier), "xla-only", the CPU kernel
for every tier (moe_experts_cpu_kernel) and "pallas" (interpret mode on a CPU). Cases: every
format in one pool and in two, an empty pool, spare slots, invalid tiers and slots (they
contribute nothing / are clipped, base.py's contract), uniform, skewed and single-expert routing,
decode (T = 1..8) and prefill shapes that reach every XLA strategy and both Pallas tile configs,
and gpt-oss's experts (biases beside the weights, the clamped SwiGLU with clamps that bite) on each.
Inputs are random on every run (DYNAEXQ_TEST_SEED reproduces one); the seed is in every message.
Backend-specific tests (kernel build and dispatch, tiling, lowering) live beside each backend's
other tests; the Pallas adapter's own (pair sorting, the interpreter warning) are at the end.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax.errors import QuantFormatError
from dynaexq_jax.model.moe import (
    ExpertPools,
    cpu_kernel,
    moe_experts,
    moe_experts_cpu_kernel,
    moe_experts_pallas,
    moe_experts_reference,
    quantize_experts,
    route,
    xla_strategy,
)
from dynaexq_jax.model.moe.pallas import INTERPRET_WARNING, sort_pairs
from dynaexq_jax.model.moe.reference import tier_hidden
from pallas_kernels import compat
from pallas_kernels.grouped_matmul import DECODE, PREFILL, SWIGLU, clamped_swiglu, default_config

SEED = int(os.environ.get("DYNAEXQ_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
H, I = 64, 64          # int2:g64 needs 64 input rows; the Pallas tiles need powers of two >= 16


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tiers: tuple[tuple[str, int], ...]    # (format, experts resident in that tier) per tier
    T: int
    k: int = 2
    x_dtype: str = "float32"
    routing: str = "uniform"              # "uniform" | "skewed" | "one-expert"
    spare: int = 0                        # unassigned slots at the end of the last pool
    invalid: bool = False                 # experts on tiers 5 and -1, a slot past its pool
    gpt_oss: bool = False                 # expert biases and the clamped SwiGLU (a limit that bites)
    dim: int = H                          # hidden and intermediate size (int3 on Triton needs groups of 128)
    triton: bool = True                   # False: sub-tiles of under 16 rows, which the Triton kernels refuse

    @property
    def activation(self):
        return clamped_swiglu(1.702, 0.5) if self.gpt_oss else SWIGLU

    @property
    def num_experts(self) -> int:
        return sum(n for _, n in self.tiers)

    def __str__(self) -> str:
        return self.name


CASES = [
    # every format alone, all experts resident, decode T = 1..8
    Case("f32", (("f32", 8),), T=1),
    Case("bf16", (("bf16", 8),), T=8),
    Case("fp16", (("fp16", 8),), T=2),
    Case("int8", (("int8:g32", 8),), T=5),
    Case("int4", (("int4:g32", 8),), T=1),
    Case("int2", (("int2:g64", 8),), T=3),
    Case("int8-channel", (("int8:channel", 8),), T=4),
    # two tiers (HI + LO), decode
    Case("bf16+int4", (("bf16", 5), ("int4:g32", 11)), T=2),
    Case("int8+int2 spare slot", (("int8:g32", 6), ("int2:g64", 10)), T=6, spare=1),
    # The mse quantizer: the whole code grid and negative scales, in the same layout.
    Case("mse int8+int4+int2", (("int8:g32:mse", 4), ("int4:g32:mse", 5), ("int2:g64:mse", 7)), T=5),
    # HQQ: zeros beside the scales (asymmetric), read by every backend; decode and grouped prefill.
    Case("hqq int8+int4+int2", (("int8:g32:hqq", 4), ("int4:g32:hqq", 5), ("int2:g64:hqq", 7)), T=5),
    Case("hqq prefill bf16+int2", (("bf16", 3), ("int2:g64:hqq", 5)), T=64),
    # Per-projection tiers: down in a format of its own (int, float, per channel), decode and prefill.
    Case("down own format decode", (("bf16+down=int8:g32", 4), ("int2:g64:hqq+down=int4:g32", 6)), T=5),
    Case("down own format prefill", (("int4:g32+down=f32", 3), ("int2:g64+down=int8:channel", 5)), T=64),
    # int3: three bit planes per block; Triton-readable at group 128, and on the CPU kernel's integer
    # path (sub-tiles of 4 and 8 rows) and its dequantizing fallback (int3:g16, int2:g8: 2 rows).
    Case("int3 decode", (("int3:g128", 4), ("int3:g128:hqq", 6)), T=5, dim=128),
    Case("int3 prefill, down int3", (("bf16", 3), ("int2:g64:hqq+down=int3:g128:mse", 5)), T=64, dim=128),
    Case("int3 small groups", (("int3:g32", 4), ("int3:g64:hqq", 3), ("int3:g16+down=int2:g8", 5)), T=6,
         triton=False),
    Case("f32+int4-channel k=4", (("f32", 3), ("int4:channel", 13)), T=7, k=4),
    Case("bf16+int4 bf16-x", (("bf16", 4), ("int4:g32", 4)), T=4, x_dtype="bfloat16"),
    # degenerate pools and assignments
    Case("empty LO pool", (("int8:g32", 6), ("bf16", 0)), T=5, invalid=True),
    Case("invalid tiers and slots", (("bf16", 3), ("int4:g32", 5)), T=8, invalid=True),
    # routing shapes
    Case("skewed", (("bf16", 4), ("int2:g64", 12)), T=40, routing="skewed"),
    Case("all on one expert", (("int4:g32", 2), ("int8:g32", 6)), T=12, k=1, routing="one-expert"),
    # prefill: the XLA grouped path and the Pallas prefill tiles, the dense product
    Case("prefill grouped", (("int4:g32", 8),), T=128),
    Case("prefill two tiers", (("bf16", 3), ("int4:g32", 5)), T=64),
    Case("prefill bf16-x", (("fp16", 2), ("int8:g32", 6)), T=128, x_dtype="bfloat16"),
    # gpt-oss experts: decode (routed), prefill (grouped), batched decode (dense), invalid assignments
    Case("gpt-oss bf16+int4", (("bf16", 5), ("int4:g32", 11)), T=2, gpt_oss=True),
    Case("gpt-oss prefill", (("f32", 3), ("int4:g32", 5)), T=64, gpt_oss=True),
    Case("gpt-oss dense", (("int8:g32", 6), ("int2:g64", 10)), T=24, k=4, gpt_oss=True),
    Case("gpt-oss invalid bf16-x", (("bf16", 3), ("int4:g32", 5)), T=8, invalid=True, x_dtype="bfloat16",
         gpt_oss=True),
]


def _experts(rng, case: Case) -> ExpertPools:
    """Random float experts split between the tiers as the case says, a random slot order in each
    pool; invalid cases move experts onto tiers 5 and -1, onto an empty pool, and past their pool."""
    E, H, I = case.num_experts, case.dim, case.dim
    raw = [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in [(E, H, I), (E, H, I), (E, I, H)]]
    bias = [(rng.standard_normal(s) * 0.3).astype(np.float32) for s in [(E, I), (E, I), (E, H)]]
    perm = rng.permutation(E)
    tier, slot = np.zeros(E, np.int32), np.zeros(E, np.int32)
    pools, start = [], 0
    for t, (spec, n) in enumerate(case.tiers):
        members = perm[start:start + n]
        start += n
        tier[members], slot[members] = t, np.arange(n)
        pick = np.concatenate([members, rng.integers(0, E, case.spare if t == len(case.tiers) - 1 else 0)])
        pick = pick.astype(int)
        pools.append(quantize_experts(*[w[pick] for w in raw], spec,
                                      biases=[b[pick] for b in bias] if case.gpt_oss else None))
    if case.invalid:
        tier[perm[0]], tier[perm[1]] = 5, -1
        slot[perm[2]] = 99                                        # clipped into its pool
        empty = [t for t, p in enumerate(pools) if p.size == 0]
        if empty:
            tier[perm[3:5]] = empty[0]
    return jax.device_put(ExpertPools(tuple(pools), jnp.asarray(tier), jnp.asarray(slot)))


def _routing(rng, case: Case):
    """ids int32 [T, k] (distinct per token), weights [T, k] positive, summing to 1 per token."""
    E, T, k = case.num_experts, case.T, case.k
    if case.routing == "one-expert":
        ids = np.full((T, k), rng.integers(E))
    else:
        p = np.ones(E)
        if case.routing == "skewed":                             # two hot experts, a quarter never chosen
            p[rng.choice(E, 2, replace=False)] = 50.0
            p[rng.choice(np.flatnonzero(p == 1), E // 4, replace=False)] = 0.0
        ids = np.stack([rng.choice(E, k, replace=False, p=p / p.sum()) for _ in range(T)])
    w = rng.random((T, k)) + 0.05
    return jnp.asarray(ids, jnp.int32), jnp.asarray(w / w.sum(1, keepdims=True), case.x_dtype)


def _xla(backend):
    def run(x, ids, w, experts, act, monkeypatch):
        monkeypatch.setenv("DYNAEXQ_CPU_KERNEL", "1")            # "xla-only" must not call it anyway
        return jax.jit(lambda *a: moe_experts(*a, backend=backend, activation=act))(x, ids, w, experts)
    return run


def _cpu_kernel(x, ids, w, experts, act, monkeypatch):
    assert cpu_kernel.available(), "the CPU kernel did not build (a C++ compiler is part of the test setup)"
    return jax.jit(lambda *a: moe_experts_cpu_kernel(*a, activation=act))(x, ids, w, experts)


def _pallas(x, ids, w, experts, act, monkeypatch):
    # Interpret mode on a CPU, the compiled kernels on a GPU; said explicitly, so no warning.
    return moe_experts_pallas(x, ids, w, experts, interpret=compat.default_interpret(), activation=act)


BACKENDS = {"xla": _xla("xla"), "xla-only": _xla("xla-only"), "pallas": _pallas}
if jax.default_backend() == "cpu":     # the CPU kernel is registered for the CPU platform only
    BACKENDS["cpu-kernel"] = _cpu_kernel
# Backends that run the CPU kernel here: integer tiers use its integer path, whose arithmetic
# (activations quantized per group) the reference models with int_dot=True.
KERNEL_BACKENDS = {"xla", "cpu-kernel"} if jax.default_backend() == "cpu" else set()


# The CPU kernel's integer path against the reference that models it: their sums run in other
# orders, a few 1e-7 apart; unmodelled, the activations' quantization moves outputs by 1e-2.
INT_DOT_TOL = 1e-3
# An activation h of the down projection this close (in code units) to a rounding boundary may take
# the neighbouring code in the kernel: the kernel's h differs from the reference's by ~1e-7 of it.
TIE = 1e-3


def _tie_allowance(x, ids, w, experts, activation) -> np.ndarray:
    """Per token, how far the kernel may move from the modelled reference through rounding ties: one
    code step times the largest down-projection weight it multiplies, for each h near a boundary
    (x is quantized from the same values on both sides, so it never ties)."""
    allowance = np.zeros(x.shape[0])
    for pool, _, h in tier_hidden(x, ids, w, experts, activation, int_dot=True):
        if not cpu_kernel.int_dot(pool.down.fmt, pool.down.k):
            continue
        T, S = h.shape[:2]
        blocks = np.asarray(h).reshape(T, S, -1, cpu_kernel.act_block(pool.down.fmt, pool.down.k))
        step = np.abs(blocks).max(-1, keepdims=True) / 127
        codes = blocks / np.where(step > 0, step, 1)
        near = np.abs(codes - np.floor(codes) - 0.5) < TIE
        w_max = np.abs(np.asarray(pool.down.dequantize(jnp.float32))).max(-1).reshape(1, S, *blocks.shape[2:])
        allowance += (near * step * w_max).sum((1, 2, 3))
    return allowance


def _assert_close(got, want, x_dtype, what, int_dot: bool = False, allowance=0.0):
    """allowance: [T] extra error allowed per token (_tie_allowance) on top of the tolerance."""
    got, want = np.asarray(jnp.asarray(got, jnp.float32)), np.asarray(jnp.asarray(want, jnp.float32))
    assert np.isfinite(got).all(), f"{what}: NaN/inf (seed={SEED})"
    scale = max(float(np.abs(want).max()), 1e-3)
    # f32: accumulation order only. bf16 activations: backends round the dequantized weights
    # and/or h = SiLU(g) * u to bf16 between the matmuls (the reference stays in f32).
    tol = (2e-4 if x_dtype == "float32" else 3 * float(jnp.finfo(jnp.bfloat16).eps)) * scale
    if int_dot:
        tol = max(tol, INT_DOT_TOL * scale)
    err = np.abs(got - want).max(1)
    allowance = np.broadcast_to(allowance, err.shape)
    t = int((err - allowance).argmax())
    assert err[t] <= tol + allowance[t], (f"{what}: max |err| {err[t]:.3g} > {tol:.3g} + ties {allowance[t]:.3g} "
                                          f"on token {t} (scale {scale:.3g}, seed={SEED})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backend_equals_the_dense_reference(backend, case, monkeypatch):
    rng = np.random.default_rng([SEED, CASES.index(case)])
    experts = _experts(rng, case)
    x = jnp.asarray(rng.standard_normal((case.T, case.dim)), case.x_dtype)
    ids, w = _routing(rng, case)
    if backend == "pallas" and not case.triton:
        with pytest.raises(QuantFormatError, match="needs a power-of-two divisor >= 16"):
            BACKENDS[backend](x, ids, w, experts, case.activation, monkeypatch)
        return
    got = BACKENDS[backend](x, ids, w, experts, case.activation, monkeypatch)
    assert got.shape == x.shape and got.dtype == x.dtype
    what = f"{backend} on '{case}' (tier={np.asarray(experts.tier).tolist()}, ids={np.asarray(ids).tolist()})"
    kernel = backend in KERNEL_BACKENDS and _has_int_dot(experts)
    want = moe_experts_reference(x, ids, w, experts, case.activation, int_dot=kernel)
    ties = _tie_allowance(x, ids, w, experts, case.activation) if kernel else 0.0
    _assert_close(got, want, case.x_dtype, what, int_dot=kernel, allowance=ties)


def _has_int_dot(experts: ExpertPools) -> bool:
    return any(cpu_kernel.int_dot(p.gate.fmt, p.gate.k) or cpu_kernel.int_dot(p.down.fmt, p.down.k)
               for p in experts.pools)


@pytest.fixture
def isa_choice():
    """Sets the CPU kernel's instruction set for one test, the best one again afterwards."""
    yield cpu_kernel.set_isa
    cpu_kernel.set_isa("")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU kernel runs on the CPU platform only")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_instruction_set_of_the_cpu_kernel_equals_the_reference(case, isa_choice, monkeypatch):
    """Each ISA this CPU runs (AVX-512, AVX2, portable code: the kernel picks the best at run
    time) gives the reference's result, the integer path's activation quantization modelled."""
    rng = np.random.default_rng([SEED, CASES.index(case)])
    experts = _experts(rng, case)
    x = jnp.asarray(rng.standard_normal((case.T, case.dim)), case.x_dtype)
    ids, w = _routing(rng, case)
    want = moe_experts_reference(x, ids, w, experts, case.activation, int_dot=True)
    ties = _tie_allowance(x, ids, w, experts, case.activation)
    for isa in cpu_kernel.isas():
        isa_choice(isa)
        _assert_close(_cpu_kernel(x, ids, w, experts, case.activation, monkeypatch), want, case.x_dtype,
                      f"the CPU kernel's {isa} code on '{case}'", int_dot=_has_int_dot(experts), allowance=ties)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_integer_path_stays_within_its_stated_error(case):
    """The kernel's integer arithmetic (activations quantized to int8 per group) departs from the
    exact dequantized product by at most cpu_kernel.INT_DOT_RTOL of the output's scale."""
    rng = np.random.default_rng([SEED, CASES.index(case)])
    experts = _experts(rng, case)
    x = jnp.asarray(rng.standard_normal((case.T, case.dim)), case.x_dtype)
    ids, w = _routing(rng, case)
    exact = np.asarray(moe_experts_reference(x, ids, w, experts, case.activation), np.float32)
    quantized = np.asarray(moe_experts_reference(x, ids, w, experts, case.activation, int_dot=True), np.float32)
    scale = max(float(np.abs(exact).max()), 1e-3)
    err = float(np.abs(quantized - exact).max())
    assert err <= cpu_kernel.INT_DOT_RTOL * scale, f"'{case}': {err:.3g} of scale {scale:.3g} (seed={SEED})"


def test_cases_reach_every_xla_strategy_and_both_pallas_tile_configs():
    """The suite is only as good as the paths its shapes reach: this fails when a change of the
    thresholds leaves one untested."""
    strategies, configs = set(), set()
    for case in CASES:
        pools = [n + (case.spare if t == len(case.tiers) - 1 else 0) for t, (_, n) in enumerate(case.tiers)]
        strategies |= {xla_strategy(case.T, case.k, s, case.num_experts) for s in pools if s}
        configs.add(default_config(case.T * case.k, case.num_experts))
    assert strategies == {"routed", "grouped", "dense"} and configs == {DECODE, PREFILL}


def test_reference_equals_a_loop_over_pairs():
    """The reference itself, against the op's definition written as plainly as possible: each
    pair adds weight * SwiGLU of its expert, dequantized from its tier and (clipped) slot."""
    case = CASES[[c.name for c in CASES].index("invalid tiers and slots")]
    rng = np.random.default_rng(SEED)
    experts = _experts(rng, case)
    x = jnp.asarray(rng.standard_normal((case.T, H)), jnp.float32)
    ids, w = _routing(rng, case)
    tier, slot = np.asarray(experts.tier), np.asarray(experts.slot)
    want = np.zeros((case.T, H), np.float32)
    for t in range(case.T):
        for j in range(case.k):
            e = int(ids[t, j])
            if not 0 <= tier[e] < len(experts.pools) or experts.pools[tier[e]].size == 0:
                continue
            pool = experts.pools[tier[e]]
            s = min(slot[e], pool.size - 1)
            g, u, d = (np.asarray(q.dequantize())[s] for q in (pool.gate, pool.up, pool.down))
            a = np.asarray(x[t]) @ g
            want[t] += float(w[t, j]) * ((a / (1 + np.exp(-a)) * (np.asarray(x[t]) @ u)) @ d)
    got = np.asarray(moe_experts_reference(x, ids, w, experts))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max(), err_msg=f"seed {SEED}")


def test_gpt_oss_reference_equals_a_loop_over_pairs():
    """gpt-oss's experts written as plainly as possible: weight * ((clamped SwiGLU(x@Wg + bg, x@Wu + bu))
    @ Wd + bd) per pair; the clamps bite on these inputs (else the test would not test them)."""
    case = CASES[[c.name for c in CASES].index("gpt-oss bf16+int4")]
    rng = np.random.default_rng(SEED)
    experts = _experts(rng, case)
    x = jnp.asarray(rng.standard_normal((case.T, H)), jnp.float32)
    ids, w = _routing(rng, case)
    act = case.activation
    tier, slot = np.asarray(experts.tier), np.asarray(experts.slot)
    want, clamped = np.zeros((case.T, H), np.float32), [0, 0]
    for t in range(case.T):
        for j in range(case.k):
            e = int(ids[t, j])
            pool = experts.pools[tier[e]]
            s = slot[e]
            g, u, d = (np.asarray(q.dequantize())[s] for q in (pool.gate, pool.up, pool.down))
            a = np.asarray(x[t]) @ g + np.asarray(pool.gate_bias)[s]
            b = np.asarray(x[t]) @ u + np.asarray(pool.up_bias)[s]
            clamped[0] += int((a > act.limit).sum())
            clamped[1] += int((np.abs(b) > act.limit).sum())
            a, b = np.minimum(a, act.limit), np.clip(b, -act.limit, act.limit)
            h = a / (1 + np.exp(-act.alpha * a)) * (b + 1)
            want[t] += float(w[t, j]) * (h @ d + np.asarray(pool.down_bias)[s])
    assert min(clamped) > 0, f"the clamps never bite (seed {SEED})"
    got = np.asarray(moe_experts_reference(x, ids, w, experts, act))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max(), err_msg=f"seed {SEED}")


def test_route_is_softmax_then_top_k():
    rng = np.random.default_rng(SEED)
    x, router = jnp.asarray(rng.standard_normal((5, H)), jnp.float32), jnp.asarray(rng.standard_normal((H, 8)))
    for norm in (False, True):
        ids, w, probs = route(x, router, 3, norm)
        p = np.asarray(jax.nn.softmax(x @ router, axis=-1))
        top = np.argsort(-p, axis=1)[:, :3]
        assert np.array_equal(np.asarray(ids), top)
        want = np.take_along_axis(p, top, 1)
        np.testing.assert_allclose(np.asarray(probs), want, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(w), want / want.sum(1, keepdims=True) if norm else want, rtol=1e-5)


# The Pallas adapter (dynaexq_jax/model/moe/pallas.py).

def test_sort_pairs_groups_by_tier_then_slot():
    rng = np.random.default_rng(SEED)
    experts = _experts(rng, Case("sort", (("bf16", 4), ("int4:g32", 6)), T=7, k=3))
    ids = jnp.asarray(rng.integers(0, 10, (7, 3)), jnp.int32)
    order, offsets = sort_pairs(ids, experts)
    e = np.asarray(ids).reshape(-1)[np.asarray(order)]
    tier, slot = np.asarray(experts.tier)[e], np.asarray(experts.slot)[e]
    for t, offs in enumerate(offsets):
        offs = np.asarray(offs)
        for s in range(len(offs) - 1):
            assert np.all((tier[offs[s]:offs[s + 1]] == t) & (slot[offs[s]:offs[s + 1]] == s)), f"seed={SEED}"
    assert np.asarray(offsets[-1])[-1] == ids.size, f"seed={SEED}"


def test_a_format_the_kernels_cannot_read_is_a_quant_format_error():
    """int2 in groups of 32 leaves 8 byte rows per block; the Triton kernel needs 16."""
    rng = np.random.default_rng(SEED)
    experts = _experts(rng, Case("int2:g32", (("int2:g32", 4),), T=2))
    x = jnp.zeros((2, H), jnp.float32)
    ids, w = _routing(rng, Case("int2:g32", (("int2:g32", 4),), T=2))
    with pytest.raises(QuantFormatError, match="int2:g32"):
        moe_experts_pallas(x, ids, w, experts, interpret=True)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU the kernels compile; nothing to warn about")
def test_pallas_backend_on_a_cpu_warns_once_that_it_interprets():
    """`--backend pallas` without a GPU used to run the interpreter (~10 tokens/s) silently."""
    code = ("import warnings, jax.numpy as jnp, numpy as np\n"
            "from dynaexq_jax.model.moe import moe_experts, quantize_experts, single_tier\n"
            "r = np.random.default_rng(0)\n"
            "e = single_tier(quantize_experts(*(r.standard_normal(s).astype(np.float32) for s in\n"
            "    [(4, 32, 32), (4, 32, 32), (4, 32, 32)]), 'bf16'))\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    for t in (1, 2, 1):                   # two shapes: two traces, still one warning\n"
            "        moe_experts(jnp.ones((t, 32)), jnp.zeros((t, 2), jnp.int32), jnp.ones((t, 2)), e, 'pallas')\n"
            "        moe_experts(jnp.ones((t, 32)), jnp.zeros((t, 2), jnp.int32), jnp.ones((t, 2)), e, 'xla')\n"
            "for w in caught:\n"
            "    print('WARNING', w.category.__name__, w.message)\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    warned = [line for line in out.stdout.splitlines() if line.startswith("WARNING")]
    assert warned == [f"WARNING UserWarning {INTERPRET_WARNING}"], out.stdout

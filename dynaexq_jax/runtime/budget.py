"""Device-memory budget -> number of HI slots per MoE layer (method.md section 2).

    M_resident = sum_l [ n_hi[l] * m_hi + (E - n_hi[l]) * m_lo ]
    M_trans    = K * max expert size                  (K transfers in flight)
    M_resident + M_trans <= budget - M_fixed

M_fixed is computed, not guessed: dense parameter bytes (measured), the KV cache for the
configured batch and max length, an activation/workspace estimate for the chosen backend, and a
safety margin. Slot counts are fixed at start-up; at run time only WHICH experts hold them changes.

The margin is the only cost that grows with the budget, so the smallest budget that holds a plan
is found in closed form (smallest_budget); the offloading baselines' planner (offload.plan_cache)
shares the fixed costs and that inversion.
"""
from __future__ import annotations

import dataclasses
import fractions
import math
import re
from typing import TYPE_CHECKING

import numpy as np

from dynaexq_jax.errors import BudgetError, InfeasibleBudgetError, RuntimeConfigError, check_int
from dynaexq_jax.model.config import ModelConfig
from dynaexq_jax.model.moe import XLA_BACKENDS, block_rows
from dynaexq_jax.model.quant import Format, expert_nbytes
from dynaexq_jax.runtime.pools import tree_nbytes

if TYPE_CHECKING:
    from dynaexq_jax.runtime.config import EngineConfig
    from dynaexq_jax.serving.checkpoint import Checkpoint

STRATEGIES = ("uniform", "proportional", "greedy")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """'20GiB', '512MiB', '1.5GB', '1000000' -> bytes (the decimal read exactly, then rounded down)."""
    if isinstance(text, (int, np.integer)):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise BudgetError(f"cannot parse the budget '{text}' (examples: 20GiB, 512MiB, 1.5GB, 1000000)")
        value = math.floor(fractions.Fraction(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise BudgetError(f"the budget must be positive, got {text!r}")
    return value


def format_bytes(n: float, *, round_up: bool = False) -> str:
    """Bytes in the largest binary unit that fits, with two decimals. round_up: rounded up to
    those decimals instead of to the nearest, so that parse_bytes of the text is never below n
    (for a lower bound such as the smallest feasible budget, which a user pastes back)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            if round_up:
                hundredths = -(-math.ceil(n) * 100 // size)
                return f"{hundredths // 100}.{hundredths % 100:02d} {unit}"
            return f"{n / size:.2f} {unit}"
    return f"{math.ceil(n) if round_up else int(n)} B"


@dataclasses.dataclass(frozen=True)
class FixedCosts:
    dense_params: int
    kv_cache: int
    workspace: int
    margin: int

    @property
    def total(self) -> int:
        return self.dense_params + self.kv_cache + self.workspace + self.margin

    @property
    def reserved(self) -> int:
        """Bytes of the budget kept free of anything the runtime owns: workspace and margin."""
        return self.workspace + self.margin

    def rows(self) -> list[tuple[str, int]]:
        return [("dense parameters", self.dense_params), ("KV cache / recurrent state", self.kv_cache),
                ("activations / workspace", self.workspace), ("safety margin", self.margin)]


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype) -> int:
    """Bytes of the family's decode cache (KV, and conv + recurrent state for hybrid models),
    read off its abstract shapes so that every family is counted exactly."""
    import jax

    from dynaexq_jax.model.families import family
    shapes = jax.eval_shape(lambda: family(cfg.model_type).init_cache(cfg, batch, max_len, dtype))
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))


# The safety margin kept free of any plan, as a share of the budget.
MARGIN_FRACTION = 0.02


def margin_bytes(budget: int, margin_fraction: float = MARGIN_FRACTION) -> int:
    return int(margin_fraction * budget)


def workspace_bytes(cfg: ModelConfig, batch: int, max_len: int, prefill_len: int, backend: str,
                    hi: Format, lo: Format) -> int:
    """Peak transient device memory of one forward, estimated from the shapes. The XLA backend
    gathers and dequantizes (f32) the weights of every block of its grouped path (at most one
    block per b routed pairs plus one per expert); the Pallas kernels dequantize in registers, so
    only activations count."""
    tokens = batch * max(prefill_len, 1)
    H, I, E, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    act = 4 * tokens * (4 * H + 3 * k * I + 2 * cfg.num_heads * max_len + cfg.vocab_size)
    if backend in XLA_BACKENDS and E:
        b = block_rows(tokens * k, E)
        rows = (-(-tokens * k // b) + E) * b
        act += 4 * (rows // b) * 3 * H * I + 4 * rows * (2 * I + 2 * H)
    return act


def fixed_costs(cfg: ModelConfig, *, budget: int, dense_params: int, batch: int, max_len: int,
                prefill_len: int | None, cache_dtype, backend: str, hi: Format, lo: Format,
                margin_fraction: float = MARGIN_FRACTION) -> FixedCosts:
    """M_fixed of method.md: measured dense params, the cache, the workspace estimate, the margin."""
    return FixedCosts(dense_params, cache_bytes(cfg, batch, max_len, cache_dtype),
                      workspace_bytes(cfg, batch, max_len, prefill_len or max_len, backend, hi, lo),
                      margin_bytes(budget, margin_fraction))


def smallest_budget(plan, margin_fraction: float = MARGIN_FRACTION) -> int:
    """The smallest budget b that holds everything `plan` (a BudgetPlan or offload CachePlan)
    holds besides its margin: b - margin(b) >= plan.total - plan.fixed.margin. b - margin(b)
    never decreases as b grows, so the closed form b = need / (1 - margin fraction) is off only
    by the margin's rounding down, corrected here."""
    need = plan.total - plan.fixed.margin

    def fits(b):
        return b - margin_bytes(b, margin_fraction) >= need
    b = math.ceil(need / (1 - margin_fraction))
    while not fits(b):
        b += 1
    while fits(b - 1):
        b -= 1
    return b


def smallest_budget_text(budget: int) -> str:
    """How an error names the smallest feasible budget: rounded up, so that pasting it back works."""
    return f"{format_bytes(budget, round_up=True)} ({budget:,d} B)"


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    budget: int
    fixed: FixedCosts
    m_hi: int                       # bytes of one expert in the HI tier
    m_lo: int
    transfers_in_flight: int        # K
    strategy: str
    n_hi: tuple[int, ...]           # HI slots per MoE layer (cfg.moe_layers order)
    num_experts: int

    @property
    def staging(self) -> int:
        return self.transfers_in_flight * max(self.m_hi, self.m_lo)

    def layer_bytes(self, i: int) -> int:
        return self.n_hi[i] * self.m_hi + (self.num_experts - self.n_hi[i]) * self.m_lo

    @property
    def resident(self) -> int:
        return sum(self.layer_bytes(i) for i in range(len(self.n_hi)))

    @property
    def total(self) -> int:
        return self.fixed.total + self.resident + self.staging

    @property
    def hi_fraction(self) -> float:
        return sum(self.n_hi) / max(1, self.num_experts * len(self.n_hi))

    def rows(self) -> list[tuple[str, int]]:
        n_lo = self.num_experts * len(self.n_hi) - sum(self.n_hi)
        return self.fixed.rows() + [
            (f"HI experts ({sum(self.n_hi)} x {format_bytes(self.m_hi)})", sum(self.n_hi) * self.m_hi),
            (f"LO experts ({n_lo} x {format_bytes(self.m_lo)})", n_lo * self.m_lo),
            (f"transfer staging (K={self.transfers_in_flight})", self.staging),
            ("total", self.total), ("budget", self.budget), ("unused", self.budget - self.total)]

    def table(self) -> str:
        lines = [f"{name:<40} {format_bytes(b):>12} {b:>16,d}" for name, b in self.rows()]
        lines.append(f"{'HI slots per MoE layer':<40} {', '.join(map(str, self.n_hi))}  "
                     f"({100 * self.hi_fraction:.1f}% of experts, strategy {self.strategy})")
        return "\n".join(lines)


def check_plan_options(strategy: str, transfers_in_flight: int, max_hi_fraction: float) -> None:
    if strategy not in STRATEGIES:
        raise RuntimeConfigError(f"unknown capacity strategy '{strategy}' (use one of {', '.join(STRATEGIES)})")
    check_int("transfers_in_flight", transfers_in_flight, RuntimeConfigError, minimum=2,
              unit=" (a swap moves two copies)")
    if not 0.0 <= max_hi_fraction <= 1.0:
        raise RuntimeConfigError(f"max_hi_fraction must be in [0, 1], got {max_hi_fraction}")


def plan_budget(cfg: ModelConfig, *, budget: int | str, hi: Format, lo: Format, dense_params: int,
                batch: int, max_len: int, prefill_len: int | None = None, cache_dtype=np.float32,
                backend: str = "xla", transfers_in_flight: int = 4, margin_fraction: float = MARGIN_FRACTION,
                strategy: str = "proportional", max_hi_fraction: float = 1.0,
                layer_priority: np.ndarray | None = None) -> BudgetPlan:
    """Fix the number of HI slots per MoE layer for a budget.

    uniform: the same n for every layer; proportional: n_hi[l] = floor(r * E_l) with the largest
    ratio r that fits (binary search); greedy: add HI slots one at a time to the layer whose next
    expert has the highest priority (layer_priority [L_moe, E], e.g. a calibration ranking's
    scores, sorted per layer; equal priorities give round-robin). max_hi_fraction caps r."""
    budget = parse_bytes(budget)
    check_plan_options(strategy, transfers_in_flight, max_hi_fraction)
    E, L = cfg.num_experts, len(cfg.moe_layers)
    fixed = fixed_costs(cfg, budget=budget, dense_params=dense_params, batch=batch, max_len=max_len,
                        prefill_len=prefill_len, cache_dtype=cache_dtype, backend=backend, hi=hi, lo=lo,
                        margin_fraction=margin_fraction)
    m_hi, m_lo = (expert_nbytes(f, cfg.hidden_size, cfg.moe_intermediate_size) for f in (hi, lo))
    if m_hi < m_lo:
        raise RuntimeConfigError(f"the HI tier ({hi.name}) must not be smaller than the LO tier ({lo.name})")

    def make(n_hi):
        return BudgetPlan(budget, fixed, m_hi, m_lo, transfers_in_flight, strategy, tuple(int(n) for n in n_hi), E)

    floor_plan = make([0] * L)
    if floor_plan.total > budget:
        raise InfeasibleBudgetError(
            f"budget {format_bytes(budget)} ({budget:,d} B) cannot hold the model even with every expert in "
            f"the LO tier ({lo.name}): {floor_plan.total - budget:,d} B missing; the smallest feasible budget is "
            f"{smallest_budget_text(smallest_budget(floor_plan, margin_fraction))}")
    cap = int(math.floor(max_hi_fraction * E))
    if strategy == "uniform":
        n = max(k for k in range(cap + 1) if make([k] * L).total <= budget)
        return make([n] * L)
    if strategy == "proportional":
        lo_r, hi_r = 0.0, max_hi_fraction
        for _ in range(50):
            mid = (lo_r + hi_r) / 2
            if make([math.floor(mid * E + 1e-9)] * L).total <= budget:
                lo_r = mid
            else:
                hi_r = mid
        return make([math.floor(lo_r * E + 1e-9)] * L)
    prio = np.zeros((L, E)) if layer_priority is None else -np.sort(-np.asarray(layer_priority, float), axis=1)
    n = [0] * L
    spare = budget - floor_plan.total
    step = m_hi - m_lo
    while spare >= step:
        open_layers = [l for l in range(L) if n[l] < cap]
        if not open_layers:
            break
        # Highest next-expert priority first; among equals the layer with fewest slots, then lowest index.
        l = max(open_layers, key=lambda l: (prio[l, n[l]], -n[l], -l))
        n[l] += 1
        spare -= step
    return make(n)


# ---- a converted checkpoint under engine settings ----------------------------------------------------
def checkpoint_sizes(ckpt: Checkpoint) -> dict:
    """The plan_budget arguments a converted checkpoint fixes: both tiers, the dense parameter
    bytes and the cache dtype (the embedding's)."""
    return dict(hi=ckpt.tiers["hi"], lo=ckpt.tiers["lo"], dense_params=tree_nbytes(ckpt.params),
                cache_dtype=np.dtype(ckpt.params.embed.dtype))


def plan_for(ckpt: Checkpoint, budget: int | str, settings: EngineConfig, **overrides) -> BudgetPlan:
    """plan_budget for a checkpoint served with `settings`; overrides replace plan_budget arguments."""
    return plan_budget(ckpt.config, budget=budget, **(checkpoint_sizes(ckpt) | settings.plan_options() | overrides))


def budget_for_fraction(ckpt: Checkpoint, r: float, settings: EngineConfig) -> int:
    """The smallest byte budget whose plan for `settings` gives floor(r * E) HI slots per MoE
    layer. Closed form: the plan capped at r under an unlimited budget, then smallest_budget of it."""
    capped = plan_for(ckpt, 2**62, settings, max_hi_fraction=r)
    budget = smallest_budget(capped)
    if plan_for(ckpt, budget, settings).n_hi != capped.n_hi:
        raise RuntimeConfigError(f"no budget gives {list(capped.n_hi)} HI slots per layer with strategy "
                                 f"'{settings.strategy}' and max_hi_fraction {settings.max_hi_fraction}")
    return budget

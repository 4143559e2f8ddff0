"""Precision policies: which experts should hold the HI slots.

A policy sees, at each segment boundary, the decode step count, the hotness scores
S [L_moe, E] and the current HI sets, and returns swaps (promote, demote) per layer. Adding a
policy is a subclass with `plan` (and optionally `initial_hi`):

    class MyPolicy(Policy):
        name = "mine"
        def plan(self, step, scores, hi_mask, n_hi):
            return [[] for _ in n_hi]          # no swaps
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np

from dynaexq_jax.errors import RuntimeConfigError, check_int

Swap = tuple[int, int]   # (promote, demote)

# Defaults of the dynamic policies (and of the engine's settings, EngineConfig).
UPDATE_PERIOD = 200      # decode steps between updates (T_u)
DELTA = 0.01             # hysteresis margin of the dynaexq policy


def rank(scores: np.ndarray) -> np.ndarray:
    """Expert ids by descending score, ties broken by expert id (deterministic)."""
    return np.lexsort((np.arange(scores.shape[-1]), -scores))


def top_n(scores: np.ndarray, n: int) -> set[int]:
    return set(rank(scores)[:n].tolist())


class Policy:
    name = "base"
    fixed_hi_fraction: float | None = None   # all-hi = 1.0, all-lo = 0.0: the policy fixes the slot count

    def initial_hi(self, n_hi: list[int], num_experts: int, ranking: np.ndarray | None) -> list[set[int]]:
        """Initial HI set per layer: the top of a calibration ranking [L_moe, E] if given, else
        the lowest expert ids (a warm-up: dynamic policies correct it from live traffic)."""
        if ranking is not None:
            return [top_n(np.asarray(ranking[l], float), n) for l, n in enumerate(n_hi)]
        return [set(range(n)) for n in n_hi]

    def slot_priority(self, ranking: np.ndarray | None) -> np.ndarray | None:
        """[L_moe, E]: what the greedy capacity strategy gives HI slots by (budget.plan_budget's
        layer_priority): the calibration ranking itself."""
        return ranking

    def wants_update(self, step: int, last_update: int | None) -> bool:
        return False

    def plan(self, step: int, scores: np.ndarray, hi_mask: np.ndarray, n_hi: list[int]) -> list[list[Swap]]:
        return [[] for _ in n_hi]

    def on_shards(self, shards) -> Policy:
        """This policy on an expert-parallel mesh, where every [L_moe, E] array reads as
        shards(a) = [L_moe * N, E / N]: a policy holding such arrays returns a copy holding them
        so; one that holds none is itself."""
        return self


class StaticPolicy(Policy):
    """A fixed HI set (e.g. from a calibration ranking), never changed."""
    name = "static"


class AllHi(Policy):
    name = "all-hi"
    fixed_hi_fraction = 1.0


class AllLo(Policy):
    name = "all-lo"
    fixed_hi_fraction = 0.0


def check_update_options(period: int, delta: float = 0.0, rate_limit: int | None = None) -> None:
    """period: decode steps between updates; delta: hysteresis margin; rate_limit: swaps per
    layer per update or None."""
    check_int("update period", period, RuntimeConfigError, unit=" decode step")
    if not delta >= 0:
        raise RuntimeConfigError(f"hysteresis delta must be >= 0, got {delta!r}")
    if rate_limit is not None:
        check_int("rate limit", rate_limit, RuntimeConfigError, unit=" or None")


def every_period(period: int, step: int, last_update: int | None, at_start: bool) -> bool:
    """Whether a policy updating every `period` steps (and at the first boundary if at_start)
    updates at this boundary."""
    if last_update is None:
        return at_start or step >= period
    return step // period > last_update // period


def swaps_toward(targets: list[np.ndarray], hi_mask: np.ndarray) -> list[list[Swap]]:
    """Swaps that turn each layer's HI set into targets[l] (expert ids, best first): the best
    missing target is promoted in place of the incumbent least wanted (not in the target)."""
    out = []
    for l, target in enumerate(targets):
        want = [int(e) for e in target]
        promote = [e for e in want if not hi_mask[l, e]]
        demote = sorted(int(e) for e in np.flatnonzero(hi_mask[l]) if int(e) not in set(want))
        out.append(list(zip(promote, demote)))
    return out


@dataclasses.dataclass
class DynaExqPolicy(Policy):
    """Every `period` decode steps, per layer, the n_hi experts with the highest score hold the
    HI slots, ties by expert id. Hysteresis: the best outsider replaces the worst incumbent only
    if its score exceeds it by more than `delta`; pairs are taken in score order until that fails.
    `rate_limit` caps swaps per layer per update (None = no cap)."""
    period: int = UPDATE_PERIOD
    delta: float = DELTA
    rate_limit: int | None = None
    update_after_prefill: bool = True
    name = "dynaexq"

    def __post_init__(self):
        check_update_options(self.period, self.delta, self.rate_limit)

    def wants_update(self, step: int, last_update: int | None) -> bool:
        return every_period(self.period, step, last_update, self.update_after_prefill)

    def plan(self, step, scores, hi_mask, n_hi):
        out = []
        for l in range(len(n_hi)):
            s = np.asarray(scores[l], np.float64)
            order = rank(s)
            inc = [int(e) for e in order[::-1] if hi_mask[l, e]]          # worst incumbent first
            outs = [int(e) for e in order if not hi_mask[l, e]]          # best outsider first
            swaps = []
            for p, d in zip(outs, inc):
                if s[p] <= s[d] + self.delta:
                    break
                if self.rate_limit is not None and len(swaps) >= self.rate_limit:
                    break
                swaps.append((p, d))
            out.append(swaps)
        return out


@dataclasses.dataclass
class SensitivityPolicy(DynaExqPolicy):
    """dynaexq on traffic x cost: the hotness of each expert weighted by what its LO copy costs
    (cost [L_moe, E]: the converter's, CheckpointInfo.lo_costs, or experiments.sensitivity.lo_costs'
    loss-unit ones), so that of two equally hot experts
    the one whose LO copy hurts more holds the HI slot. The weights are the costs over their
    layer's mean (only the order within a layer matters to a layer's swaps; the hysteresis delta
    keeps its scale); the initial HI set ranks a calibration ranking by the same weights. Across
    layers the greedy strategy gives each HI slot to the expert whose traffic x cost is largest:
    every slot costs the same bytes, so that is the largest expected benefit per byte."""
    cost: np.ndarray | None = None
    name = "sensitivity"

    def __post_init__(self):
        super().__post_init__()
        cost = np.asarray(self.cost, np.float64)
        if cost.ndim != 2 or not np.all(np.isfinite(cost)) or (cost < 0).any():
            raise RuntimeConfigError("the sensitivity policy needs a finite, non-negative cost [L_moe, E]")
        mean = cost.mean(axis=1, keepdims=True)
        self.cost = cost
        self.weights = np.where(mean > 0, cost / np.where(mean > 0, mean, 1.0), 1.0)

    def initial_hi(self, n_hi, num_experts, ranking):
        return super().initial_hi(n_hi, num_experts, None if ranking is None else np.asarray(ranking) * self.weights)

    def slot_priority(self, ranking):
        # Without a traffic ranking, every expert equally loaded: the cost alone.
        return self.cost if ranking is None else np.asarray(ranking) * self.cost

    def plan(self, step, scores, hi_mask, n_hi):
        return super().plan(step, np.asarray(scores) * self.weights, hi_mask, n_hi)

    def on_shards(self, shards):
        out = copy.copy(self)                  # the weights keep their per-layer normalisation
        out.cost, out.weights = shards(self.cost), shards(self.weights)
        return out


@dataclasses.dataclass
class OraclePolicy(Policy):
    """An upper bound for hotness-driven selection: it knows the future. trace f32 [chunks,
    L_moe, E] is the routed mass of each chunk of `chunk` steps of the very stream being served
    (recorded by an earlier pass); every `period` steps it moves to the n_hi experts with the most
    mass in the period its swaps will serve, `lag` steps after the decision (the pipeline and
    publication delay)."""
    trace: np.ndarray
    chunk: int
    period: int = UPDATE_PERIOD
    lag: int = 0
    name = "oracle"

    def __post_init__(self):
        check_update_options(self.period)
        self.trace = np.asarray(self.trace, np.float64)

    def wants_update(self, step, last_update):
        return every_period(self.period, step, last_update, True)

    def future_mass(self, step: int) -> np.ndarray:
        first = (step + self.lag) // self.chunk
        window = self.trace[first:first + max(1, self.period // self.chunk)]
        return window.sum(0) if len(window) else np.zeros(self.trace.shape[1:])

    def initial_hi(self, n_hi, num_experts, ranking):
        return super().initial_hi(n_hi, num_experts, self.future_mass(-self.lag))

    def on_shards(self, shards):
        return dataclasses.replace(self, trace=shards(self.trace))

    def plan(self, step, scores, hi_mask, n_hi):
        mass = self.future_mass(step)
        return swaps_toward([rank(mass[l])[:n] for l, n in enumerate(n_hi)], hi_mask)


@dataclasses.dataclass
class RandomPolicy(Policy):
    """A lower bound: every `period` steps a uniformly random HI set per layer (seeded)."""
    period: int = UPDATE_PERIOD
    seed: int = 0
    name = "random"

    def __post_init__(self):
        check_update_options(self.period)
        self._rng = np.random.default_rng(self.seed)

    def wants_update(self, step, last_update):
        return every_period(self.period, step, last_update, True)

    def initial_hi(self, n_hi, num_experts, ranking):
        return [set(self._rng.choice(num_experts, n, replace=False).tolist()) for n in n_hi]

    def plan(self, step, scores, hi_mask, n_hi):
        return swaps_toward([self._rng.choice(hi_mask.shape[1], n, replace=False) for n in n_hi], hi_mask)


POLICIES = {"dynaexq": DynaExqPolicy, "static": StaticPolicy, "all-hi": AllHi, "all-lo": AllLo,
            "random": RandomPolicy, "sensitivity": SensitivityPolicy}


def policy_class(name: str) -> type[Policy]:
    if name not in POLICIES:
        raise RuntimeConfigError(f"unknown policy '{name}' (use one of {', '.join(POLICIES)})")
    return POLICIES[name]


def make_policy(name: str | Policy, **options) -> Policy:
    if isinstance(name, Policy):
        return name
    cls = policy_class(name)
    if cls in (DynaExqPolicy, RandomPolicy, SensitivityPolicy):
        return cls(**options)
    if options:
        raise RuntimeConfigError(f"policy '{name}' takes no options, got {sorted(options)}")
    return cls()

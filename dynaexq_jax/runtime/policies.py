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

import dataclasses

import numpy as np

from dynaexq_jax.errors import RuntimeConfigError

Swap = tuple[int, int]   # (promote, demote)


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

    def wants_update(self, step: int, last_update: int | None) -> bool:
        return False

    def plan(self, step: int, scores: np.ndarray, hi_mask: np.ndarray, n_hi: list[int]) -> list[list[Swap]]:
        return [[] for _ in n_hi]


class StaticPolicy(Policy):
    """A fixed HI set (e.g. from a calibration ranking), never changed."""
    name = "static"


class AllHi(Policy):
    name = "all-hi"
    fixed_hi_fraction = 1.0


class AllLo(Policy):
    name = "all-lo"
    fixed_hi_fraction = 0.0


@dataclasses.dataclass
class DynaExqPolicy(Policy):
    """Every `period` decode steps, per layer, the n_hi experts with the highest score hold the
    HI slots, ties by expert id. Hysteresis: the best outsider replaces the worst incumbent only
    if its score exceeds it by more than `delta`; pairs are taken in score order until that fails.
    `rate_limit` caps swaps per layer per update (None = no cap)."""
    period: int = 200
    delta: float = 0.01
    rate_limit: int | None = None
    update_after_prefill: bool = True
    name = "dynaexq"

    def __post_init__(self):
        if not isinstance(self.period, int) or self.period < 1:
            raise RuntimeConfigError(f"update period must be an integer >= 1 decode step, got {self.period!r}")
        if not self.delta >= 0:
            raise RuntimeConfigError(f"hysteresis delta must be >= 0, got {self.delta!r}")
        if self.rate_limit is not None and (not isinstance(self.rate_limit, int) or self.rate_limit < 1):
            raise RuntimeConfigError(f"rate limit must be an integer >= 1 or None, got {self.rate_limit!r}")

    def wants_update(self, step: int, last_update: int | None) -> bool:
        if last_update is None:
            return self.update_after_prefill or step >= self.period
        return step // self.period > last_update // self.period

    def plan(self, step, scores, hi_mask, n_hi):
        out = []
        for l, n in enumerate(n_hi):
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


POLICIES = {"dynaexq": DynaExqPolicy, "static": StaticPolicy, "all-hi": AllHi, "all-lo": AllLo}


def make_policy(name: str | Policy, **options) -> Policy:
    if isinstance(name, Policy):
        return name
    if name not in POLICIES:
        raise RuntimeConfigError(f"unknown policy '{name}' (use one of {', '.join(POLICIES)})")
    cls = POLICIES[name]
    if cls is DynaExqPolicy:
        return cls(**options)
    if options:
        raise RuntimeConfigError(f"policy '{name}' takes no options, got {sorted(options)}")
    return cls()

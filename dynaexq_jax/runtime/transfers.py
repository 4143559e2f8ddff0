"""The transfer schedule: one queue of wanted swaps for all MoE layers, ranked by benefit, with the
copies in flight bounded by the staging bytes the budget reserves. Model-free (numpy), so the
engine and the trace replay (runtime.replay) run the same code.

A swap (promote p, demote d in MoE layer pos) moves two copies, p's HI tier and d's LO tier, so it
holds m_hi + m_lo staging bytes from its start to its publication. Its benefit is the score gap
S[pos, p] - S[pos, d] when it was planned: a hotness score is an expert's share of its layer's
routed mass (serving.hotness), so the gap estimates the share of that layer's mass the swap moves
to HI, and gaps of different layers compare directly (every layer sees the same tokens, each
routing its top-k probability mass: 1 per token where the config renormalises it).

Each segment boundary, in this order:
  * `published`: swaps whose copies have arrived leave the in-flight set;
  * `replan` (when the policy updates): the queue becomes the new plan's swaps ranked by benefit
    across layers (ties round-robin over layers). The plan is made against `target_hi`, the HI sets
    as they will be once the swaps in flight are published, so a copy in flight is never wasted;
    a queued swap the new plan no longer wants leaves the queue, a still-wanted one is re-ranked;
  * `start`: swaps from the head of the queue, as many as fit in the staging bytes left; one that
    touches an expert in flight waits in the queue for that publication; one whose experts have
    moved since the plan (a policy's stale or invalid pair) is dropped.

Sizing. The plan reserves K copies of the largest expert (budget.BudgetPlan.staging), so
K * m_hi / (m_hi + m_lo) swaps fly at once, and in the engine's default deterministic mode a
boundary's copies are published at the next one: that many swaps per segment, for the whole
model. A shift of the workload makes every layer want about as many swaps as its hot set changes
by (hundreds at 48 layers), so K must be tens, not a handful; see EngineConfig.transfers_in_flight
for the default and its cost in bytes.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dynaexq_jax.errors import RuntimeConfigError

ORDERS = ("benefit", "layer")


@dataclasses.dataclass(frozen=True)
class PlannedSwap:
    pos: int           # MoE layer position (cfg.moe_layers order)
    promote: int       # the LO expert that gets a HI slot
    demote: int        # the HI expert that gives it up
    benefit: float     # scores[pos, promote] - scores[pos, demote] at the plan


class TransferSchedule:
    """staging_bytes: the bytes copies in flight may hold (None: unlimited); swap_bytes: what one
    swap holds (m_hi + m_lo). groups: swaps of position pos belong to group pos % groups, each
    group with staging_bytes of its own (the devices of an expert-parallel engine, whose positions
    are shards: DevicePools). order 'benefit' ranks the whole model's swaps by benefit; 'layer' is
    the schedule before issue 12 (layer by layer, in each layer's plan order), kept as the baseline
    that starves deep layers (benchmarks/transfers.py, tests/test_transfers.py)."""

    def __init__(self, staging_bytes: int | None, swap_bytes: int, order: str = "benefit", groups: int = 1):
        if order not in ORDERS:
            raise RuntimeConfigError(f"unknown transfer order '{order}' (use one of {', '.join(ORDERS)})")
        if staging_bytes is not None and staging_bytes < swap_bytes:
            raise RuntimeConfigError(f"transfer staging of {staging_bytes:,d} B cannot hold one swap "
                                     f"({swap_bytes:,d} B: a HI and a LO copy)")
        self.staging_bytes, self.swap_bytes, self.order, self.groups = staging_bytes, swap_bytes, order, groups
        self.queue: list[PlannedSwap] = []       # wanted, not started; best first
        self.in_flight: list[PlannedSwap] = []   # started, not published

    @property
    def in_flight_bytes(self) -> int:
        """Of the busiest group: each group (device) has staging_bytes of its own."""
        per = np.bincount([s.pos % self.groups for s in self.in_flight], minlength=self.groups)
        return int(per.max()) * self.swap_bytes

    def target_hi(self, hi_mask: np.ndarray) -> np.ndarray:
        """bool [L_moe, E]: the published HI sets hi_mask with every swap in flight applied."""
        target = np.array(hi_mask, bool)
        for s in self.in_flight:
            target[s.pos, s.promote], target[s.pos, s.demote] = True, False
        return target

    def replan(self, swaps: list[list[tuple[int, int]]], scores: np.ndarray) -> None:
        """swaps: per MoE layer (promote, demote) pairs, planned against target_hi; scores [L_moe, E]."""
        planned = [(PlannedSwap(pos, int(p), int(d), float(scores[pos, p]) - float(scores[pos, d])), i)
                   for pos, layer in enumerate(swaps) for i, (p, d) in enumerate(layer)]
        if self.order == "benefit":
            planned.sort(key=lambda x: (-x[0].benefit, x[1], x[0].pos))
        self.queue = [s for s, _ in planned]

    def start(self, hi_mask: np.ndarray) -> list[PlannedSwap]:
        """The swaps to start now, best first, given the published HI sets hi_mask bool [L_moe, E];
        they join the in-flight set."""
        busy = {(s.pos, e) for s in self.in_flight for e in (s.promote, s.demote)}
        held = np.bincount([s.pos % self.groups for s in self.in_flight], minlength=self.groups) * self.swap_bytes
        room = np.full(self.groups, np.inf) if self.staging_bytes is None else self.staging_bytes - held
        started, waiting = [], []
        for s in self.queue:
            g = s.pos % self.groups
            if (s.pos, s.promote) in busy or (s.pos, s.demote) in busy or room[g] < self.swap_bytes:
                waiting.append(s)
            elif not hi_mask[s.pos, s.promote] and hi_mask[s.pos, s.demote]:
                started.append(s)
                busy.update(((s.pos, s.promote), (s.pos, s.demote)))
                room[g] -= self.swap_bytes
        self.queue = waiting
        self.in_flight += started
        return started

    def published(self, swap: PlannedSwap) -> None:
        self.in_flight.remove(swap)

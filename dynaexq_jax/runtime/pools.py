"""Per-layer tier pools on the device, the host store of both tiers, and the assignment.

For each MoE layer: a HI pool of n_hi slots and a LO pool of E - n_hi slots, so every expert is
resident in exactly one complete representation. The host keeps a mirror of the assignment
(tier and slot of every expert) and of which expert each slot holds; the device copy of the
assignment is rebuilt only when a swap is published.

A swap in layer l promotes b (LO, LO slot s_b) and demotes a (HI, HI slot s_a): after it, HI slot
s_a holds b's HI copy and LO slot s_b holds a's LO copy. Both copies come from the host store;
nothing is re-quantized.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.model.moe import HI, LO, ExpertPools, TierPool


def _host_memory_sharding():
    """Pinned host memory where the backend offers it (GPU), else None (plain numpy on CPU)."""
    dev = jax.devices()[0]
    try:
        kinds = {m.kind for m in dev.addressable_memories()}
    except Exception:
        return None
    if dev.platform != "cpu" and "pinned_host" in kinds:
        return jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    return None


class HostStore:
    """Both tiers of every expert in host memory, one small pytree per (layer, tier, expert), so
    that a promotion or demotion is a single host-to-device copy of exactly that expert."""

    def __init__(self, experts_by_layer: dict[int, dict[str, TierPool]], moe_layers: tuple[int, ...]):
        sharding = _host_memory_sharding()
        put = (lambda a: jax.device_put(a, sharding)) if sharding is not None else np.asarray
        self.pools = [[experts_by_layer[l]["hi"], experts_by_layer[l]["lo"]] for l in moe_layers]
        self._one = {}
        for pos, tiers in enumerate(self.pools):
            for t, pool in enumerate(tiers):
                for e in range(pool.size):
                    self._one[pos, t, e] = jax.tree.map(lambda a, e=e: put(np.asarray(a[e:e + 1])), pool)

    def expert(self, pos: int, tier: int, e: int) -> TierPool:
        """A one-slot TierPool (leading dim 1) of expert e of MoE layer pos in `tier`."""
        return self._one[pos, tier, e]

    def stack(self, pos: int, tier: int, experts: list[int]) -> TierPool:
        """A TierPool of the given experts in order (numpy), for building pools at start-up."""
        pool = self.pools[pos][tier]
        idx = np.asarray(experts, np.int64)
        return jax.tree.map(lambda a: np.asarray(a)[idx], pool)


def tree_nbytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def write_slot(pool: TierPool, slot, one: TierPool) -> TierPool:
    return jax.tree.map(lambda p, x: jax.lax.dynamic_update_slice_in_dim(p, x.astype(p.dtype), slot, 0), pool, one)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def write_swap(hi_pool: TierPool, lo_pool: TierPool, hi_slot, lo_slot, hi_copy: TierPool, lo_copy: TierPool):
    """Both pools with one slot each overwritten by one-slot copies (pools donated: in place)."""
    return write_slot(hi_pool, hi_slot, hi_copy), write_slot(lo_pool, lo_slot, lo_copy)


@dataclasses.dataclass
class LayerResidency:
    """Host mirror of one MoE layer's assignment."""
    tier: np.ndarray        # int32 [E]: HI or LO
    slot: np.ndarray        # int32 [E]
    holders: list[list[int]]  # holders[t][s]: the expert in slot s of tier t's pool

    @classmethod
    def from_hi_set(cls, hi_set, num_experts: int) -> LayerResidency:
        hi = sorted(int(e) for e in hi_set)
        lo = [e for e in range(num_experts) if e not in set(hi)]
        tier = np.full(num_experts, LO, np.int32)
        slot = np.zeros(num_experts, np.int32)
        tier[hi] = HI
        slot[hi] = np.arange(len(hi))
        slot[lo] = np.arange(len(lo))
        return cls(tier, slot, [hi, lo])

    @property
    def hi_mask(self) -> np.ndarray:
        return self.tier == HI

    def swap(self, promote: int, demote: int) -> tuple[int, int]:
        """Apply a swap to the mirror; returns (HI slot receiving `promote`, LO slot receiving `demote`)."""
        assert self.tier[promote] == LO and self.tier[demote] == HI, "swap needs a LO promote and a HI demote"
        s_hi, s_lo = int(self.slot[demote]), int(self.slot[promote])
        self.tier[promote], self.slot[promote] = HI, s_hi
        self.tier[demote], self.slot[demote] = LO, s_lo
        self.holders[HI][s_hi], self.holders[LO][s_lo] = promote, demote
        return s_hi, s_lo


class DevicePools:
    """The device-resident pools of every MoE layer plus their host-side residency mirrors."""

    def __init__(self, store: HostStore, hi_sets: list, num_experts: int):
        self.store = store
        self.residency = [LayerResidency.from_hi_set(h, num_experts) for h in hi_sets]
        self.pools = []
        for pos, r in enumerate(self.residency):
            self.pools.append([jax.device_put(store.stack(pos, t, r.holders[t])) for t in (HI, LO)])
        self._assignments = [self._assignment(pos) for pos in range(len(self.residency))]

    def _assignment(self, pos: int) -> ExpertPools:
        r = self.residency[pos]
        return ExpertPools(tuple(self.pools[pos]), jnp.asarray(r.tier), jnp.asarray(r.slot))

    def expert_pools(self) -> list[ExpertPools]:
        for pos, a in enumerate(self._assignments):
            if a is None:
                self._assignments[pos] = self._assignment(pos)
        return self._assignments

    def publish(self, pos: int, promote: int, demote: int, hi_copy: TierPool, lo_copy: TierPool) -> None:
        """Write arrived copies into their slots (donated, in place) and publish the new assignment.
        Device work runs in dispatch order, so a segment dispatched before this reads the old
        slots and one dispatched after reads only complete new ones."""
        s_hi, s_lo = self.residency[pos].swap(promote, demote)
        self.pools[pos] = list(write_swap(*self.pools[pos], np.int32(s_hi), np.int32(s_lo), hi_copy, lo_copy))
        self._assignments[pos] = None      # rebuilt once, when next asked for

    def warm_up(self) -> None:
        """Compile write_swap for every pair of pool shapes now (rewriting slot 0 of each pool with
        its own content), so that the first real publish does not compile while serving."""
        for pos, r in enumerate(self.residency):
            if r.holders[HI] and r.holders[LO]:
                copies = [jax.device_put(self.store.expert(pos, t, r.holders[t][0])) for t in (HI, LO)]
                self.pools[pos] = list(write_swap(*self.pools[pos], np.int32(0), np.int32(0), *copies))
        self._assignments = [self._assignment(pos) for pos in range(len(self.residency))]

    @property
    def nbytes(self) -> int:
        return sum(tree_nbytes(p) for p in self.expert_pools())

    def hi_mask(self) -> np.ndarray:
        """bool [L_moe, E]: which experts are HI now."""
        return np.stack([r.hi_mask for r in self.residency])

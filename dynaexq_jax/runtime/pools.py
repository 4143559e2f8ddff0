"""Per-layer tier pools on the device, the host store of both tiers, and the assignment.

The host store is the converted checkpoint itself: its expert tiers are memory-mapped files, and
a copy to the device reads one expert's slice of the map (the OS page cache holds what is hot;
this process keeps no copy of its own). Start-up fills each pool a bounded chunk at a time,
reading only the experts placed in it.

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
import mmap

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.model.moe import HI, LO, ExpertPools, TierPool, sharded
from dynaexq_jax.serving.safetensors_io import release_pages

# Start-up fills a pool through host chunks of at most this many bytes (at least one expert).
FILL_CHUNK_BYTES = 64 << 20


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
    """Both tiers of every expert, as the checkpoint's memory-mapped TierPools [E, ...]: a
    promotion or demotion is one host-to-device copy of exactly one expert's slice of the map.

    A copy goes through a staging buffer of its own (pinned host memory where the backend has
    it, from which the DMA runs asynchronously) and the map's pages are dropped from this process
    as soon as it is made: they stay in the OS page cache, but this process keeps (and its RSS
    counts) only the copies in flight, not every expert it ever read. On the CPU backend the
    device array uses the staging buffer itself (no second copy)."""

    def __init__(self, experts_by_layer: dict[int, dict[str, TierPool]], moe_layers: tuple[int, ...]):
        self.pools = [[experts_by_layer[l]["hi"], experts_by_layer[l]["lo"]] for l in moe_layers]
        self._pinned = _host_memory_sharding()

    @staticmethod
    def _on(device) -> jax.sharding.Sharding:
        return jax.sharding.SingleDeviceSharding(device if device is not None else jax.devices()[0])

    def expert(self, pos: int, tier: int, e: int) -> TierPool:
        """A one-slot TierPool (leading dim 1) of expert e of MoE layer pos in `tier`: views of the
        map, nothing read until to_device copies them."""
        return jax.tree.map(lambda a: a[e:e + 1], self.pools[pos][tier])

    def to_device(self, copies, device=None):
        """expert() slices (any pytree of them) -> arrays on `device` (default: the first): each
        read once into its staging buffer (the one host copy), after which the pages it read are
        dropped from this process."""
        if self._pinned is not None:
            staged = jax.block_until_ready(jax.device_put(copies, self._pinned))
        else:
            staged = jax.tree.map(lambda a: _staged(a, slice(None)), copies)
        release_pages(copies)
        return jax.device_put(staged, self._on(device))

    def pool(self, pos: int, tier: int, experts: list[int], device=None) -> TierPool:
        """A TierPool of the given experts in order on `device` (default: the first), filled
        FILL_CHUNK_BYTES of host memory at a time: only those experts are read from the map, never
        a whole layer at once. The pool is a buffer of the device's own (publications donate it;
        an adopted host buffer cannot be donated), written chunk by chunk."""
        src = self.pools[pos][tier]
        n = len(experts)
        step = max(1, min(n, FILL_CHUNK_BYTES * src.size // max(1, tree_nbytes(src))))
        on = self._on(device)
        out = jax.tree.map(lambda a: jnp.zeros((n,) + a.shape[1:], a.dtype, device=on), src)
        for start in range(0, n, step):
            start = min(start, n - step)          # the last chunk overlaps: one chunk shape, one compile
            idx = np.asarray(experts[start:start + step], np.int64)
            host = jax.tree.map(lambda a, idx=idx: _staged(a, idx), src)
            release_pages(src)
            if self._pinned is not None:
                host = jax.device_put(host, self._pinned)
            out = _write_rows(out, np.int32(start), jax.device_put(host, on))
        return out


def _staged(a: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """a[rows] (rows of the leading axis) copied into a staging buffer of its own: an anonymous
    mapping, page-aligned (XLA's CPU client adopts an aligned buffer as a device buffer instead
    of copying it) and returned to the OS when the array dies, not kept by the allocator."""
    n = len(range(*rows.indices(len(a)))) if isinstance(rows, slice) else len(rows)
    shape = (n,) + a.shape[1:]
    count = int(np.prod(shape))
    out = np.frombuffer(mmap.mmap(-1, max(1, count * a.dtype.itemsize)), a.dtype, count).reshape(shape)
    if isinstance(rows, slice):
        np.copyto(out, a[rows])
    else:
        np.take(a, rows, axis=0, out=out)
    return out


def tree_nbytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def write_slot(pool: TierPool, slot, one: TierPool) -> TierPool:
    return jax.tree.map(lambda p, x: jax.lax.dynamic_update_slice_in_dim(p, x.astype(p.dtype), slot, 0), pool, one)


_write_rows = jax.jit(write_slot, donate_argnums=0)


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
    """The device-resident pools of every MoE layer plus their host-side residency mirrors.

    On an expert-parallel mesh (mesh: model.moe.sharded) of N devices, device d owns experts
    [d E/N, (d + 1) E/N) of every layer and has pools of its own for them: the residency is kept
    per *shard*, shard v = pos * N + d (one device's part of one layer, with local expert ids
    0..E/N - 1), and a swap is one shard's, so an expert never leaves its device. Every [L_moe, E]
    array reads as [L_moe * N, E/N] shards by a reshape. expert_pools() assembles each layer's
    pools from its shards' buffers (no copy) into arrays split across the mesh.

    Across processes (jax.distributed), every process keeps every shard's residency mirror (each
    plans the same swaps from the same replicated scores) but buffers only for the shards of its
    own devices (local(v)); publishing another process's shard updates the mirror alone."""

    def __init__(self, store: HostStore, hi_sets: list, num_experts: int, mesh=None):
        """hi_sets: one per shard (local expert ids); num_experts: experts per shard."""
        self.store, self.mesh = store, mesh
        self.devices = [None] if mesh is None else list(mesh.devices.flat)
        self.per_shard = num_experts
        self.residency = [LayerResidency.from_hi_set(h, num_experts) for h in hi_sets]
        self.pools = []              # per shard: [HI pool, LO pool], None for another process's device
        for v, r in enumerate(self.residency):
            first = self.first_expert(v)
            self.pools.append([store.pool(v // self.n, t, [first + e for e in r.holders[t]], self.device(v))
                               for t in (HI, LO)] if self.local(v) else None)
        self._assignments = [self._assignment(pos) for pos in range(self.layers)]

    @property
    def n(self) -> int:
        return len(self.devices)

    @property
    def layers(self) -> int:
        return len(self.residency) // self.n

    def device(self, v: int):
        """The device of shard v (None: the default one)."""
        return self.devices[v % self.n]

    def local(self, v: int) -> bool:
        """Whether shard v's device belongs to this process (always, within one process)."""
        d = self.device(v)
        return d is None or d.process_index == jax.process_index()

    def first_expert(self, v: int) -> int:
        """The layer's expert id of shard v's local expert 0."""
        return (v % self.n) * self.per_shard

    def _assignment(self, pos: int) -> ExpertPools:
        shards = self.residency[pos * self.n:(pos + 1) * self.n]
        pools = self.pools[pos * self.n:(pos + 1) * self.n]
        if self.mesh is None:
            r = shards[0]
            return ExpertPools(tuple(pools[0]), jnp.asarray(r.tier), jnp.asarray(r.slot))
        split = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(sharded.AXIS))

        def whole(*parts):
            return jax.make_array_from_single_device_arrays((self.n * parts[0].shape[0],) + parts[0].shape[1:],
                                                            split, list(parts))
        mine = [p for p in pools if p is not None]
        tiers = tuple(jax.tree.map(whole, *[p[t] for p in mine]) for t in (HI, LO))
        tier = np.concatenate([r.tier for r in shards])
        # Global slots: shard d's slots follow those of the shards before it, in each tier's pool
        # (every shard's pools are as large as the first's).
        n_hi, n_lo = (len(shards[0].holders[t]) for t in (HI, LO))
        slot = np.concatenate([r.slot + d * np.where(r.tier == HI, n_hi, n_lo)
                               for d, r in enumerate(shards)]).astype(np.int32)
        return ExpertPools(tiers, *sharded.replicated((jnp.asarray(tier), jnp.asarray(slot)), self.mesh),
                           mesh=self.mesh)

    def expert_pools(self) -> list[ExpertPools]:
        for pos, a in enumerate(self._assignments):
            if a is None:
                self._assignments[pos] = self._assignment(pos)
        return self._assignments

    def publish(self, v: int, promote: int, demote: int, hi_copy: TierPool, lo_copy: TierPool) -> None:
        """Write arrived copies into shard v's slots (donated, in place) and publish the new
        assignment. Device work runs in dispatch order, so a segment dispatched before this reads
        the old slots and one dispatched after reads only complete new ones. Another process's
        shard (no copies here) changes only the mirror."""
        s_hi, s_lo = self.residency[v].swap(promote, demote)
        if self.local(v):
            self.pools[v] = list(write_swap(*self.pools[v], np.int32(s_hi), np.int32(s_lo), hi_copy, lo_copy))
        self._assignments[v // self.n] = None      # rebuilt once, when next asked for

    def warm_up(self) -> None:
        """Compile write_swap for every pair of pool shapes now (rewriting slot 0 of each pool with
        its own content), so that the first real publish does not compile while serving."""
        for v, r in enumerate(self.residency):
            if r.holders[HI] and r.holders[LO] and self.local(v):
                pos, first = v // self.n, self.first_expert(v)
                copies = [self.store.to_device(self.store.expert(pos, t, first + r.holders[t][0]), self.device(v))
                          for t in (HI, LO)]
                self.pools[v] = list(write_swap(*self.pools[v], np.int32(0), np.int32(0), *copies))
        self._assignments = [self._assignment(pos) for pos in range(self.layers)]

    @property
    def nbytes(self) -> int:
        """Bytes of one device's pools (every device holds as many)."""
        mine = [p for p in self.pools if p is not None]         # this process's shards
        return tree_nbytes(mine) * self.layers // len(mine)

    def hi_mask(self) -> np.ndarray:
        """bool [L_moe * N, E/N] (shards): which experts are HI now."""
        return np.stack([r.hi_mask for r in self.residency])

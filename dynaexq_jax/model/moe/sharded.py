"""Expert parallelism over a device mesh: every tier's pool is split slot-wise across the devices
of the mesh's "expert" axis (device d holds slots [d * S/N, (d + 1) * S/N) of each S-slot pool),
while the tokens, the dense parameters and the assignment are replicated. Each device computes
the contributions of the experts it holds (in its local view the others sit on an out-of-range
tier, which every backend skips: moe.base's contract) and one psum over the axis adds them up:
one all-reduce of the layer's [T, H] output per MoE layer. The assignment stays global: slot[e]
indexes the concatenation of the devices' slots, so a runtime that plans per device keeps each
expert's slot on the device that owns it. The mesh may span processes (jax.distributed, each
with devices of its own): every process runs the same program over the whole mesh and holds only
its own devices' shards."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dynaexq_jax.errors import RuntimeConfigError
from dynaexq_jax.model.moe.base import ExpertPools

AXIS = "expert"


def expert_mesh(devices: int | Sequence[jax.Device]) -> Mesh:
    """A one-axis mesh named AXIS over `devices` (a count: the first that many of jax.devices())."""
    if isinstance(devices, int):
        have = jax.devices()
        if not 1 <= devices <= len(have):
            raise RuntimeConfigError(f"devices={devices}, but JAX sees {len(have)} {jax.default_backend()} device(s) "
                                     f"(on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N gives N)")
        if jax.process_count() > 1 and devices != len(have):
            raise RuntimeConfigError(f"devices={devices}: across {jax.process_count()} processes the mesh spans "
                                     f"every process's devices ({len(have)})")
        devices = have[:devices]
    return Mesh(np.asarray(list(devices)), (AXIS,))


def replicated_on(mesh: Mesh) -> NamedSharding:
    """The sharding of an array held whole by every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def replicated(tree, mesh: Mesh):
    """Every leaf of tree on every device of the mesh."""
    return jax.device_put(tree, replicated_on(mesh))


def split_pools(experts: ExpertPools, mesh: Mesh) -> ExpertPools:
    """experts with every pool split slot-wise across the mesh (each pool's slot count must be a
    multiple of the device count) and the assignment replicated; the mesh rides along as static
    data, so the MoE op knows to run expert parallel."""
    n = mesh.shape[AXIS]
    uneven = [p.size for p in experts.pools if p.size % n]
    if uneven:
        raise RuntimeConfigError(f"pools of {uneven} slots do not split evenly across {n} devices")
    split = NamedSharding(mesh, PartitionSpec(AXIS))
    pools = jax.tree.map(lambda a: jax.device_put(a, split), experts.pools)
    return ExpertPools(pools, *replicated((experts.tier, experts.slot), mesh), mesh=mesh)


def local_view(pools, tier, slot) -> ExpertPools:
    """Inside shard_map over AXIS: this device's pools (its slots of every tier) with the global
    assignment tier/slot [E] mapped to them: its own experts at their local slots, every other
    expert on an out-of-range tier, which every backend skips."""
    d = jax.lax.axis_index(AXIS)
    sizes = jnp.array([p.size for p in pools], jnp.int32)        # this device's slots per tier
    size = sizes[jnp.clip(tier, 0, len(pools) - 1)]
    first = d * size
    here = (tier >= 0) & (tier < len(pools)) & (slot >= first) & (slot < first + size)
    return ExpertPools(pools, jnp.where(here, tier, len(pools)), slot - first)


def moe_experts_sharded(x, ids, weights, experts: ExpertPools, local_op: Callable):
    """local_op(x, ids, weights, local ExpertPools) on every device of experts.mesh over its own
    slots, summed across devices. x [T, H], ids/weights [T, k] replicated -> [T, H] in x.dtype."""
    mesh = experts.mesh

    def local(x, ids, weights, pools, tier, slot):
        mine = local_view(pools, tier, slot)
        return jax.lax.psum(local_op(x, ids, weights, mine).astype(jnp.float32), AXIS).astype(x.dtype)

    pool_specs = jax.tree.map(lambda _: PartitionSpec(AXIS), experts.pools)
    rep = PartitionSpec()
    return jax.shard_map(local, mesh=mesh, in_specs=(rep, rep, rep, pool_specs, rep, rep), out_specs=rep,
                         check_vma=False)(x, ids, weights, experts.pools, experts.tier, experts.slot)

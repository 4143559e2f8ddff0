"""What every MoE backend shares: the router, the expert pools with their precision assignment,
and how a tier sees the routed (token, expert) pairs.

An MoE layer's resident experts are an ExpertPools: one TierPool per tier (tier 0 = HI,
tier 1 = LO, ...), each a stack of `size` slots in one TierFormat (with the experts' float biases
beside the weights where the family has them, so a slot's copy moves them too), plus the
assignment: for every expert e, tier[e] and slot[e] say which pool slot holds it. Pool sizes are static (fixed by the
budget); the assignment is data, so changing it never recompiles.

The op's contract, for every backend: a pair whose expert sits on a tier that is out of range
or whose pool is empty contributes nothing; a slot outside its pool is clipped into it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dynaexq_jax.model.quant import BIAS_DTYPE, Format, QTensor, TierFormat, parse_tier_format, quantize

HI, LO = 0, 1


@struct.dataclass
class TierPool:
    """`size` expert slots of one tier format (gate and up share one, down may differ): gate/up
    [S, H, I], down [S, I, H] (input-major), and
    optionally their biases (f32, gate/up [S, I], down [S, H]; all three or none: gpt-oss)."""
    gate: QTensor
    up: QTensor
    down: QTensor
    gate_bias: jax.Array | None = None
    up_bias: jax.Array | None = None
    down_bias: jax.Array | None = None

    @property
    def size(self) -> int:
        return self.gate.data.shape[0]

    @property
    def fmt(self) -> TierFormat:
        return TierFormat(self.gate.fmt, self.down.fmt)

    @property
    def has_bias(self) -> bool:
        return self.gate_bias is not None

    @property
    def nbytes(self) -> int:
        biases = sum(int(b.nbytes) for b in (self.gate_bias, self.up_bias, self.down_bias) if b is not None)
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes + biases


@struct.dataclass
class ExpertPools:
    """One MoE layer's resident experts. pools[t] is tier t's pool; tier/slot: int32 [E]. mesh
    (static): set when the pools are split across devices (moe.sharded: the op runs expert
    parallel), None on one device."""
    pools: tuple[TierPool, ...]
    tier: jax.Array
    slot: jax.Array
    mesh: object = struct.field(pytree_node=False, default=None)

    @property
    def num_experts(self) -> int:
        return self.tier.shape[0]


def quantize_experts(gate: np.ndarray, up: np.ndarray, down: np.ndarray, fmt: TierFormat | Format | str,
                     biases: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> TierPool:
    """Float expert weights (input-major, [E, H, I], [E, H, I], [E, I, H]) -> a TierPool in fmt (a
    tier format, parse_tier_format); biases (gate, up [E, I], down [E, H]) stay float
    (BIAS_DTYPE) whatever the format."""
    tier = parse_tier_format(fmt)
    b = [None] * 3 if biases is None else [np.asarray(x, BIAS_DTYPE) for x in biases]
    return TierPool(quantize(gate, tier.gate_up), quantize(up, tier.gate_up), quantize(down, tier.down), *b)


def single_tier(pool: TierPool) -> ExpertPools:
    """Every expert resident in one tier, expert e in slot e."""
    e = pool.size
    return ExpertPools((pool,), jnp.zeros((e,), jnp.int32), jnp.arange(e, dtype=jnp.int32))


def route(x: jax.Array, router: jax.Array, top_k: int, norm_topk_prob: bool):
    """Exactly the HF Qwen3-MoE router: logits in x's dtype, softmax in f32 over all experts,
    top-k, renormalise only if norm_topk_prob, weights cast back to x's dtype.
    x: [T, H], router: [H, E] -> ids int32 [T, k], weights [T, k] (x.dtype), probs f32 [T, k]."""
    logits = x @ router.astype(x.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_p, ids = jax.lax.top_k(probs, top_k)
    w = top_p / top_p.sum(-1, keepdims=True) if norm_topk_prob else top_p
    return ids.astype(jnp.int32), w.astype(x.dtype), top_p


def tier_pairs(ids, weights, experts: ExpertPools):
    """The routed pairs ids/weights [T, k] as each tier with a non-empty pool sees them: yields
    (pool, slots int32 [T, k] clipped into the pool, w f32 [T, k] (0 where the pair is not this
    tier's), on_tier bool [T, k])."""
    for t, pool in enumerate(experts.pools):
        if pool.size == 0:
            continue
        on_tier = experts.tier[ids] == t
        slots = jnp.clip(experts.slot[ids], 0, pool.size - 1)
        yield pool, slots, jnp.where(on_tier, weights.astype(jnp.float32), 0.0), on_tier

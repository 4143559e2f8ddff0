"""The routed-expert FFN: router, per-tier expert pools with a precision assignment, and the
mixed-tier MoE op (one signature, three backends: "xla" everywhere, which calls the CPU kernel
(cpu_kernel.py) for the routed experts when it runs on the CPU; "xla-only", the same without
that kernel; "pallas", the Pallas kernels on GPU).

An MoE layer's resident experts are an ExpertPools: one TierPool per tier (tier 0 = HI,
tier 1 = LO, ...), each a stack of `size` slots in one Format, plus the assignment: for every
expert e, tier[e] and slot[e] say which pool slot holds it. Pool sizes are static (fixed by the
budget); the assignment is data, so changing it never recompiles.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dynaexq_jax.model.moe import cpu_kernel
from dynaexq_jax.model.quant import Format, QTensor, quantize

HI, LO = 0, 1
BACKENDS = ("xla", "xla-only", "pallas")
XLA_BACKENDS = ("xla", "xla-only")    # the XLA op, with or without the CPU kernel


@struct.dataclass
class TierPool:
    """`size` expert slots of one format: gate/up [S, H, I], down [S, I, H] (input-major)."""
    gate: QTensor
    up: QTensor
    down: QTensor

    @property
    def size(self) -> int:
        return self.gate.data.shape[0]

    @property
    def fmt(self) -> Format:
        return self.gate.fmt

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes


@struct.dataclass
class ExpertPools:
    """One MoE layer's resident experts. pools[t] is tier t's pool; tier/slot: int32 [E]."""
    pools: tuple[TierPool, ...]
    tier: jax.Array
    slot: jax.Array

    @property
    def num_experts(self) -> int:
        return self.tier.shape[0]


def quantize_experts(gate: np.ndarray, up: np.ndarray, down: np.ndarray, fmt: Format | str) -> TierPool:
    """Float expert weights (input-major, [E, H, I], [E, H, I], [E, I, H]) -> a TierPool in fmt."""
    return TierPool(quantize(gate, fmt), quantize(up, fmt), quantize(down, fmt))


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


def moe_experts_reference(x, ids, weights, experts: ExpertPools):
    """Dense reference: dequantize every expert at its assigned tier and slot, then combine.
    x: [T, H], ids/weights: [T, k] -> [T, H] (f32 accumulation, x.dtype out)."""
    out = jnp.zeros(x.shape, jnp.float32)
    for t, pool in enumerate(experts.pools):
        if pool.size == 0:
            continue
        on_tier = experts.tier[ids] == t                       # [T, k]
        slots = jnp.clip(experts.slot[ids], 0, pool.size - 1)  # [T, k]
        # combine[t, s]: routing weight of token t for the expert held in slot s of this tier.
        combine = jnp.zeros((x.shape[0], pool.size), jnp.float32)
        combine = combine.at[jnp.arange(x.shape[0])[:, None], slots].add(
            jnp.where(on_tier, weights.astype(jnp.float32), 0.0))
        xf = x.astype(jnp.float32)
        g = jnp.einsum("th,shi->tsi", xf, pool.gate.dequantize(jnp.float32))
        u = jnp.einsum("th,shi->tsi", xf, pool.up.dequantize(jnp.float32))
        h = jax.nn.silu(g) * u * combine[..., None]
        out = out + jnp.einsum("tsi,sih->th", h, pool.down.dequantize(jnp.float32))
    return out.astype(x.dtype)


def _batched_dot(x, w):
    """x [S, T, K] @ w [S, K, N] -> [S, T, N], one matmul per slot (a batch dim, no transposes)."""
    return jax.lax.dot_general(x, w, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)


# A gathered slot is copied (read + write) before the matmul reads it: about three passes over
# its bytes, against one pass per slot for the dense product.
GATHER_COST = 3


def _take(pool: TierPool, slots) -> TierPool:
    return jax.tree.map(lambda a: a[slots], pool)


def _expert_ffn(xs, pool: TierPool, dtype):
    """SwiGLU of every slot of `pool` over xs [S, T, H] -> f32 [S, T, H] (slot s on xs[s])."""
    h = jax.nn.silu(_batched_dot(xs, pool.gate.dequantize(dtype))) * _batched_dot(xs, pool.up.dequantize(dtype))
    return h, pool.down.dequantize(dtype)


def _routed_pairs(x, pool: TierPool, slots, w, on_tier, k, every_pair: bool):
    """Only the (token, expert) pairs routed to this tier, gathered slot by slot. The number of
    such pairs n is data; a lax.switch over power-of-two buckets runs the branch sized for n, so
    the work (and bytes read) follows the pairs this tier actually serves, not all T*k. When the
    pool holds every expert (a single-tier model), all pairs are its own: no sort, no switch."""
    T, H = x.shape
    P = T * k

    def pairs(pick):                                              # pick: [size] pair indices
        tok = pick // k
        sel = _take(pool, slots.reshape(-1)[pick])
        h, down = _expert_ffn(x[tok][:, None, :], sel, x.dtype)
        wts = w.reshape(-1)[pick]                                 # 0 for padding pairs of other tiers
        y = _batched_dot((h * wts[:, None, None]).astype(x.dtype), down)[:, 0]   # [size, H]
        return jnp.zeros((T, H), jnp.float32).at[tok].add(y)

    if every_pair:
        return pairs(jnp.arange(P))
    order = jnp.argsort(~on_tier.reshape(-1), stable=True)       # this tier's pairs first
    n = on_tier.sum()
    sizes = sorted({min(P, 2 ** i) for i in range(P.bit_length() + 1)})
    branches = [lambda _: jnp.zeros((T, H), jnp.float32)] + [lambda _, s=s: pairs(order[:s]) for s in sizes]
    index = jnp.where(n == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes), n))
    return jax.lax.switch(index, branches, None)


def block_rows(pairs: int, slots: int) -> int:
    """Rows per block of the grouped path: about one block per slot's fair share of the pairs,
    a power of two in [8, 128]. Padding costs at most one partly filled block per slot."""
    share = max(1, -(-pairs // slots))
    return int(min(128, max(8, 1 << (share - 1).bit_length())))


def grouped_blocks(pairs: int, slots: int) -> int:
    """Static block count of the grouped path: enough for any routing (every slot's last block may
    be partial; a block holds at least one pair)."""
    return min(-(-pairs // block_rows(pairs, slots)) + slots, pairs)


# On XLA CPU, reading one expert weight costs about as much as multiplying it with this many rows
# (about 8.5 GB/s against about 50 GFLOP/s on the CI machine): the unit of the path choice below.
ROWS_PER_WEIGHT_READ = 12


def grouped_is_cheaper(tokens: int, k: int, slots: int) -> bool:
    """Grouped blocks (gather a copy of each block's weights, compute only routed rows) against
    the dense product (read every slot once, compute every token on every slot)."""
    P = tokens * k
    n_blocks = grouped_blocks(P, slots)
    rows = n_blocks * block_rows(P, slots)
    dense = slots * (1 + tokens / ROWS_PER_WEIGHT_READ)
    return n_blocks * GATHER_COST + rows / ROWS_PER_WEIGHT_READ < dense


def _grouped_pairs(x, pool: TierPool, slots, w, on_tier):
    """Dropless grouped matmul (prefill, training): the (token, expert) pairs this tier serves,
    sorted by slot into blocks of b rows that each belong to one slot; every block runs as one
    small matmul against its slot's (gathered, dequantized) weights. The work follows the pairs
    (plus at most one padding block per slot), not every slot over every token. Shapes are
    static: the block count is the worst case, surplus blocks carry zero weights."""
    T, H = x.shape
    S = pool.size
    P = slots.size
    b = block_rows(P, S)
    n_blocks = grouped_blocks(P, S)
    key = jnp.where(on_tier, slots, S).reshape(-1)                  # other tiers' pairs sort last
    order = jnp.argsort(key, stable=True)
    counts = jnp.bincount(key, length=S + 1)[:S]
    padded = (counts + b - 1) // b * b
    first_row = jnp.cumsum(padded) - padded                         # where each slot's rows begin
    first_pair = jnp.cumsum(counts) - counts                        # ... and its sorted pairs
    sorted_key = key[order]
    valid = sorted_key < S
    s_of = jnp.minimum(sorted_key, S - 1)
    dest = jnp.where(valid, first_row[s_of] + jnp.arange(P) - first_pair[s_of], n_blocks * b)
    rows = n_blocks * b
    row_tok = jnp.full((rows + 1,), T, jnp.int32).at[dest].set(order // w.shape[1])[:rows]
    row_w = jnp.zeros((rows + 1,), jnp.float32).at[dest].set(w.reshape(-1)[order])[:rows]
    block_slot = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), jnp.arange(n_blocks) * b, side="right"), S - 1)
    xs = jnp.concatenate([x, jnp.zeros((1, H), x.dtype)])[row_tok].reshape(n_blocks, b, H)
    h, down = _expert_ffn(xs, _take(pool, block_slot), x.dtype)
    y = _batched_dot((h * row_w.reshape(n_blocks, b, 1)).astype(x.dtype), down).reshape(rows, H)
    return jnp.zeros((T + 1, H), jnp.float32).at[row_tok].add(y)[:T]


def _xla_tier(x, pool: TierPool, slots, w, on_tier, num_experts: int):
    """One tier's share of the output in plain XLA, f32 [T, H]. Chosen statically by shape: when
    the tokens route to few (token, expert) pairs compared with the experts (decode), gather
    just the slots of the pairs this tier serves (_routed_pairs); otherwise either sort the
    pairs into per-slot blocks (_grouped_pairs: long prefills, training) or run every slot over
    every token with the routing weights as a dense combine (short prefills, batched decode),
    whichever moves and computes less. All use batch-dim dot_generals: XLA CPU's transposing
    einsums were 5-10x slower."""
    T, H = x.shape
    k = slots.shape[1]
    # A tier serves about T*k*S/E pairs (its share of slots): gather them one by one when
    # that is cheaper than one pass over its S slots.
    if GATHER_COST * T * k <= num_experts:
        return _routed_pairs(x, pool, slots, w, on_tier, k, every_pair=pool.size == num_experts)
    if grouped_is_cheaper(T, k, pool.size):
        return _grouped_pairs(x, pool, slots, w, on_tier)
    combine = jnp.zeros((T, pool.size), jnp.float32).at[jnp.arange(T)[:, None], slots].add(w)
    h, down = _expert_ffn(jnp.broadcast_to(x, (pool.size, T, H)), pool, x.dtype)
    return _batched_dot((h * combine.T[..., None]).astype(x.dtype), down).sum(0)


# The CPU kernel streams each routed slot once and computes only its routed rows. At 64 pairs per
# slot (512 tokens, top-4, 32 slots, the decode-bench shapes) it still ran 1.7-2x faster than
# XLA's grouped path; longer prefills keep the grouped path, whose larger blocks make better
# matmuls and which was not measured against the kernel beyond that.
KERNEL_MAX_PAIRS_PER_SLOT = 64


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _kernel_tier(x, pool: TierPool, slots, w, on_tier, num_experts: int):
    """_xla_tier's result from the CPU kernel when lowered for the CPU (XLA elsewhere, e.g. in
    an export for CUDA); gradients come from the XLA path (training differentiates this op)."""
    return jax.lax.platform_dependent(
        x, pool, slots, w, on_tier,
        cpu=lambda x, pool, slots, w, on_tier: cpu_kernel.tier_contribution(x, pool, jnp.where(on_tier, slots, -1), w),
        default=lambda x, pool, slots, w, on_tier: _xla_tier(x, pool, slots, w, on_tier, num_experts))


def _kernel_tier_fwd(x, pool, slots, w, on_tier, num_experts):
    return _kernel_tier(x, pool, slots, w, on_tier, num_experts), (x, pool, slots, w, on_tier)


def _kernel_tier_bwd(num_experts, res, g):
    x, pool, slots, w, on_tier = res
    _, vjp = jax.vjp(lambda x, pool, w: _xla_tier(x, pool, slots, w, on_tier, num_experts), x, pool, w)
    dx, dpool, dw = vjp(g)
    return dx, dpool, None, dw, None


_kernel_tier.defvjp(_kernel_tier_fwd, _kernel_tier_bwd)


def moe_experts_xla(x, ids, weights, experts: ExpertPools, use_kernel: bool = True):
    """The XLA backend (the default): per tier, the CPU kernel (cpu_kernel.py) where it is built,
    wanted (use_kernel) and the shape suits it, else plain XLA (_xla_tier). f32 accumulation,
    x.dtype out."""
    T, H = x.shape
    k = ids.shape[1]
    out = jnp.zeros((T, H), jnp.float32)
    for t, pool in enumerate(experts.pools):
        if pool.size == 0:
            continue
        on_tier = experts.tier[ids] == t                                       # [T, k]
        slots = jnp.clip(experts.slot[ids], 0, pool.size - 1)                  # [T, k]
        w = jnp.where(on_tier, weights.astype(jnp.float32), 0.0)
        if use_kernel and cpu_kernel.enabled() and T * k <= KERNEL_MAX_PAIRS_PER_SLOT * pool.size:
            out = out + _kernel_tier(x, pool, slots, w, on_tier, experts.num_experts)
        else:
            out = out + _xla_tier(x, pool, slots, w, on_tier, experts.num_experts)
    return out.astype(x.dtype)


def moe_experts(x, ids, weights, experts: ExpertPools, backend: str = "xla"):
    """The mixed-tier MoE op: tokens x [T, H] routed to ids/weights [T, k] -> [T, H]."""
    if backend in XLA_BACKENDS:
        return moe_experts_xla(x, ids, weights, experts, use_kernel=backend == "xla")
    if backend == "pallas":
        from pallas_kernels.moe import moe_experts_pallas
        return moe_experts_pallas(x, ids, weights, experts)
    raise ValueError(f"unknown MoE backend '{backend}' (use one of {BACKENDS})")

"""The XLA backend of the MoE op: plain XLA everywhere ("xla-only"), plus the CPU kernel
(cpu_kernel.py) for the routed experts where it is built and the shape suits it ("xla").

Per tier, a static choice by shape (xla_strategy) between three ways to compute its share:
routed-pair gathers (decode), grouped per-slot blocks (long prefills, training) and every slot
over every token (short prefills, batched decode). All use batch-dim dot_generals: XLA CPU's
transposing einsums were 5-10x slower.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dynaexq_jax.model.moe import cpu_kernel
from dynaexq_jax.model.moe.base import ExpertPools, TierPool, tier_pairs


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


def xla_strategy(tokens: int, k: int, slots: int, num_experts: int) -> str:
    """How _xla_tier computes a tier of `slots` slots for tokens x k pairs: "routed", "grouped" or
    "dense". A tier serves about T*k*S/E pairs (its share of slots): gather them one by one when
    that is cheaper than one pass over its S slots; else grouped blocks or the dense product,
    whichever moves and computes less."""
    if GATHER_COST * tokens * k <= num_experts:
        return "routed"
    return "grouped" if grouped_is_cheaper(tokens, k, slots) else "dense"


def _xla_tier(x, pool: TierPool, slots, w, on_tier, num_experts: int):
    """One tier's share of the output in plain XLA, f32 [T, H]: routed-pair gathers of the slots
    this tier serves (_routed_pairs), pairs sorted into per-slot blocks (_grouped_pairs), or every
    slot over every token with the routing weights as a dense combine (xla_strategy chooses)."""
    T, H = x.shape
    k = slots.shape[1]
    strategy = xla_strategy(T, k, pool.size, num_experts)
    if strategy == "routed":
        return _routed_pairs(x, pool, slots, w, on_tier, k, every_pair=pool.size == num_experts)
    if strategy == "grouped":
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
    for pool, slots, w, on_tier in tier_pairs(ids, weights, experts):
        if use_kernel and cpu_kernel.enabled() and T * k <= KERNEL_MAX_PAIRS_PER_SLOT * pool.size:
            out = out + _kernel_tier(x, pool, slots, w, on_tier, experts.num_experts)
        else:
            out = out + _xla_tier(x, pool, slots, w, on_tier, experts.num_experts)
    return out.astype(x.dtype)

"""The XLA backend of the MoE op: plain XLA everywhere ("xla-only"), plus the CPU kernel
(cpu_kernel.py) for the routed experts wherever it is built ("xla").

Per tier, a static choice by shape (xla_strategy) between three ways to compute its share:
routed-pair gathers (decode), grouped per-slot blocks (long prefills, training) and every slot
over every token (short prefills, batched decode). All use batch-dim dot_generals: XLA CPU's
transposing einsums were 5-10x slower. XLA has no dequantizing matmul, so each way dequantizes
the slots it multiplies with; it does so a group of blocks at a time (at most GROUP_BYTES of
dequantized weights and activations per group, a lax.scan over groups), so the op's workspace
is bounded by a constant, never by a whole pool (workspace_bytes).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.model.moe import cpu_kernel
from dynaexq_jax.model.moe.base import ExpertPools, TierPool, tier_pairs
from dynaexq_jax.model.quant import Format, expert_nbytes
from pallas_kernels.grouped_matmul.activation import SWIGLU, Activation, glu


def _batched_dot(x, w):
    """x [S, T, K] @ w [S, K, N] -> [S, T, N], one matmul per slot (a batch dim, no transposes)."""
    return jax.lax.dot_general(x, w, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)


# A gathered slot is copied (read + write) before the matmul reads it: about three passes over
# its bytes, against one pass per slot for the dense product.
GATHER_COST = 3

# Bytes of dequantized weights and activations one group of blocks may hold (module-level, read
# when a function is traced). 64 MiB: two bf16 experts of Qwen3-30B-A3B gathered and widened
# (27 MiB each) with their rows; every expert of the small models, which so run without a loop.
GROUP_BYTES = 64 * 2**20


def _take(pool: TierPool, slots) -> TierPool:
    return jax.tree.map(lambda a: a[slots], pool)


def _expert_ffn(xs, pool: TierPool, dtype, act: Activation):
    """The gated activation of every slot of `pool` over xs [S, T, H] -> (f32 [S, T, I] (slot s on
    xs[s]), the dequantized down weights); the gate/up biases are added first where the pool has them."""
    g, u = _batched_dot(xs, pool.gate.dequantize(dtype)), _batched_dot(xs, pool.up.dequantize(dtype))
    if pool.has_bias:
        g, u = g + pool.gate_bias[:, None, :], u + pool.up_bias[:, None, :]
    return glu(g, u, act), pool.down.dequantize(dtype)


def weight_bytes(fmt: Format, hidden: int, inter: int, dtype, widen: bool = True) -> int:
    """One slot's weights in a block: gathered (packed) and dequantized in dtype, or widened to
    f32 (XLA CPU multiplies 16-bit floats in f32, dequantizing straight into the widened copy)."""
    item = np.dtype(dtype).itemsize
    return expert_nbytes(fmt, hidden, inter) + 3 * hidden * inter * (max(item, 4) if widen else item)


def row_bytes(hidden: int, inter: int, dtype) -> int:
    """One row of a block: the gathered token, gate/up/SwiGLU in f32, its cast for the down
    product, the f32 output."""
    item = np.dtype(dtype).itemsize
    return hidden * item + 3 * inter * 4 + inter * item + hidden * 4


def group_size(fmt: Format, hidden: int, inter: int, rows: int, dtype, n_blocks: int) -> int:
    """Blocks of `rows` rows per group: as many as fit in GROUP_BYTES (at least one, at most all),
    their weights counted widened whatever the platform."""
    block = weight_bytes(fmt, hidden, inter, dtype) + rows * row_bytes(hidden, inter, dtype)
    return int(max(1, min(n_blocks, GROUP_BYTES // block)))


def _run_blocks(x, pool: TierPool, block_slot, row_tok, row_w, act: Activation = SWIGLU, *,
                every_token: bool = False):
    """The sum over blocks of weight * FFN (act) of the block's slot over its rows, f32 [T, H].
    block_slot int32 [n]; row_tok int32 [n, b]: the token of each row (T: a padding row);
    row_w f32 [n, b]: its routing weight (0 for padding). every_token: every block's rows are the
    T tokens in order (the dense product), summed instead of scattered. Blocks run in groups of
    group_size; more than one group runs as a lax.scan (the last group padded with zero-weight
    blocks), so only one group's weights are ever dequantized at once."""
    T, H = x.shape
    n, b = row_tok.shape
    G = group_size(pool.fmt, H, pool.gate.n, b, x.dtype, n)
    rows_x = jnp.concatenate([x, jnp.zeros((1, H), x.dtype)])

    def group(out, blocks):
        slot, tok, w = blocks
        xs = jnp.broadcast_to(x, (slot.shape[0], T, H)) if every_token else rows_x[tok]
        # Tied by the barrier to this group's routing weights, the pool is read only once they
        # exist: XLA can neither dequantize a layer's weights ahead of its tokens (they depend on
        # the weights alone) nor hoist the dequantization, or XLA CPU's widening of a 16-bit gather
        # to f32, of the whole pool out of the loop.
        pool_g, slot, w = jax.lax.optimization_barrier((pool, slot, w))
        taken = _take(pool_g, slot)
        h, down = _expert_ffn(xs, taken, x.dtype, act)
        y = _batched_dot((h * w[..., None]).astype(x.dtype), down)                 # [G, b, H]
        if pool.has_bias:                      # weight * (h @ down + bias): padding rows weigh 0
            y = y + w[..., None] * taken.down_bias[:, None, :]
        if every_token:
            return out.at[:T].add(y.sum(0)), None
        return out.at[tok.reshape(-1)].add(y.reshape(-1, H)), None

    out = jnp.zeros((T + 1, H), jnp.float32)
    blocks = (block_slot, row_tok, row_w)
    if n <= G:
        return group(out, blocks)[0][:T]
    pad = -n % G
    blocks = tuple(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(-1, G, *a.shape[1:]) for a in blocks)
    return jax.lax.scan(group, out, blocks)[0][:T]


def _routed_pairs(x, pool: TierPool, slots, w, on_tier, k, every_pair: bool, act: Activation = SWIGLU):
    """Only the (token, expert) pairs routed to this tier, gathered slot by slot (blocks of one
    row). The number of such pairs n is data; a lax.switch over power-of-two buckets runs the
    branch sized for n, so the work (and bytes read) follows the pairs this tier actually serves,
    not all T*k. When the pool holds every expert (a single-tier model), all pairs are its own:
    no sort, no switch."""
    T, H = x.shape
    P = T * k

    def pairs(pick):                                              # pick: [size] pair indices
        # Padding pairs of other tiers carry weight 0.
        return _run_blocks(x, pool, slots.reshape(-1)[pick], (pick // k)[:, None], w.reshape(-1)[pick][:, None],
                           act)

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


def _grouped_pairs(x, pool: TierPool, slots, w, on_tier, act: Activation = SWIGLU):
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
    return _run_blocks(x, pool, block_slot, row_tok.reshape(n_blocks, b), row_w.reshape(n_blocks, b), act)


def xla_strategy(tokens: int, k: int, slots: int, num_experts: int) -> str:
    """How _xla_tier computes a tier of `slots` slots for tokens x k pairs: "routed", "grouped" or
    "dense". A tier serves about T*k*S/E pairs (its share of slots): gather them one by one when
    that is cheaper than one pass over its S slots; else grouped blocks or the dense product,
    whichever moves and computes less."""
    if GATHER_COST * tokens * k <= num_experts:
        return "routed"
    return "grouped" if grouped_is_cheaper(tokens, k, slots) else "dense"


def _xla_tier(x, pool: TierPool, slots, w, on_tier, num_experts: int, act: Activation = SWIGLU):
    """One tier's share of the output in plain XLA, f32 [T, H]: routed-pair gathers of the slots
    this tier serves (_routed_pairs), pairs sorted into per-slot blocks (_grouped_pairs), or every
    slot over every token with the routing weights as a dense combine (xla_strategy chooses)."""
    T, H = x.shape
    k = slots.shape[1]
    strategy = xla_strategy(T, k, pool.size, num_experts)
    if strategy == "routed":
        return _routed_pairs(x, pool, slots, w, on_tier, k, pool.size == num_experts, act)
    if strategy == "grouped":
        return _grouped_pairs(x, pool, slots, w, on_tier, act)
    combine = jnp.zeros((T, pool.size), jnp.float32).at[jnp.arange(T)[:, None], slots].add(w)
    every = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (pool.size, T))
    return _run_blocks(x, pool, jnp.arange(pool.size, dtype=jnp.int32), every, combine.T, act, every_token=True)


def tier_workspace_bytes(fmt: Format, tokens: int, k: int, slots: int, num_experts: int, hidden: int,
                         inter: int, dtype, widen: bool = True) -> tuple[int, int]:
    """Peak transient bytes of _xla_tier for one tier of `slots` slots, an upper bound in two
    parts: (weights dequantized ahead, transient). A tier whose blocks fit in one group is
    dequantized whole, which depends on the weights alone: XLA may schedule it for every layer up
    front (and hoists it out of the decode loop), so those bytes are the first part. Else one
    group of blocks at a time, in a loop that ties them to the tokens. The transient part: the
    group's rows (and weights), the f32 accumulator, the routing metadata of its strategy."""
    P = tokens * k
    strategy = xla_strategy(tokens, k, slots, num_experts)
    if strategy == "routed":
        n, b, meta = P, 1, 4 * 4 * P
    elif strategy == "grouped":
        n, b = grouped_blocks(P, slots), block_rows(P, slots)
        meta = 4 * (8 * P + 3 * n * b + 4 * slots)
    else:
        n, b, meta = slots, tokens, 4 * tokens * slots * 3
    G = group_size(fmt, hidden, inter, b, dtype, n)
    weights, rows = G * weight_bytes(fmt, hidden, inter, dtype, widen), G * b * row_bytes(hidden, inter, dtype)
    transient = rows + 4 * (tokens + 1) * hidden + meta
    return (weights, transient) if n <= G else (0, weights + transient)


def workspace_bytes(hi: Format, lo: Format, tokens: int, k: int, num_experts: int, hidden: int, inter: int,
                    dtype, layers: int, widen: bool = True) -> int:
    """Peak transient bytes of the XLA path in a program of `layers` two-tier MoE layers, whatever
    their split of the experts (the worst counts): every layer's weights dequantized ahead
    (tier_workspace_bytes), the larger tier's transient bytes (the tiers run one after the other)
    and the f32 output. Checked against XLA's memory analysis in tests/test_budget.py."""
    def split(n):
        (w_hi, t_hi), (w_lo, t_lo) = (tier_workspace_bytes(f, tokens, k, s, num_experts, hidden, inter, dtype, widen)
                                      for f, s in ((hi, n), (lo, num_experts - n)))
        return layers * (w_hi + w_lo) + max(t_hi, t_lo)
    return max(split(n) for n in range(1, num_experts)) + 4 * tokens * hidden


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _kernel_tier(x, pool: TierPool, slots, w, on_tier, num_experts: int, act: Activation = SWIGLU):
    """_xla_tier's result from the CPU kernel when lowered for the CPU (XLA elsewhere, e.g. in
    an export for CUDA); gradients come from the XLA path (training differentiates this op)."""
    return jax.lax.platform_dependent(
        x, pool, slots, w, on_tier,
        cpu=lambda x, pool, slots, w, on_tier: cpu_kernel.tier_contribution(x, pool, jnp.where(on_tier, slots, -1), w,
                                                                             act),
        default=lambda x, pool, slots, w, on_tier: _xla_tier(x, pool, slots, w, on_tier, num_experts, act))


def _kernel_tier_fwd(x, pool, slots, w, on_tier, num_experts, act):
    return _kernel_tier(x, pool, slots, w, on_tier, num_experts, act), (x, pool, slots, w, on_tier)


def _kernel_tier_bwd(num_experts, act, res, g):
    x, pool, slots, w, on_tier = res
    _, vjp = jax.vjp(lambda x, pool, w: _xla_tier(x, pool, slots, w, on_tier, num_experts, act), x, pool, w)
    dx, dpool, dw = vjp(g)
    return dx, dpool, None, dw, None


_kernel_tier.defvjp(_kernel_tier_fwd, _kernel_tier_bwd)


def moe_experts_xla(x, ids, weights, experts: ExpertPools, use_kernel: bool = True, activation: Activation = SWIGLU):
    """The XLA backend (the default): every tier through the CPU kernel (cpu_kernel.py) where it
    is built and wanted (use_kernel), else plain XLA (_xla_tier). The kernel streams each routed
    slot once at any pool size and token count (on 512-4096-token prefills, one tier or two, it
    ran 1.9-7.6x faster than XLA's grouped path; more at decode), so both tiers of a layer take
    the same path. f32 accumulation, x.dtype out."""
    T, H = x.shape
    out = jnp.zeros((T, H), jnp.float32)
    kernel = use_kernel and cpu_kernel.enabled()
    for pool, slots, w, on_tier in tier_pairs(ids, weights, experts):
        tier = _kernel_tier if kernel else _xla_tier
        out = out + tier(x, pool, slots, w, on_tier, experts.num_experts, activation)
    return out.astype(x.dtype)

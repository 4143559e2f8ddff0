"""Decoder pieces every family shares: the parameter tree's outer shape (Params), linear layers,
RMSNorm, the attention core over the KV cache, the dense SwiGLU MLP, the routed-expert MLP
and the logits tail. Weights are input-major ([in, out], y = x @ W)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dynaexq_jax.model.config import ModelConfig
from dynaexq_jax.model.families.schema import LINEAR, Experts, Tensor
from dynaexq_jax.model.moe import ExpertPools, moe_experts, route
from dynaexq_jax.model.moe.cpu_kernel import dense_matmul, residual_dtype

HF_LM_HEAD = "lm_head.weight"   # the HF output head; tied models may still carry a copy of the embedding


@struct.dataclass
class DenseMLP:
    gate: jax.Array       # [H, I]
    up: jax.Array         # [H, I]
    down: jax.Array       # [I, H]


@struct.dataclass
class MoE:
    router: jax.Array             # [H, E]
    experts: ExpertPools | None   # None in a checkpoint's dense params until pools are attached


@struct.dataclass
class SharedMoE(MoE):
    """Routed experts (router, ExpertPools) plus one always-on expert: out = routed(x) +
    sigmoid(x @ shared_gate) * shared(x). The shared expert is dense, not in the pools."""
    shared: DenseMLP          # gate/up [H, Is], down [Is, H]
    shared_gate: jax.Array    # [H, 1]


@struct.dataclass
class Params:
    embed: jax.Array                 # [V, H]
    layers: tuple                    # one family Layer per decoder layer
    final_norm: jax.Array            # [H]
    lm_head: jax.Array | None        # [H, V]; None when tied to embed


@struct.dataclass
class RouterInfo:
    """Per MoE layer (in cfg.moe_layers order): top-k expert ids int32 [B, T, k] and their softmax
    probabilities f32 [B, T, k] (before any renormalisation): what hotness is measured from."""
    ids: tuple[jax.Array, ...]
    probs: tuple[jax.Array, ...]


def params_schema(cfg: ModelConfig, layers: tuple, norm_init: str = "norm") -> Params:
    """The abstract Params around a family's abstract layers: HF embedding, final norm and head."""
    V, H = cfg.vocab_size, cfg.hidden_size
    return Params(embed=Tensor((V, H), "model.embed_tokens.weight", init="embed"), layers=layers,
                  final_norm=Tensor((H,), "model.norm.weight", init=norm_init),
                  lm_head=None if cfg.tie_word_embeddings else Tensor((H, V), HF_LM_HEAD, LINEAR))


def dense_mlp_schema(prefix: str, hidden: int, inter: int) -> DenseMLP:
    """A SwiGLU MLP under HF `prefix` (e.g. "model.layers.3.mlp."): gate_proj, up_proj, down_proj."""
    return DenseMLP(gate=Tensor((hidden, inter), prefix + "gate_proj.weight", LINEAR),
                    up=Tensor((hidden, inter), prefix + "up_proj.weight", LINEAR),
                    down=Tensor((inter, hidden), prefix + "down_proj.weight", LINEAR, "residual"))


def moe_schema(cfg: ModelConfig, prefix: str) -> MoE:
    """The router and routed experts under HF `prefix` ("model.layers.3.mlp."): gate.weight, experts.*."""
    H, E = cfg.hidden_size, cfg.num_experts
    return MoE(router=Tensor((H, E), prefix + "gate.weight", LINEAR),
               experts=Experts(E, H, cfg.moe_intermediate_size, prefix + "experts."))


def shared_moe_schema(cfg: ModelConfig, prefix: str) -> SharedMoE:
    """moe_schema plus the gated shared expert under `prefix`: shared_expert.*, shared_expert_gate."""
    routed = moe_schema(cfg, prefix)
    return SharedMoE(router=routed.router, experts=routed.experts,
                     shared=dense_mlp_schema(prefix + "shared_expert.", cfg.hidden_size,
                                             cfg.shared_expert_intermediate_size),
                     shared_gate=Tensor((cfg.hidden_size, 1), prefix + "shared_expert_gate.weight", LINEAR))


def embed(params: Params, tokens, backend: str = "xla"):
    """The embedding rows of tokens, in the residual stream's dtype (cpu_kernel.residual_dtype: f32
    for a 16-bit model on the CPU kernels, else the table's). A 16-bit table is read as uint16:
    XLA CPU gathers 16-bit floats from an f32 copy of the whole table, which it hoists out of the
    decode loop (1.2 GB held at Qwen3-30B-A3B's shapes)."""
    table = params.embed
    if table.dtype.itemsize != 2:
        return table[tokens]
    rows = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(table, jnp.uint16)[tokens], table.dtype)
    return rows.astype(residual_dtype(table.dtype, backend))


def linear(x, w, b=None):
    y = dense_matmul(x, w)
    return y if b is None else y + b


def rms_norm(x, w, eps):
    """RMSNorm as Qwen3MoeRMSNorm: normalise in f32, cast back, then scale by w."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def rms_norm_zero_centred(x, w, eps):
    """Zero-centred RMSNorm (Qwen3NextRMSNorm): normalise and scale by (1 + w) in f32, then cast."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def kv_caches(layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int, dtype):
    """Empty caches of `layers` attention layers: (one K [B*nKV, hd, S] each, one V [B*nKV, S, hd]
    each). K is position-minor: the score product q . K then runs in XLA's plain [M, K] @ [K, N]
    layout, 2-2.7x as fast at decode on the CPU as against a position-major K."""
    n = batch * num_kv_heads
    return (tuple(jnp.zeros((n, head_dim, max_len), dtype) for _ in range(layers)),
            tuple(jnp.zeros((n, max_len, head_dim), dtype) for _ in range(layers)))


def write_cache(cache_arr, new, start, *, position_minor: bool = False):
    """Write new [B, T, n, hd] into cache_arr [B*n, S, hd] ([B*n, hd, S] when position_minor: the
    K cache) at per-sequence offsets start [B]. A 16-bit cache is written as uint16: XLA CPU
    scatters 16-bit floats through an f32 copy of the whole cache (widened and narrowed again
    every decode step)."""
    B, T, n, hd = new.shape
    rows = jnp.arange(B * n)[:, None]                                     # [B*n, 1]
    cols = jnp.repeat(start, n)[:, None] + jnp.arange(T)[None, :]          # [B*n, T]
    vals = new.transpose(0, 2, 1, 3).reshape(B * n, T, hd).astype(cache_arr.dtype)
    index = (rows, slice(None), cols) if position_minor else (rows, cols)   # either way vals' [B*n, T, hd]
    if cache_arr.dtype.itemsize != 2:
        return cache_arr.at[index].set(vals)
    bits = jax.lax.bitcast_convert_type(cache_arr, jnp.uint16).at[index].set(
        jax.lax.bitcast_convert_type(vals, jnp.uint16))
    return jax.lax.bitcast_convert_type(bits, cache_arr.dtype)


def attend(q, k, v, positions, k_cache, v_cache, start, *, window: int | None = None, sinks=None,
           scale: float | None = None):
    """Write k [B, T, nKV, hd], v [B, T, nKV, hv] into the caches (K [B*nKV, hd, S], V [B*nKV, S,
    hv]: kv_caches) at start [B],
    then causal grouped-query attention of q [B, T, nH, hd] over them. Returns (out [B, T, nH*hv],
    caches). window: a query at position p sees only positions > p - window (sliding-window
    layers); sinks f32 [nH]: a per-head logit that joins the softmax's denominator and nothing
    else (gpt-oss); scale: the score scale (default hd ** -0.5).
    Both products are batched over B*nKV with the cache in its stored layout; only the small
    q and output blocks are transposed."""
    B, T, nH, hd = q.shape
    nKV, hv = k.shape[2], v.shape[3]
    k_cache = write_cache(k_cache, k, start, position_minor=True)
    v_cache = write_cache(v_cache, v, start)
    S = v_cache.shape[1]
    rep = nH // nKV
    qg = q.reshape(B, T, nKV, rep, hd).transpose(0, 2, 3, 1, 4).reshape(B * nKV, rep * T, hd)
    # Both products run in the caches' dtype (f32 accumulation): an f32 stream over 16-bit caches
    # (cpu_kernel.residual_dtype) would otherwise widen every cache position each step.
    scores = jax.lax.dot_general(qg.astype(k_cache.dtype), k_cache, (((2,), (1,)), ((0,), (0,))),
                                 preferred_element_type=jnp.float32) * (hd ** -0.5 if scale is None else scale)
    # Causal over absolute positions: query at position p sees cache slots 0..p (p-window+1..p).
    slots = jnp.arange(S)[None, None, :]
    visible = slots <= positions[:, :, None]                                           # [B, T, S]
    if window is not None:
        visible &= slots > positions[:, :, None] - window
    visible = jnp.broadcast_to(visible[:, None, None], (B, nKV, rep, T, S)).reshape(B * nKV, rep * T, S)
    scores = jnp.where(visible, scores, -jnp.inf)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:   # softmax over [scores, sink], the sink's share dropped
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, nKV, rep, 1, 1),
                                (B, nKV, rep, T, 1)).reshape(B * nKV, rep * T, 1)
        top = jnp.maximum(scores.max(-1, keepdims=True), sink)
        e = jnp.exp(scores - top)
        probs = e / (e.sum(-1, keepdims=True) + jnp.exp(sink - top))
    out = jax.lax.dot_general(probs.astype(v_cache.dtype), v_cache, (((2,), (1,)), ((0,), (0,))),
                              preferred_element_type=jnp.float32).astype(q.dtype)
    out = out.reshape(B, nKV, rep, T, hv).transpose(0, 3, 1, 2, 4).reshape(B, T, nH * hv)
    return out, k_cache, v_cache


def dense_mlp(p: DenseMLP, x):
    return linear(jax.nn.silu(linear(x, p.gate)) * linear(x, p.up), p.down)


def moe_route(p: MoE, cfg: ModelConfig, x):
    """x: [N, H] -> (top-k ids int32 [N, k], combine weights [N, k], their softmax probs f32 [N, k])."""
    return route(x, p.router, cfg.num_experts_per_tok, cfg.norm_topk_prob)


def moe_mlp(p: MoE, cfg: ModelConfig, x, backend: str, route_fn=moe_route):
    """x: [B, T, H] -> (out [B, T, H], ids [B, T, k], probs [B, T, k]). route_fn(p, cfg, x [N, H])
    -> (ids, weights, probs) is the family's router (default: moe_route)."""
    B, T, H = x.shape
    flat = x.reshape(B * T, H)
    ids, weights, probs = route_fn(p, cfg, flat)
    out = moe_experts(flat, ids, weights, p.experts, backend)
    k = cfg.num_experts_per_tok
    return out.reshape(B, T, H), ids.reshape(B, T, k), probs.reshape(B, T, k)


def shared_moe_mlp(p: SharedMoE, cfg: ModelConfig, x, backend: str):
    """x: [B, T, H] -> (routed + gated shared output [B, T, H], ids [B, T, k], probs [B, T, k])."""
    routed, ids, probs = moe_mlp(p, cfg, x, backend)
    shared = jax.nn.sigmoid(x @ p.shared_gate) * dense_mlp(p.shared, x)
    return routed + shared, ids, probs


def logits(params: Params, x, norm, logits_at: jax.Array | None = None):
    """The tail: final norm (norm(x, w)), then the head (the embedding when tied) in f32.
    x: [B, T, H] -> [B, T, V], or [B, V] at the per-sequence index logits_at [B] when given
    (prefill: only the last real token's row is normalised and projected)."""
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]
    x = norm(x, params.final_norm)
    if params.lm_head is None:                 # tied: the embedding [V, H] read as its transpose
        return dense_matmul(x, params.embed, transposed=True).astype(jnp.float32)
    return dense_matmul(x, params.lm_head).astype(jnp.float32)


@struct.dataclass
class LayerNorm:
    """nn.LayerNorm's affine parameters (Phi-3.5-MoE's norms)."""
    weight: jax.Array     # [H]
    bias: jax.Array       # [H]


def layer_norm_schema(prefix: str, hidden: int) -> LayerNorm:
    """An nn.LayerNorm under HF `prefix` (e.g. "model.layers.3.input_layernorm.")."""
    return LayerNorm(weight=Tensor((hidden,), prefix + "weight", init="norm"),
                     bias=Tensor((hidden,), prefix + "bias", init="bias"))


def layer_norm(x, p: LayerNorm, eps):
    """nn.LayerNorm over the last axis: mean and biased variance in f32, then scale and shift, cast back."""
    xf = x.astype(jnp.float32)
    xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * p.weight.astype(jnp.float32) + p.bias.astype(jnp.float32)).astype(x.dtype)

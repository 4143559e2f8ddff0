"""Qwen3-MoE (HF model_type `qwen3_moe`) as pure functions over flax.struct pytrees.

Weights are stored input-major ([in, out], y = x @ W), i.e. transposed from the HF nn.Linear
layout. Expert weights are not part of the dense parameters' layout: each MoE layer receives an
ExpertPools (pools + precision assignment) that the runtime may rebuild between decode segments.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dynaexq_jax.model.config import ModelConfig
from dynaexq_jax.model.moe import ExpertPools, moe_experts, route


@struct.dataclass
class Attention:
    q: jax.Array          # [H, nH*hd]
    k: jax.Array          # [H, nKV*hd]
    v: jax.Array          # [H, nKV*hd]
    o: jax.Array          # [nH*hd, H]
    q_norm: jax.Array     # [hd]
    k_norm: jax.Array     # [hd]
    q_bias: jax.Array | None = None
    k_bias: jax.Array | None = None
    v_bias: jax.Array | None = None
    o_bias: jax.Array | None = None


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
class Layer:
    input_norm: jax.Array  # [H]
    attn: Attention
    post_norm: jax.Array   # [H]
    mlp: DenseMLP | MoE


@struct.dataclass
class Params:
    embed: jax.Array                 # [V, H]
    layers: tuple[Layer, ...]
    final_norm: jax.Array            # [H]
    lm_head: jax.Array | None        # [H, V]; None when tied to embed


@struct.dataclass
class KVCache:
    """Preallocated KV cache. k/v: one [B*nKV, S, hd] array per layer (sequence-major, then kv
    head): attention's batched dots read it in its stored layout, with no reshape that would make
    XLA copy it to keep the in-place update; lengths: int32 [B], the number of valid positions
    of each sequence."""
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


@struct.dataclass
class RouterInfo:
    """Per MoE layer (in cfg.moe_layers order): top-k expert ids int32 [B, T, k] and their softmax
    probabilities f32 [B, T, k] (before any renormalisation): what hotness is measured from."""
    ids: tuple[jax.Array, ...]
    probs: tuple[jax.Array, ...]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (batch * cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   jnp.zeros((batch,), jnp.int32))


def rms_norm(x, w, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def rope(x, positions, theta, rotary_dim: int | None = None):
    """HF rotate-half RoPE on the first rotary_dim features of each head (default: all of them;
    partial rotary leaves the rest unchanged). x: [B, T, n, hd], positions: int32 [B, T]."""
    rd = x.shape[-1] if rotary_dim is None else rotary_dim
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, T, rd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    xr, rest = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
    out = xr * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return out if rest.shape[-1] == 0 else jnp.concatenate([out, rest], axis=-1)


def _linear(x, w, b=None):
    y = x @ w
    return y if b is None else y + b


def _write_cache(cache_arr, new, start):
    """Write new [B, T, n, hd] into cache_arr [B*n, S, hd] at per-sequence offsets start [B]."""
    B, T, n, hd = new.shape
    rows = jnp.arange(B * n)[:, None]                                     # [B*n, 1]
    cols = jnp.repeat(start, n)[:, None] + jnp.arange(T)[None, :]          # [B*n, T]
    vals = new.transpose(0, 2, 1, 3).reshape(B * n, T, hd).astype(cache_arr.dtype)
    return cache_arr.at[rows, cols].set(vals)


def attention(p: Attention, cfg: ModelConfig, x, positions, k_cache, v_cache, start):
    """x: [B, T, H]; positions: [B, T]; caches [B, S, nKV, hd]; start: int32 [B] (where x's first
    token goes). Returns (out [B, T, H], new k_cache, new v_cache)."""
    B, T, _ = x.shape
    nH, nKV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = _linear(x, p.q, p.q_bias).reshape(B, T, nH, hd)
    k = _linear(x, p.k, p.k_bias).reshape(B, T, nKV, hd)
    v = _linear(x, p.v, p.v_bias).reshape(B, T, nKV, hd)
    q = rope(rms_norm(q, p.q_norm, cfg.rms_norm_eps), positions, cfg.rope_theta)
    k = rope(rms_norm(k, p.k_norm, cfg.rms_norm_eps), positions, cfg.rope_theta)
    out, k_cache, v_cache = attend(q, k, v, positions, k_cache, v_cache, start)
    return _linear(out, p.o, p.o_bias), k_cache, v_cache


def attend(q, k, v, positions, k_cache, v_cache, start):
    """Write k, v [B, T, nKV, hd] into the caches [B*nKV, S, hd] at start [B], then causal
    grouped-query attention of q [B, T, nH, hd] over them. Returns (out [B, T, nH*hd], caches).
    Both products are batched over B*nKV with the cache in its stored layout; only the small
    q and output blocks are transposed."""
    B, T, nH, hd = q.shape
    nKV = k.shape[2]
    k_cache = _write_cache(k_cache, k, start)
    v_cache = _write_cache(v_cache, v, start)
    S = k_cache.shape[1]
    rep = nH // nKV
    qg = q.reshape(B, T, nKV, rep, hd).transpose(0, 2, 3, 1, 4).reshape(B * nKV, rep * T, hd)
    scores = jax.lax.dot_general(qg, k_cache.astype(q.dtype), (((2,), (2,)), ((0,), (0,))),
                                 preferred_element_type=jnp.float32) * (hd ** -0.5)    # [B*nKV, rep*T, S]
    # Causal over absolute positions: query at position p sees cache slots 0..p.
    visible = jnp.arange(S)[None, None, :] <= positions[:, :, None]                    # [B, T, S]
    visible = jnp.broadcast_to(visible[:, None, None], (B, nKV, rep, T, S)).reshape(B * nKV, rep * T, S)
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(q.dtype)
    out = jax.lax.dot_general(probs, v_cache.astype(q.dtype), (((2,), (1,)), ((0,), (0,))))
    out = out.reshape(B, nKV, rep, T, hd).transpose(0, 3, 1, 2, 4).reshape(B, T, nH * hd)
    return out, k_cache, v_cache


def dense_mlp(p: DenseMLP, x):
    return (jax.nn.silu(x @ p.gate) * (x @ p.up)) @ p.down


def moe_mlp(p: MoE, cfg: ModelConfig, x, backend: str):
    """x: [B, T, H] -> (out [B, T, H], ids [B, T, k], probs [B, T, k])."""
    B, T, H = x.shape
    flat = x.reshape(B * T, H)
    ids, weights, probs = route(flat, p.router, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    out = moe_experts(flat, ids, weights, p.experts, backend)
    k = cfg.num_experts_per_tok
    return out.reshape(B, T, H), ids.reshape(B, T, k), probs.reshape(B, T, k)


def forward(params: Params, cfg: ModelConfig, tokens, cache: KVCache, *, backend: str = "xla",
            logits_at: jax.Array | None = None, valid: jax.Array | None = None):
    """Run tokens [B, T] that continue each sequence at position cache.lengths[b].

    Returns (logits, new cache, RouterInfo). logits are [B, T, V] (f32), or [B, V] at the
    per-sequence index logits_at [B] when given (prefill: only the last real token's logits).
    valid int32 [B] (default T): how many of each row's tokens are real (right padding); the
    cache's lengths advance by it. Padded positions write cache slots that later tokens
    overwrite and that no real query can see (causality), so they need no other masking."""
    B, T = tokens.shape
    start = cache.lengths
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    x = params.embed[tokens]
    ks, vs, r_ids, r_probs = [], [], [], []
    for i, layer in enumerate(params.layers):
        h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
        a, kc, vc = attention(layer.attn, cfg, h, positions, cache.k[i], cache.v[i], start)
        ks.append(kc)
        vs.append(vc)
        x = x + a
        h = rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
        if isinstance(layer.mlp, MoE):
            m, ids, probs = moe_mlp(layer.mlp, cfg, h, backend)
            r_ids.append(ids)
            r_probs.append(probs)
        else:
            m = dense_mlp(layer.mlp, h)
        x = x + m
    x = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]
    head = params.embed.T if params.lm_head is None else params.lm_head
    logits = (x @ head).astype(jnp.float32)
    new_cache = KVCache(tuple(ks), tuple(vs), start + (T if valid is None else valid))
    return logits, new_cache, RouterInfo(tuple(r_ids), tuple(r_probs))

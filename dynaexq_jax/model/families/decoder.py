"""The decoder most families are: a stack of pre-norm layers, attention over a KV cache then an MLP
(routed experts, routed plus a gated shared expert, or dense), and the logits tail. Qwen3-MoE,
Mixtral, OLMoE, Qwen2-MoE, Phi-3.5-MoE and gpt-oss are this decoder with their own schema and a
few functions passed in: how attention projects q/k/v (per-head or whole-projection q/k norms,
clamps), the norm (RMSNorm or LayerNorm), the rotary table, the MLP (a family router or
activation). Qwen3-Next (linear attention) and DeepSeek (latent attention) have their own loops.
Weights are input-major ([in, out], y = x @ W).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from dynaexq_jax.model.config import ModelConfig
from dynaexq_jax.model.families.schema import LINEAR, Tensor
from dynaexq_jax.model.layers import (
    DenseMLP,
    MoE,
    Params,
    RouterInfo,
    SharedMoE,
    attend,
    dense_mlp,
    embed,
    kv_caches,
    linear,
    logits,
    moe_mlp,
    rms_norm,
    shared_moe_mlp,
)
from dynaexq_jax.model.rope import RopeTable, config_table, rope

SLIDING_ATTENTION = "sliding_attention"   # a layer_types value: this layer attends over a window


@struct.dataclass
class Attention:
    q: jax.Array          # [H, q_width*nH*hd]
    k: jax.Array          # [H, nKV*hd]
    v: jax.Array          # [H, nKV*hd]
    o: jax.Array          # [nH*hd, H]
    q_bias: jax.Array | None = None
    k_bias: jax.Array | None = None
    v_bias: jax.Array | None = None
    o_bias: jax.Array | None = None
    q_norm: jax.Array | None = None   # [hd] per head (Qwen3), or [nH*hd] over the whole projection (OLMoE)
    k_norm: jax.Array | None = None   # [hd] or [nKV*hd]
    sinks: jax.Array | None = None    # [nH] attention-sink logits (gpt-oss)


@struct.dataclass
class Layer:
    input_norm: jax.Array  # [H] (a LayerNorm for Phi-3.5-MoE)
    attn: Attention
    post_norm: jax.Array   # [H]
    mlp: DenseMLP | MoE


def attention_schema(cfg: ModelConfig, prefix: str, *, bias: tuple[str, ...] = (), qk_norm: str | None = None,
                     sinks: bool = False, q_width: int = 1, norm_init: str = "norm") -> Attention:
    """q/k/v/o under HF `prefix` ("model.layers.3.self_attn."), the biases of the projections named
    in `bias`, q/k norms per "head" or over the whole "projection", gpt-oss's sinks. q_width = 2
    when q_proj also yields a per-head output gate (Qwen3-Next's gated attention)."""
    H, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    widths = {"q": q_width * q_out, "k": kv_out, "v": kv_out, "o": H}
    proj = {x: Tensor((q_out if x == "o" else H, n), f"{prefix}{x}_proj.weight", LINEAR,
                      "residual" if x == "o" else "weight") for x, n in widths.items()}
    biases = {f"{x}_bias": Tensor((widths[x],), f"{prefix}{x}_proj.bias", init="bias") for x in bias}
    norms = {}
    if qk_norm is not None:
        q_n, k_n = (hd, hd) if qk_norm == "head" else (q_out, kv_out)
        norms = dict(q_norm=Tensor((q_n,), prefix + "q_norm.weight", init=norm_init),
                     k_norm=Tensor((k_n,), prefix + "k_norm.weight", init=norm_init))
    extra = {"sinks": Tensor((cfg.num_heads,), prefix + "sinks", init="bias")} if sinks else {}
    return Attention(**proj, **biases, **norms, **extra)


def layer_schema(cfg: ModelConfig, prefix: str, attn: Attention, mlp) -> Layer:
    """A layer with RMSNorms under HF `prefix` ("model.layers.3.")."""
    H = cfg.hidden_size
    return Layer(input_norm=Tensor((H,), prefix + "input_layernorm.weight", init="norm"), attn=attn,
                 post_norm=Tensor((H,), prefix + "post_attention_layernorm.weight", init="norm"), mlp=mlp)


@struct.dataclass
class KVCache:
    """Preallocated KV cache. k: one [B*nKV, hd, S] array per layer, v: one [B*nKV, S, hd]
    (layers.kv_caches; rows by sequence, then kv head): attention's batched dots read them in
    their stored layout, with no reshape that would make XLA copy them to keep the in-place
    update; lengths: int32 [B], the number of valid positions of each sequence."""
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return self.v[0].shape[1]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Full length for every layer, sliding-window ones included (no ring buffer yet)."""
    k, v = kv_caches(cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim, dtype)
    return KVCache(k, v, jnp.zeros((batch,), jnp.int32))


def project(p: Attention, cfg: ModelConfig, x):
    """x [B, T, H] -> q [B, T, nH, hd], k, v [B, T, nKV, hd] before RoPE: biases where present,
    then q/k RMSNorms where present, per head ([hd] weights) or over the whole projection."""
    B, T, _ = x.shape
    q, k, v = linear(x, p.q, p.q_bias), linear(x, p.k, p.k_bias), linear(x, p.v, p.v_bias)
    heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads}

    def normed(name, y, w):
        if w is None:
            return y.reshape(B, T, heads[name], cfg.head_dim)
        if w.shape[-1] == cfg.head_dim:
            return rms_norm(y.reshape(B, T, heads[name], cfg.head_dim), w, cfg.rms_norm_eps)
        return rms_norm(y, w, cfg.rms_norm_eps).reshape(B, T, heads[name], cfg.head_dim)
    return normed("q", q, p.q_norm), normed("k", k, p.k_norm), v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)


def layer_window(cfg: ModelConfig, i: int) -> int | None:
    """The sliding window layer i attends over: every layer's when the config sets one and no
    layer_types (Mixtral), the sliding_attention layers' otherwise (gpt-oss); None: full."""
    if cfg.sliding_window is None:
        return None
    if not cfg.layer_types:
        return cfg.sliding_window
    return cfg.sliding_window if cfg.layer_types[i] == SLIDING_ATTENTION else None


def attention(p: Attention, cfg: ModelConfig, x, positions, k_cache, v_cache, start, *, window: int | None,
              project=project, table: RopeTable | None = None):
    """x: [B, T, H]; positions: [B, T]; caches [B*nKV, S, hd]; start: int32 [B] (where x's first
    token goes). Returns (out [B, T, H], new k_cache, new v_cache)."""
    table = config_table(cfg) if table is None else table
    q, k, v = project(p, cfg, x)
    out, k_cache, v_cache = attend(rope(q, positions, table), rope(k, positions, table), v, positions,
                                   k_cache, v_cache, start, window=window, sinks=p.sinks)
    return linear(out, p.o, p.o_bias), k_cache, v_cache


def attention_block(layer: Layer, cfg: ModelConfig, x, positions, k_cache, v_cache, start, *, window=None,
                    project=project, norm=rms_norm, table: RopeTable | None = None):
    """A layer's first half: x + attention(norm(x)). Returns (residual x [B, T, H], the MLP's
    input h = post_norm(x) [B, T, H], new k_cache, new v_cache)."""
    a, k_cache, v_cache = attention(layer.attn, cfg, norm(x, layer.input_norm, cfg.rms_norm_eps), positions, k_cache,
                                    v_cache, start, window=window, project=project, table=table)
    x = x + a
    return x, norm(x, layer.post_norm, cfg.rms_norm_eps), k_cache, v_cache


def mlp(p, cfg: ModelConfig, h, backend: str):
    """A layer's MLP: routed experts (plus a gated shared expert, SharedMoE) or dense. h [B, T, H]
    -> (out [B, T, H], ids [B, T, k] and probs [B, T, k] of a routed layer, else None)."""
    if isinstance(p, SharedMoE):
        return shared_moe_mlp(p, cfg, h, backend)
    if isinstance(p, MoE):
        return moe_mlp(p, cfg, h, backend)
    return dense_mlp(p, h), None, None


def decode(params: Params, cfg: ModelConfig, tokens, cache: KVCache, *, backend: str = "xla",
           logits_at: jax.Array | None = None, valid: jax.Array | None = None, project=project, norm=rms_norm,
           mlp=mlp, table: RopeTable | None = None):
    """A family's forward: run tokens [B, T] that continue each sequence at position
    cache.lengths[b]. Returns (logits, new cache, RouterInfo). logits are [B, T, V] (f32), or
    [B, V] at the per-sequence index logits_at [B] when given (prefill: only the last real
    token's logits). valid int32 [B] (default T): how many of each row's tokens are real (right
    padding); the cache's lengths advance by it. Padded positions write cache slots that later
    tokens overwrite and that no real query can see (causality), so they need no other masking.
    project, norm(x, w, eps), mlp(p, cfg, h, backend) and the rotary table are the family's."""
    B, T = tokens.shape
    start = cache.lengths
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    table = config_table(cfg) if table is None else table
    x = embed(params, tokens, backend)
    ks, vs, r_ids, r_probs = [], [], [], []
    for i, layer in enumerate(params.layers):
        x, h, kc, vc = attention_block(layer, cfg, x, positions, cache.k[i], cache.v[i], start,
                                       window=layer_window(cfg, i), project=project, norm=norm, table=table)
        ks.append(kc)
        vs.append(vc)
        m, ids, probs = mlp(layer.mlp, cfg, h, backend)
        if ids is not None:
            r_ids.append(ids)
            r_probs.append(probs)
        x = x + m
    new_cache = KVCache(tuple(ks), tuple(vs), start + (T if valid is None else valid))
    return final_logits(params, cfg, x, logits_at, norm), new_cache, RouterInfo(tuple(r_ids), tuple(r_probs))


def final_logits(params: Params, cfg: ModelConfig, x, logits_at: jax.Array | None = None, norm=rms_norm):
    """x [B, T, H] after the last layer -> f32 logits (layers.logits with the family's norm)."""
    return logits(params, x, functools.partial(norm, eps=cfg.rms_norm_eps), logits_at)

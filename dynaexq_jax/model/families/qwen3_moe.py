"""Qwen3-MoE (HF model_type `qwen3_moe`) as pure functions over flax.struct pytrees.

Weights are stored input-major ([in, out], y = x @ W), i.e. transposed from the HF nn.Linear
layout. Expert weights are not part of the dense parameters' layout: each MoE layer receives an
ExpertPools (pools + precision assignment) that the runtime may rebuild between decode segments.
`abstract(cfg)` describes the parameter tree once (schema.py): HF names, shapes, transforms.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
from flax import struct

from dynaexq_jax.model.config import FULL_ATTENTION, ModelConfig
from dynaexq_jax.model.families.schema import LINEAR, Experts, Tensor
from dynaexq_jax.model.layers import (
    DenseMLP,
    MoE,
    Params,
    RouterInfo,
    attend,
    dense_mlp,
    dense_mlp_schema,
    linear,
    logits,
    moe_mlp,
    params_schema,
    rms_norm,
    rope,
)

HF_DEFAULTS: dict = {}           # config.json keys whose Qwen3MoeConfig default differs from config.py's
MIXERS = (FULL_ATTENTION,)       # the token mixers its layers use (no layer_types)
# HF tensors dropped on purpose: buffers some older exports saved, recomputed from the config.
SKIPPED = ((re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
            "rotary inv_freq buffer: recomputed from rope_theta"),)


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
class Layer:
    input_norm: jax.Array  # [H]
    attn: Attention
    post_norm: jax.Array   # [H]
    mlp: DenseMLP | MoE


def attention_schema(cfg: ModelConfig, prefix: str, q_width: int = 1, norm_init: str = "norm") -> Attention:
    """q/k/v/o (+ biases) and the per-head q/k norms under HF `prefix` ("model.layers.3.self_attn.").
    q_width = 2 when q_proj also yields a per-head output gate (Qwen3-Next's gated attention)."""
    H, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    widths = {"q": q_width * q_out, "k": kv_out, "v": kv_out, "o": H}
    proj = {x: Tensor((q_out if x == "o" else H, n), f"{prefix}{x}_proj.weight", LINEAR,
                      "residual" if x == "o" else "weight") for x, n in widths.items()}
    bias = {f"{x}_bias": Tensor((n,), f"{prefix}{x}_proj.bias", init="bias")
            for x, n in widths.items()} if cfg.attention_bias else {}
    return Attention(**proj, **bias, q_norm=Tensor((hd,), prefix + "q_norm.weight", init=norm_init),
                     k_norm=Tensor((hd,), prefix + "k_norm.weight", init=norm_init))


def moe_schema(cfg: ModelConfig, prefix: str) -> MoE:
    """The router and routed experts under HF `prefix` ("model.layers.3.mlp.")."""
    H, E = cfg.hidden_size, cfg.num_experts
    return MoE(router=Tensor((H, E), prefix + "gate.weight", LINEAR),
               experts=Experts(E, H, cfg.moe_intermediate_size, prefix + "experts."))


def abstract(cfg: ModelConfig) -> Params:
    """The parameter tree with schema leaves (see schema.py)."""
    H = cfg.hidden_size
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        mlp = moe_schema(cfg, p + "mlp.") if cfg.is_moe_layer(i) else dense_mlp_schema(p + "mlp.", H,
                                                                                        cfg.intermediate_size)
        layers.append(Layer(input_norm=Tensor((H,), p + "input_layernorm.weight", init="norm"),
                            attn=attention_schema(cfg, p + "self_attn."),
                            post_norm=Tensor((H,), p + "post_attention_layernorm.weight", init="norm"), mlp=mlp))
    return params_schema(cfg, tuple(layers))


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


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (batch * cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   jnp.zeros((batch,), jnp.int32))


def attention(p: Attention, cfg: ModelConfig, x, positions, k_cache, v_cache, start):
    """x: [B, T, H]; positions: [B, T]; caches [B*nKV, S, hd]; start: int32 [B] (where x's first
    token goes). Returns (out [B, T, H], new k_cache, new v_cache)."""
    B, T, _ = x.shape
    nH, nKV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = linear(x, p.q, p.q_bias).reshape(B, T, nH, hd)
    k = linear(x, p.k, p.k_bias).reshape(B, T, nKV, hd)
    v = linear(x, p.v, p.v_bias).reshape(B, T, nKV, hd)
    q = rope(rms_norm(q, p.q_norm, cfg.rms_norm_eps), positions, cfg.rope_theta)
    k = rope(rms_norm(k, p.k_norm, cfg.rms_norm_eps), positions, cfg.rope_theta)
    out, k_cache, v_cache = attend(q, k, v, positions, k_cache, v_cache, start)
    return linear(out, p.o, p.o_bias), k_cache, v_cache


def attention_block(layer: Layer, cfg: ModelConfig, x, positions, k_cache, v_cache, start):
    """A layer's first half: x + attention(norm(x)). Returns (residual x [B, T, H], the MLP's
    input h = post_norm(x) [B, T, H], caches)."""
    a, k_cache, v_cache = attention(layer.attn, cfg, rms_norm(x, layer.input_norm, cfg.rms_norm_eps), positions,
                                    k_cache, v_cache, start)
    x = x + a
    return x, rms_norm(x, layer.post_norm, cfg.rms_norm_eps), k_cache, v_cache


def final_logits(params: Params, cfg: ModelConfig, x, logits_at: jax.Array | None = None):
    """x [B, T, H] after the last layer -> f32 logits (layers.logits with this family's norm)."""
    return logits(params, x, functools.partial(rms_norm, eps=cfg.rms_norm_eps), logits_at)


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
        x, h, kc, vc = attention_block(layer, cfg, x, positions, cache.k[i], cache.v[i], start)
        ks.append(kc)
        vs.append(vc)
        if isinstance(layer.mlp, MoE):
            m, ids, probs = moe_mlp(layer.mlp, cfg, h, backend)
            r_ids.append(ids)
            r_probs.append(probs)
        else:
            m = dense_mlp(layer.mlp, h)
        x = x + m
    new_cache = KVCache(tuple(ks), tuple(vs), start + (T if valid is None else valid))
    return final_logits(params, cfg, x, logits_at), new_cache, RouterInfo(tuple(r_ids), tuple(r_probs))

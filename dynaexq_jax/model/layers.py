"""Decoder pieces every family shares: the parameter tree's outer shape (Params), linear layers,
RMSNorm, RoPE, the attention core over the KV cache, the dense SwiGLU MLP, the routed-expert MLP
and the logits tail. Weights are input-major ([in, out], y = x @ W)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dynaexq_jax.model.config import ModelConfig
from dynaexq_jax.model.families.schema import LINEAR, Tensor
from dynaexq_jax.model.moe import ExpertPools, moe_experts, route

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


def linear(x, w, b=None):
    y = x @ w
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


def write_cache(cache_arr, new, start):
    """Write new [B, T, n, hd] into cache_arr [B*n, S, hd] at per-sequence offsets start [B]."""
    B, T, n, hd = new.shape
    rows = jnp.arange(B * n)[:, None]                                     # [B*n, 1]
    cols = jnp.repeat(start, n)[:, None] + jnp.arange(T)[None, :]          # [B*n, T]
    vals = new.transpose(0, 2, 1, 3).reshape(B * n, T, hd).astype(cache_arr.dtype)
    return cache_arr.at[rows, cols].set(vals)


def attend(q, k, v, positions, k_cache, v_cache, start):
    """Write k, v [B, T, nKV, hd] into the caches [B*nKV, S, hd] at start [B], then causal
    grouped-query attention of q [B, T, nH, hd] over them. Returns (out [B, T, nH*hd], caches).
    Both products are batched over B*nKV with the cache in its stored layout; only the small
    q and output blocks are transposed."""
    B, T, nH, hd = q.shape
    nKV = k.shape[2]
    k_cache = write_cache(k_cache, k, start)
    v_cache = write_cache(v_cache, v, start)
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


def moe_route(p: MoE, cfg: ModelConfig, x):
    """x: [N, H] -> (top-k ids int32 [N, k], combine weights [N, k], their softmax probs f32 [N, k])."""
    return route(x, p.router, cfg.num_experts_per_tok, cfg.norm_topk_prob)


def moe_mlp(p: MoE, cfg: ModelConfig, x, backend: str):
    """x: [B, T, H] -> (out [B, T, H], ids [B, T, k], probs [B, T, k])."""
    B, T, H = x.shape
    flat = x.reshape(B * T, H)
    ids, weights, probs = moe_route(p, cfg, flat)
    out = moe_experts(flat, ids, weights, p.experts, backend)
    k = cfg.num_experts_per_tok
    return out.reshape(B, T, H), ids.reshape(B, T, k), probs.reshape(B, T, k)


def logits(params: Params, x, norm, logits_at: jax.Array | None = None):
    """The tail: final norm (norm(x, w)), then the head (the embedding when tied) in f32.
    x: [B, T, H] -> [B, T, V], or [B, V] at the per-sequence index logits_at [B] when given
    (prefill: only the last real token's row is normalised and projected)."""
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]
    x = norm(x, params.final_norm)
    head = params.embed.T if params.lm_head is None else params.lm_head
    return (x @ head).astype(jnp.float32)

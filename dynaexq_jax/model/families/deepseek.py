"""DeepSeek-V2 and DeepSeek-V3 (HF model_types `deepseek_v2`, `deepseek_v3`) as pure functions over
flax.struct pytrees; deepseek_v2.py and deepseek_v3.py are their registry modules (each with its
config class's defaults) around this one implementation.

Multi-head latent attention (MLA): each position is cached as its compressed latent (kv_lora_rank,
after kv_a_layernorm) and one rope key shared by all heads (qk_rope_head_dim), never as per-head
keys and values. Attention runs in the absorbed form: a query's no-rope part goes through kv_b_proj's
key half into latent space, so scores are taken against the latent itself, and the probabilities
average latents that kv_b_proj's value half then expands per head. The MLP of the first
first_k_dense_replace layers is dense; the others route to experts (V2: softmax scores, greedy or
group-limited greedy; V3 `noaux_tc`: sigmoid scores, a selection-only bias, group-limited top-k)
and add always-on shared experts, a dense SwiGLU on the dense path (never in the tier pools).
Weights are input-major ([in, out]); `abstract(cfg)` describes the parameter tree once (schema.py).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from dynaexq_jax.errors import ConfigError, UnsupportedArchitectureError
from dynaexq_jax.model.config import FULL_ATTENTION, ModelConfig
from dynaexq_jax.model.families import decoder
from dynaexq_jax.model.families.schema import LINEAR, Experts, Tensor
from dynaexq_jax.model.layers import (
    DenseMLP,
    MoE,
    Params,
    RouterInfo,
    dense_mlp,
    dense_mlp_schema,
    embed,
    linear,
    moe_mlp,
    params_schema,
    rms_norm,
    write_cache,
)
from dynaexq_jax.model.rope import config_table, rope, rope_interleaved

MIXERS = (FULL_ATTENTION,)
SCORING = {"deepseek_v2": "softmax", "deepseek_v3": "sigmoid"}


@dataclasses.dataclass(frozen=True)
class Config(ModelConfig):
    """DeepSeek's own options, named as in DeepseekV2Config / DeepseekV3Config."""
    q_lora_rank: int | None = None    # None: q_proj straight from the hidden state (V2-Lite)
    kv_lora_rank: int = 0             # the cached latent's width
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0         # the shared rope key's width (also head_dim, as in transformers)
    v_head_dim: int = 0
    n_shared_experts: int = 0
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"       # V2: greedy or group_limited_greedy; V3: noaux_tc
    n_group: int = 1
    topk_group: int = 1
    rope_interleave: bool = True      # V2 always rotates interleaved pairs

    @property
    def softmax_scale(self) -> float:
        """transformers' scaling: qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) ** 2
        when the rope scaling sets mscale_all_dim (yarn_apply_mscale)."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        p = dict(self.rope_scaling)
        m, factor = p.get("mscale_all_dim"), p.get("factor")
        if m and factor > 1:
            scale *= (0.1 * m * math.log(factor) + 1.0) ** 2
        return scale


def config_fields(d: dict) -> dict:
    """DeepSeek's options from the HF config dict (class defaults merged in). It also fills in the
    generic keys parse_hf_config reads after this call, which DeepSeek spells its own way:
    num_experts (n_routed_experts), the dense first layers (first_k_dense_replace, as
    mlp_only_layers), head_dim (qk_rope_head_dim, as transformers sets it) and the shared experts'
    width (n_shared_experts * moe_intermediate_size). Options transformers 5.24 ignores but the
    original DeepSeek code honours are errors, not silently different models."""
    model_type = d["model_type"]
    unsupported = [(d.get("moe_layer_freq", 1) != 1, f"moe_layer_freq={d.get('moe_layer_freq')}"),
                   (bool(d.get("mlp_bias")), "mlp_bias=true"),
                   (d.get("hidden_act", "silu") != "silu", f"hidden_act={d.get('hidden_act')!r}"),
                   (d.get("scoring_func", SCORING[model_type]) != SCORING[model_type],
                    f"scoring_func={d.get('scoring_func')!r} for {model_type}"),
                   (model_type == "deepseek_v2" and bool(d.get("norm_topk_prob")),
                    "norm_topk_prob=true for deepseek_v2 (transformers' V2 router never renormalises)")]
    for bad, what in unsupported:
        if bad:
            raise UnsupportedArchitectureError(f"{what} is not supported ({model_type})")
    if model_type == "deepseek_v3":      # transformers' V3 router is noaux_tc whatever the config says
        topk_method = "noaux_tc"
        ok = d.get("topk_method", topk_method) == topk_method
    else:
        topk_method = d.get("topk_method", "greedy")
        ok = topk_method in ("greedy", "group_limited_greedy")
    if not ok:
        raise UnsupportedArchitectureError(f"topk_method {d.get('topk_method')!r} is not supported for {model_type}")
    n_shared = int(d.get("n_shared_experts") or 0)
    if n_shared < 1:
        raise UnsupportedArchitectureError(f"n_shared_experts={n_shared}: a model without shared experts")
    d.update(num_experts=int(d["n_routed_experts"]), decoder_sparse_step=1,
             mlp_only_layers=list(range(int(d.get("first_k_dense_replace", 0)))),
             head_dim=int(d["qk_rope_head_dim"]),
             shared_expert_intermediate_size=n_shared * int(d["moe_intermediate_size"]))
    # parse_hf_config drops null values: an omitted q_lora_rank reads as null (no q LoRA).
    q_lora = d.get("q_lora_rank")
    return dict(q_lora_rank=None if q_lora is None else int(q_lora), kv_lora_rank=int(d["kv_lora_rank"]),
                qk_nope_head_dim=int(d["qk_nope_head_dim"]), qk_rope_head_dim=int(d["qk_rope_head_dim"]),
                v_head_dim=int(d["v_head_dim"]), n_shared_experts=n_shared,
                routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)), topk_method=topk_method,
                n_group=int(d.get("n_group") or 1), topk_group=int(d.get("topk_group") or 1),
                rope_interleave=model_type == "deepseek_v2" or bool(d.get("rope_interleave", True)))


def validate(cfg: Config) -> None:
    dims = dict(kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, num_experts=cfg.num_experts)
    for name, v in dims.items():
        if v <= 0:
            raise ConfigError(f"{name}={v} must be positive")
    if cfg.q_lora_rank is not None and cfg.q_lora_rank <= 0:
        raise ConfigError(f"q_lora_rank={cfg.q_lora_rank} must be positive (or null: no q LoRA)")
    if cfg.num_kv_heads != cfg.num_heads:
        raise ConfigError(f"num_key_value_heads={cfg.num_kv_heads} must equal num_attention_heads={cfg.num_heads}: "
                          "multi-head latent attention expands its own key and value for every head")
    p = dict(cfg.rope_scaling)
    if p.get("mscale_all_dim") and p.get("factor") is None:
        raise ConfigError("rope_scaling.mscale_all_dim needs rope_scaling.factor (the softmax scale's mscale)")
    if cfg.topk_method != "greedy":
        E, G = cfg.num_experts, cfg.n_group
        per_group = 2 if cfg.topk_method == "noaux_tc" else 1     # noaux_tc ranks groups by their top-2
        if E % G or E // G < per_group or not 1 <= cfg.topk_group <= G:
            raise ConfigError(f"{cfg.topk_method}: n_group={G}, topk_group={cfg.topk_group} do not fit "
                              f"{E} experts (groups of at least {per_group}, topk_group in 1..n_group)")
        if cfg.topk_group * (E // G) < cfg.num_experts_per_tok:
            raise ConfigError(f"{cfg.topk_method}: topk_group={cfg.topk_group} groups of {E // G} experts hold fewer "
                              f"than num_experts_per_tok={cfg.num_experts_per_tok}")


@struct.dataclass
class MLA:
    """Exactly one of q (no q LoRA) / q_a, q_a_norm, q_b is set. Per head, queries are
    [nope dn | rope dr] and kv_b's outputs [key dn | value dv]."""
    q: jax.Array | None           # [H, nH*(dn+dr)]
    q_a: jax.Array | None         # [H, rq]
    q_a_norm: jax.Array | None    # [rq]
    q_b: jax.Array | None         # [rq, nH*(dn+dr)]
    kv_a: jax.Array               # [H, r+dr]: the latent, then the shared rope key
    kv_a_norm: jax.Array          # [r]
    kv_b: jax.Array               # [r, nH*(dn+dv)]
    o: jax.Array                  # [nH*dv, H]
    q_a_bias: jax.Array | None = None
    kv_a_bias: jax.Array | None = None
    o_bias: jax.Array | None = None


@struct.dataclass
class DeepseekMoE(MoE):
    """Routed experts (router, ExpertPools) plus the always-on shared experts, one dense SwiGLU of
    width n_shared_experts * moe_intermediate_size: out = routed(x) + shared(x)."""
    shared: DenseMLP
    score_bias: jax.Array | None   # [E] V3's e_score_correction_bias: added for selection only; None in V2


@struct.dataclass
class Layer:
    input_norm: jax.Array   # [H]
    attn: MLA
    post_norm: jax.Array    # [H]
    mlp: DenseMLP | DeepseekMoE


def _mla_schema(cfg: Config, prefix: str) -> MLA:
    H, nH, r = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank
    q_out = nH * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    rq = cfg.q_lora_rank

    def w(shape, name, init="weight"):
        return Tensor(shape, prefix + name + ".weight", LINEAR, init)
    bias = {}
    if cfg.attention_bias:
        bias = {f"{x}_bias": Tensor((n,), f"{prefix}{name}.bias", init="bias")
                for x, name, n in (("q_a", "q_a_proj", rq), ("kv_a", "kv_a_proj_with_mqa", r + cfg.qk_rope_head_dim),
                                   ("o", "o_proj", H)) if n is not None}
    return MLA(q=w((H, q_out), "q_proj") if rq is None else None,
               q_a=None if rq is None else w((H, rq), "q_a_proj"),
               q_a_norm=None if rq is None else Tensor((rq,), prefix + "q_a_layernorm.weight", init="norm"),
               q_b=None if rq is None else w((rq, q_out), "q_b_proj"),
               kv_a=w((H, r + cfg.qk_rope_head_dim), "kv_a_proj_with_mqa"),
               kv_a_norm=Tensor((r,), prefix + "kv_a_layernorm.weight", init="norm"),
               kv_b=w((r, nH * (cfg.qk_nope_head_dim + cfg.v_head_dim)), "kv_b_proj"),
               o=w((nH * cfg.v_head_dim, H), "o_proj", "residual"), **bias)


def _moe_schema(cfg: Config, prefix: str) -> DeepseekMoE:
    H, E = cfg.hidden_size, cfg.num_experts
    return DeepseekMoE(router=Tensor((H, E), prefix + "gate.weight", LINEAR),
                       experts=Experts(E, H, cfg.moe_intermediate_size, prefix + "experts."),
                       shared=dense_mlp_schema(prefix + "shared_experts.", H, cfg.shared_expert_intermediate_size),
                       score_bias=Tensor((E,), prefix + "gate.e_score_correction_bias", init="bias")
                       if cfg.topk_method == "noaux_tc" else None)


def abstract(cfg: Config) -> Params:
    """The parameter tree with schema leaves (see schema.py)."""
    H = cfg.hidden_size
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        mlp = _moe_schema(cfg, p + "mlp.") if cfg.is_moe_layer(i) else dense_mlp_schema(p + "mlp.", H,
                                                                                         cfg.intermediate_size)
        layers.append(Layer(input_norm=Tensor((H,), p + "input_layernorm.weight", init="norm"),
                            attn=_mla_schema(cfg, p + "self_attn."),
                            post_norm=Tensor((H,), p + "post_attention_layernorm.weight", init="norm"), mlp=mlp))
    return params_schema(cfg, tuple(layers))


@struct.dataclass
class LatentCache:
    """The MLA cache: per layer one [B, S, kv_lora_rank + qk_rope_head_dim] array, each position's
    normalised latent then its rotated shared rope key (one array: the scores are one product over
    both, and the values' product reads it whole, dropping the rope part after); lengths int32 [B]."""
    kv: tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


def init_cache(cfg: Config, batch: int, max_len: int, dtype=jnp.float32) -> LatentCache:
    shape = (batch, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return LatentCache(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)), jnp.zeros((batch,), jnp.int32))


def attention(p: MLA, cfg: Config, x, positions, cache, start):
    """x: [B, T, H]; positions: [B, T]; cache [B, S, r+dr]; start int32 [B] (where x's first token
    goes). Returns (out [B, T, H], new cache)."""
    B, T, _ = x.shape
    nH, dn, dr, dv, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    eps = cfg.rms_norm_eps
    q = linear(x, p.q) if p.q_a is None else linear(rms_norm(linear(x, p.q_a, p.q_a_bias), p.q_a_norm, eps), p.q_b)
    q = q.reshape(B, T, nH, dn + dr)
    kv = linear(x, p.kv_a, p.kv_a_bias)
    rotate, table = (rope_interleaved if cfg.rope_interleave else rope), config_table(cfg)
    k_pe = rotate(kv[..., None, r:], positions, table)[:, :, 0]
    kv = jnp.concatenate([rms_norm(kv[..., :r], p.kv_a_norm, eps), k_pe], axis=-1)
    cache = write_cache(cache, kv[:, :, None], start)
    w = p.kv_b.reshape(r, nH, dn + dv)
    # q_nope . (c @ W_k) = (W_k q_nope) . c: the no-rope scores are taken against the latent c itself.
    # The products against stored 16-bit tensors (kv_b, the latent cache) run in their dtype with
    # f32 accumulation: an f32 stream (cpu_kernel.residual_dtype) would widen them every step.
    q = jnp.concatenate([jnp.einsum("bthd,rhd->bthr", q[..., :dn].astype(w.dtype), w[..., :dn],
                                    preferred_element_type=jnp.float32).astype(x.dtype),
                         rotate(q[..., dn:], positions, table)], axis=-1).reshape(B, T * nH, r + dr)
    c = cache
    scores = jax.lax.dot_general(q.astype(c.dtype), c, (((2,), (2,)), ((0,), (0,))),
                                 preferred_element_type=jnp.float32)
    S = c.shape[1]
    # Causal over absolute positions. Masked and normalised in the exact shape XLA gives the scores
    # (it drops a batch axis of one), so that it updates them in place instead of copying them.
    shape = (T * nH, S) if B == 1 else (B, T * nH, S)
    visible = jnp.arange(S)[None, None, None, :] <= positions[:, :, None, None]         # [B, T, 1, S]
    visible = jnp.broadcast_to(visible, (B, T, nH, S)).reshape(shape)
    probs = jax.nn.softmax(jnp.where(visible, scores.reshape(shape) * cfg.softmax_scale, -jnp.inf), axis=-1)
    probs = probs.astype(c.dtype).reshape(B, T * nH, S)
    out = jax.lax.dot_general(probs, c, (((2,), (1,)), ((0,), (0,))))[..., :r]          # [B, T*nH, r]
    out = jnp.einsum("bthr,rhv->bthv", out.reshape(B, T, nH, r).astype(w.dtype), w[..., dn:],
                     preferred_element_type=jnp.float32).astype(x.dtype).reshape(B, T, nH * dv)
    return linear(out, p.o, p.o_bias), cache


def _group_mask(group_scores, topk_group: int, num_experts: int):
    """bool [N, E]: the experts of each token's topk_group best groups (group_scores [N, G])."""
    _, top = jax.lax.top_k(group_scores, topk_group)
    chosen = jax.nn.one_hot(top, group_scores.shape[-1], dtype=jnp.bool_).any(axis=1)   # [N, G]
    return jnp.repeat(chosen, num_experts // group_scores.shape[-1], axis=1)


def route(p: DeepseekMoE, cfg: Config, x):
    """transformers' DeepseekV2TopkRouter / DeepseekV3TopkRouter, in f32 as there. x: [N, H] ->
    (ids int32 [N, k], weights [N, k] in x.dtype, the selected experts' scores f32 [N, k], unbiased
    and before any renormalisation: what hotness is measured from)."""
    E, G, k = cfg.num_experts, cfg.n_group, cfg.num_experts_per_tok
    logits = x.astype(jnp.float32) @ p.router.astype(jnp.float32)
    if cfg.topk_method == "noaux_tc":
        scores = jax.nn.sigmoid(logits)
        choice = scores + p.score_bias.astype(jnp.float32)
        groups = jax.lax.top_k(choice.reshape(-1, G, E // G), 2)[0].sum(-1)            # a group: its top-2 sum
        _, ids = jax.lax.top_k(jnp.where(_group_mask(groups, cfg.topk_group, E), choice, -jnp.inf), k)
        top = jnp.take_along_axis(scores, ids, axis=-1)
        w = top / (top.sum(-1, keepdims=True) + 1e-20) if cfg.norm_topk_prob else top
    else:
        scores = jax.nn.softmax(logits, axis=-1)
        if cfg.topk_method == "group_limited_greedy":                                 # a group: its best expert
            scores = jnp.where(_group_mask(scores.reshape(-1, G, E // G).max(-1), cfg.topk_group, E), scores, 0.0)
        top, ids = jax.lax.top_k(scores, k)
        w = top
    return ids.astype(jnp.int32), (w * cfg.routed_scaling_factor).astype(x.dtype), top


def forward(params: Params, cfg: Config, tokens, cache: LatentCache, *, backend: str = "xla",
            logits_at: jax.Array | None = None, valid: jax.Array | None = None):
    """Run tokens [B, T] that continue each sequence at position cache.lengths[b]; the same contract
    as qwen3_moe.forward (padded positions write latent slots no real query sees)."""
    B, T = tokens.shape
    start = cache.lengths
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    eps = cfg.rms_norm_eps
    x = embed(params, tokens, backend)
    caches, r_ids, r_probs = [], [], []
    for i, layer in enumerate(params.layers):
        a, c = attention(layer.attn, cfg, rms_norm(x, layer.input_norm, eps), positions, cache.kv[i], start)
        caches.append(c)
        x = x + a
        h = rms_norm(x, layer.post_norm, eps)
        if isinstance(layer.mlp, DeepseekMoE):
            m, ids, probs = moe_mlp(layer.mlp, cfg, h, backend, route_fn=route)
            m = m + dense_mlp(layer.mlp.shared, h)
            r_ids.append(ids)
            r_probs.append(probs)
        else:
            m = dense_mlp(layer.mlp, h)
        x = x + m
    new_cache = LatentCache(tuple(caches), start + (T if valid is None else valid))
    return decoder.final_logits(params, cfg, x, logits_at), new_cache, RouterInfo(tuple(r_ids), tuple(r_probs))


def attention_workspace_bytes(cfg: Config, B: int, C: int, S: int, item: int, widen: bool) -> int:
    """An MLA layer on C new tokens per row over a latent cache of S positions (attention above), for
    runtime/budget.py: the projections (q, the latent and rope key, before and after norm and RoPE),
    the absorbed queries and the latent output of every head, the two halves of kv_b sliced out, the
    scores f32 [B, C, nH, S] and the probabilities: in the activation dtype when 16-bit, written over
    the scores when f32 except for one token a row (decode), where XLA keeps them apart; on the CPU
    with a 16-bit model (widen), the probabilities again (f32 and 16-bit) for the value product
    and the cache's bits copied around its write (layers.write_cache)."""
    nH, dn, dr, dv, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    N, rq = B * C, cfg.q_lora_rank or 0
    probs = (item if item < 4 else 4 if C == 1 else 0) + (4 if widen else 0)
    acts = N * (2 * rq + 2 * nH * (dn + dr) + 2 * (r + dr) + nH * (2 * r + dr + dv)) + r * nH * (dn + dv)
    return acts * item + B * nH * C * S * (4 + probs) + (B * S * (r + dr) * 2 if widen else 0)

"""OLMoE (HF model_type `olmoe`) on the decoder of decoder.py: every layer routes top-k of a
softmax over its experts (64, top-8 in OLMoE-1B-7B), renormalised only when norm_topk_prob (off by
default); attention RMS-normalises q and k over the whole projection (q_norm [nH*hd], k_norm
[nKV*hd], before the heads are split and RoPE'd) and clamps q, k and v to +-clip_qkv when set.
Expert names are Qwen's (`mlp.experts.{e}.gate_proj.weight`, fused `mlp.experts.gate_up_proj`).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dynaexq_jax.errors import ConfigError
from dynaexq_jax.model.config import FULL_ATTENTION, ModelConfig
from dynaexq_jax.model.families import decoder, qwen3_moe
from dynaexq_jax.model.families.decoder import Attention, KVCache, attention_schema, layer_schema
from dynaexq_jax.model.layers import Params, moe_schema, params_schema

# OlmoeConfig's defaults where config.py's generic ones differ (or it has none).
HF_DEFAULTS = dict(vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16,
                   num_attention_heads=16, num_experts=64, num_experts_per_tok=8, rms_norm_eps=1e-5,
                   rope_theta=10000.0, max_position_embeddings=4096, eos_token_id=50279)
MIXERS = (FULL_ATTENTION,)
SKIPPED = qwen3_moe.SKIPPED
init_cache = decoder.init_cache


@dataclasses.dataclass(frozen=True)
class Config(ModelConfig):
    clip_qkv: float | None = None     # q, k and v are clamped to [-clip_qkv, clip_qkv]


def config_fields(d: dict) -> dict:
    """OLMoE's experts are `intermediate_size` wide (it has no moe_intermediate_size): set in d,
    which the generic parser reads after this hook."""
    d["moe_intermediate_size"] = d["intermediate_size"]
    clip = d.get("clip_qkv")
    if clip is not None and not float(clip) > 0:
        raise ConfigError(f"clip_qkv={clip} must be null or positive")
    return {"clip_qkv": None if clip is None else float(clip)}


def validate(cfg: Config) -> None:
    # OlmoeAttention sizes q_norm hidden_size wide: a head_dim that does not split it cannot load.
    if cfg.num_heads * cfg.head_dim != cfg.hidden_size:
        raise ConfigError(f"head_dim={cfg.head_dim} x num_attention_heads={cfg.num_heads} must equal "
                          f"hidden_size={cfg.hidden_size} (OLMoE's q_norm spans the whole projection)")


def abstract(cfg: Config) -> Params:
    """The parameter tree with schema leaves (see schema.py): every layer is an MoE layer."""
    bias = ("q", "k", "v", "o") if cfg.attention_bias else ()
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layers.append(layer_schema(cfg, p, attention_schema(cfg, p + "self_attn.", bias=bias, qk_norm="projection"),
                                   moe_schema(cfg, p + "mlp.")))
    return params_schema(cfg, tuple(layers))


def project(p: Attention, cfg: Config, x):
    """q, k, v before RoPE: the projections, q and k RMS-normalised over all their heads, then
    all three clamped to +-clip_qkv (OlmoeAttention's order)."""
    q, k, v = decoder.project(p, cfg, x)
    if cfg.clip_qkv is not None:
        q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
    return q, k, v


def forward(params: Params, cfg: Config, tokens, cache: KVCache, *, backend: str = "xla", logits_at=None,
            valid=None):
    """decoder.decode's contract: (logits, new cache, RouterInfo)."""
    return decoder.decode(params, cfg, tokens, cache, backend=backend, logits_at=logits_at, valid=valid,
                          project=project)

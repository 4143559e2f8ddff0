"""Qwen2-MoE (HF model_type `qwen2_moe`: Qwen1.5-MoE, Qwen2-57B-A14B) on the decoder of
decoder.py: q/k/v with biases (qkv_bias, o without), no q/k norms; each MoE layer routes top-k
of a softmax (renormalised only when norm_topk_prob) and adds a shared expert gated by a sigmoid
(layers.SharedMoE: the shared expert stays dense, outside the tier pools); mlp_only_layers
and decoder_sparse_step make the other layers dense MLPs. Expert names are Qwen's.

Sliding-window attention (use_sliding_window=true, with max_window_layers) is not supported: the
generic config parser rejects it, and a layer_types naming sliding layers is rejected here.
"""
from __future__ import annotations

import dataclasses

from dynaexq_jax.errors import UnsupportedArchitectureError
from dynaexq_jax.model.config import FULL_ATTENTION, ModelConfig
from dynaexq_jax.model.families import decoder, qwen3_moe
from dynaexq_jax.model.families.decoder import KVCache, attention_schema, layer_schema
from dynaexq_jax.model.layers import Params, dense_mlp_schema, params_schema, shared_moe_schema

# Qwen2MoeConfig's defaults where config.py's generic ones differ (or it has none).
HF_DEFAULTS = dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                   num_attention_heads=16, num_key_value_heads=16, moe_intermediate_size=1408,
                   shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
                   rope_theta=10000.0, qkv_bias=True)
MIXERS = (FULL_ATTENTION,)
SKIPPED = qwen3_moe.SKIPPED
init_cache = decoder.init_cache


@dataclasses.dataclass(frozen=True)
class Config(ModelConfig):
    qkv_bias: bool = True     # q/k/v projections carry biases (o_proj never does)


def config_fields(d: dict) -> dict:
    sliding = sorted({t for t in d.get("layer_types") or () if t != FULL_ATTENTION})
    if sliding:
        raise UnsupportedArchitectureError(f"layer_types {sliding} are not supported (only {FULL_ATTENTION})")
    return {"qkv_bias": bool(d["qkv_bias"])}


def abstract(cfg: Config) -> Params:
    """The parameter tree with schema leaves (see schema.py)."""
    H = cfg.hidden_size
    bias = ("q", "k", "v") if cfg.qkv_bias else ()
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        mlp = shared_moe_schema(cfg, p + "mlp.") if cfg.is_moe_layer(i) else dense_mlp_schema(p + "mlp.", H,
                                                                                              cfg.intermediate_size)
        layers.append(layer_schema(cfg, p, attention_schema(cfg, p + "self_attn.", bias=bias), mlp))
    return params_schema(cfg, tuple(layers))


def forward(params: Params, cfg: Config, tokens, cache: KVCache, *, backend: str = "xla", logits_at=None,
            valid=None):
    """decoder.decode's contract: (logits, new cache, RouterInfo)."""
    return decoder.decode(params, cfg, tokens, cache, backend=backend, logits_at=logits_at, valid=valid)

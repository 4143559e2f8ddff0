"""Qwen3-MoE (HF model_type `qwen3_moe`): the decoder of decoder.py with per-head q/k RMSNorms.

Weights are stored input-major ([in, out], y = x @ W), i.e. transposed from the HF nn.Linear
layout. Expert weights are not part of the dense parameters' layout: each MoE layer receives an
ExpertPools (pools + precision assignment) that the runtime may rebuild between decode segments.
`abstract(cfg)` describes the parameter tree once (schema.py): HF names, shapes, transforms.
"""
from __future__ import annotations

import re

from dynaexq_jax.model.config import FULL_ATTENTION, ModelConfig
from dynaexq_jax.model.families import decoder
from dynaexq_jax.model.families.decoder import KVCache, attention_schema, layer_schema
from dynaexq_jax.model.layers import Params, dense_mlp_schema, moe_schema, params_schema

HF_DEFAULTS: dict = {}           # config.json keys whose Qwen3MoeConfig default differs from config.py's
MIXERS = (FULL_ATTENTION,)       # the token mixers its layers use (no layer_types)
# HF tensors dropped on purpose: buffers some older exports saved, recomputed from the config.
SKIPPED = ((re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
            "rotary inv_freq buffer: recomputed from rope_theta"),)
init_cache = decoder.init_cache


def abstract(cfg: ModelConfig) -> Params:
    """The parameter tree with schema leaves (see schema.py)."""
    bias = ("q", "k", "v", "o") if cfg.attention_bias else ()
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        mlp = moe_schema(cfg, p + "mlp.") if cfg.is_moe_layer(i) else dense_mlp_schema(p + "mlp.", cfg.hidden_size,
                                                                                       cfg.intermediate_size)
        layers.append(layer_schema(cfg, p, attention_schema(cfg, p + "self_attn.", bias=bias, qk_norm="head"), mlp))
    return params_schema(cfg, tuple(layers))


def forward(params: Params, cfg: ModelConfig, tokens, cache: KVCache, *, backend: str = "xla",
            logits_at=None, valid=None):
    """decoder.decode's contract: (logits, new cache, RouterInfo)."""
    return decoder.decode(params, cfg, tokens, cache, backend=backend, logits_at=logits_at, valid=valid)

"""Mixtral (HF model_type `mixtral`): the decoder of decoder.py (no q/k norms) with its own
expert names. Weights are input-major ([in, out]).

Mixtral routes top-2 of a softmax over 8 experts and always renormalises the pair; its layers
attend over a sliding window when config.sliding_window is set. transformers 5 writes its experts
per expert (`block_sparse_moe.experts.{e}.w1|w3|w2.weight`, router `block_sparse_moe.gate.weight`)
and holds them fused in memory under `mlp.` (`mlp.experts.gate_up_proj`, what
save_pretrained(save_original_format=False) writes): HF_RENAMES reads those names as the schema's.
"""
from __future__ import annotations

import re

from dynaexq_jax.errors import ConfigError
from dynaexq_jax.model.config import FULL_ATTENTION, ModelConfig
from dynaexq_jax.model.families import decoder, qwen3_moe
from dynaexq_jax.model.families.decoder import KVCache, attention_schema, layer_schema
from dynaexq_jax.model.families.schema import LINEAR, Experts, Tensor
from dynaexq_jax.model.layers import MoE, Params, params_schema

# MixtralConfig's defaults where config.py's generic ones differ (or it has none).
HF_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                   rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=131072, bos_token_id=1,
                   eos_token_id=2)
MIXERS = (FULL_ATTENTION,)
SKIPPED = qwen3_moe.SKIPPED
# transformers 5's in-memory names (conversion_mapping.py renames `.block_sparse_moe.` to `.mlp.`).
HF_RENAMES = ((re.compile(r"(model\.layers\.\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)"),
               r"\1.block_sparse_moe.\2"),)
init_cache = decoder.init_cache


def config_fields(d: dict) -> dict:
    """Mixtral's experts are `intermediate_size` wide and always renormalised (MixtralTopKRouter has
    no norm_topk_prob): both are set in d, which the generic parser reads after this hook."""
    d["moe_intermediate_size"] = d["intermediate_size"]
    d["norm_topk_prob"] = True
    window = d.get("sliding_window")
    if window is not None and int(window) < 1:
        raise ConfigError(f"sliding_window={window} must be null or >= 1")
    return {"sliding_window": None if window is None else int(window)}


def abstract(cfg: ModelConfig) -> Params:
    """The parameter tree with schema leaves (see schema.py): every layer is an MoE layer."""
    H, E = cfg.hidden_size, cfg.num_experts
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        moe = MoE(router=Tensor((H, E), p + "block_sparse_moe.gate.weight", LINEAR),
                  experts=Experts(E, H, cfg.moe_intermediate_size, p + "block_sparse_moe.experts.",
                                  hf_projections=("w1", "w3", "w2")))
        layers.append(layer_schema(cfg, p, attention_schema(cfg, p + "self_attn."), moe))
    return params_schema(cfg, tuple(layers))


def forward(params: Params, cfg: ModelConfig, tokens, cache: KVCache, *, backend: str = "xla",
            logits_at=None, valid=None):
    """decoder.decode's contract: (logits, new cache, RouterInfo)."""
    return decoder.decode(params, cfg, tokens, cache, backend=backend, logits_at=logits_at, valid=valid)

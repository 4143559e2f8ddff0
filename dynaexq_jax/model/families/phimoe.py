"""Phi-3.5-MoE (HF model_type `phimoe`) as pure functions over flax.struct pytrees.

Every layer: LayerNorm (with bias), grouped-query attention with q/k/v/o biases, LayerNorm, then
16 routed experts chosen by the sparsemixer router (top-2, in its inference-time form). The head
may carry a bias (lm_head_bias). RoPE is default or longrope as transformers 5.24 computes it for
this family (rotary). The decoder is decoder.py's, with LayerNorms and the sparsemixer.
Weights are input-major ([in, out]); `abstract(cfg)` describes the parameter tree once (schema.py).
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import struct

from dynaexq_jax.errors import ConfigError, UnsupportedArchitectureError
from dynaexq_jax.model import layers as L
from dynaexq_jax.model.config import FULL_ATTENTION, ModelConfig
from dynaexq_jax.model.families import decoder, qwen3_moe
from dynaexq_jax.model.families.decoder import KVCache, Layer, attention_schema
from dynaexq_jax.model.families.schema import LINEAR, Experts, Tensor
from dynaexq_jax.model.layers import MoE, layer_norm, layer_norm_schema, moe_mlp
from dynaexq_jax.model.rope import RopeTable, config_table

# PhimoeConfig's defaults where config.py has another one (or none). Not bos/eos: config.json's
# explicit nulls are dropped before these apply, and a null eos must not become token 2.
HF_DEFAULTS = dict(vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
                   rope_theta=1e6, num_local_experts=16, num_experts_per_tok=2, router_jitter_noise=0.01)
MIXERS = (FULL_ATTENTION,)
SKIPPED = qwen3_moe.SKIPPED
# transformers 5's in-memory names (what save_pretrained(save_original_format=False) writes:
# conversion_mapping.py renames `.block_sparse_moe.` to `.mlp.` and the router `.gate` to `.router`).
HF_RENAMES = ((re.compile(r"(model\.layers\.\d+)\.mlp\.router\.weight"), r"\1.block_sparse_moe.gate.weight"),
              (re.compile(r"(model\.layers\.\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj)"),
               r"\1.block_sparse_moe.\2"))
init_cache = decoder.init_cache
ROPE_TYPES = ("default", "longrope")   # PhimoeRotaryEmbedding scales any other type by the mscales too: not modelled


@dataclasses.dataclass(frozen=True)
class Config(ModelConfig):
    router_jitter_noise: float = 0.01   # the sparsemixer's mask threshold (used at inference too, not noise)
    lm_head_bias: bool = False


def config_fields(d: dict) -> dict:
    # Phi-3.5-MoE has no dense MLP: its intermediate_size is the experts' width. The generic parser
    # reads moe_intermediate_size from d after this hook, so it is set here.
    d["moe_intermediate_size"] = d["intermediate_size"]
    return dict(router_jitter_noise=float(d["router_jitter_noise"]), lm_head_bias=bool(d.get("lm_head_bias", False)),
                sliding_window=d.get("sliding_window"))


def validate(cfg: Config) -> None:
    if cfg.dense_layers:
        raise ConfigError(f"num_local_experts={cfg.num_experts}: every Phi-3.5-MoE layer routes experts")
    if cfg.num_experts_per_tok != 2:
        raise UnsupportedArchitectureError(
            f"num_experts_per_tok={cfg.num_experts_per_tok}: the sparsemixer router always selects 2 experts")
    if cfg.partial_rotary_factor != 1.0:
        raise UnsupportedArchitectureError(f"partial_rotary_factor={cfg.partial_rotary_factor} is not supported "
                                           f"for phimoe (its rotary embedding covers the whole head)")
    scaling = dict(cfg.rope_scaling)
    rope_type = scaling.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"rope type '{rope_type}' is not supported for phimoe (supported: {', '.join(ROPE_TYPES)})")
    if rope_type != "longrope":
        return
    for key in ("short_mscale", "long_mscale"):
        if isinstance(scaling.get(key), bool) or not isinstance(scaling.get(key), (int, float)):
            raise ConfigError(f"rope_scaling.{key} must be a number for phimoe's longrope, not {scaling.get(key)!r}")
    if scaling["short_mscale"] != scaling["long_mscale"]:
        # HF scales cos/sin by long_mscale once a sequence passes original_max, and its generate then
        # recomputes the whole sequence (prepare_inputs_for_generation drops the cache), so every
        # earlier position's hidden states change too: a KV cache cannot follow. Released: equal.
        raise UnsupportedArchitectureError(
            f"rope_scaling short_mscale={scaling['short_mscale']} != long_mscale={scaling['long_mscale']} is not "
            f"supported: transformers recomputes every earlier position when a sequence crosses "
            f"original_max_position_embeddings, which incremental decoding with a KV cache cannot reproduce")


@struct.dataclass
class Params(L.Params):
    """layers.Params with a LayerNorm as final_norm, plus the head's bias."""
    lm_head_bias: jax.Array | None = None    # [V] when cfg.lm_head_bias


def abstract(cfg: Config) -> Params:
    """The parameter tree with schema leaves (see schema.py), under the released names that
    save_pretrained writes: `block_sparse_moe.gate.weight`, `block_sparse_moe.experts.{e}.w1/w3/w2.weight`
    (or fused `block_sparse_moe.experts.gate_up_proj`; HF_RENAMES maps the in-memory `mlp.` names)."""
    H, E, V = cfg.hidden_size, cfg.num_experts, cfg.vocab_size
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        moe = MoE(router=Tensor((H, E), p + "block_sparse_moe.gate.weight", LINEAR),
                  experts=Experts(E, H, cfg.moe_intermediate_size, p + "block_sparse_moe.experts.", ("w1", "w3", "w2")))
        bias = ("q", "k", "v", "o") if cfg.attention_bias else ()
        layers.append(Layer(input_norm=layer_norm_schema(p + "input_layernorm.", H),
                            attn=attention_schema(cfg, p + "self_attn.", bias=bias),
                            post_norm=layer_norm_schema(p + "post_attention_layernorm.", H), mlp=moe))
    base = L.params_schema(cfg, tuple(layers))
    return Params(embed=base.embed, layers=base.layers, final_norm=layer_norm_schema("model.norm.", H),
                  lm_head=base.lm_head,
                  lm_head_bias=Tensor((V,), "lm_head.bias", init="bias") if cfg.lm_head_bias else None)


def sparsemixer(logits, jitter_eps: float):
    """HF's sparsemixer in eval mode. logits f32 [N, E] -> (ids int32 [N, 2], weights f32 [N, 2]).
    The first expert is the argmax; its weight is its softmax over the experts whose logit is within
    a relative 2*jitter_eps of the max (the others masked out). The second is the argmax with the
    first masked out, weighted the same way among the remaining experts near it."""
    def pick(masked):
        top = jnp.max(masked, axis=-1, keepdims=True)
        idx = jnp.argmax(masked, axis=-1)[:, None]
        far = (top - logits) / jnp.maximum(jnp.abs(logits), top) > 2 * jitter_eps
        w = jax.nn.softmax(jnp.where(far, -jnp.inf, masked), axis=-1)
        return idx, jnp.take_along_axis(w, idx, axis=-1)
    first, w1 = pick(logits)
    second, w2 = pick(jnp.where(jnp.arange(logits.shape[-1]) == first, -jnp.inf, logits))
    return jnp.concatenate([first, second], -1).astype(jnp.int32), jnp.concatenate([w1, w2], -1)


def sparsemixer_route(p: MoE, cfg: Config, x):
    """moe_mlp's route_fn: x [N, H] -> (ids [N, 2], weights [N, 2] in x.dtype, probs f32 [N, 2]).
    The sparsemixer's weights are what the experts are combined with, and what hotness measures."""
    ids, w = sparsemixer((x @ p.router.astype(x.dtype)).astype(jnp.float32), cfg.router_jitter_noise)
    return ids, w.astype(x.dtype), w


def rotary(cfg: Config) -> RopeTable:
    """The rotation table of transformers 5.24's PhimoeRotaryEmbedding: default RoPE, or longrope's
    short_factor frequencies at every length (it recomputes them each call without the sequence
    length, so long_factor is never used) with cos and sin times the mscale (short = long: validate)."""
    table = config_table(cfg)
    if table.long_inv_freq is None:                       # default RoPE
        return table
    return dataclasses.replace(table, attention_factor=float(dict(cfg.rope_scaling)["short_mscale"]),
                               long_inv_freq=None)


def mlp(p: MoE, cfg: Config, h, backend: str):
    """decoder.decode's mlp: the routed experts chosen by the sparsemixer."""
    return moe_mlp(p, cfg, h, backend, sparsemixer_route)


def forward(params: Params, cfg: Config, tokens, cache: KVCache, *, backend: str = "xla", logits_at=None,
            valid=None):
    """decoder.decode's contract: (logits, new cache, RouterInfo), the head's bias added."""
    out, cache, info = decoder.decode(params, cfg, tokens, cache, backend=backend, logits_at=logits_at,
                                      valid=valid, norm=layer_norm, mlp=mlp, table=rotary(cfg))
    if params.lm_head_bias is not None:
        out = out + params.lm_head_bias.astype(jnp.float32)
    return out, cache, info

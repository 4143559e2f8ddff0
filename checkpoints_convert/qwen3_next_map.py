"""Hugging Face `qwen3_next` tensor names -> our Qwen3-Next parameter tree.

The trees built here are what dynaexq_jax.serving.checkpoint turns back into models.qwen3_next params:
  dense:  {embed [V,H], final_norm [H], lm_head [H,V] (untied only)}
  layer:  {input_norm, post_norm,
           attn: {q [H, 2*nH*hd] (query and gate per head), k, v, o, q_norm, k_norm, (q|k|v|o)_bias}
             (full-attention layers) or
           linear_attn: {in_qkvz, in_ba, conv [K, conv_dim], dt_bias, A_log, norm, out} (linear layers),
           mlp: {router [H,E], shared: {gate, up, down}, shared_gate [H,1]} (MoE layers)
             or {gate, up, down} (dense layers)}
Projections are only transposed to input-major: the fused in_proj_qkvz / in_proj_ba keep the
reference's per-key-head grouping, which the forward pass splits. Experts: both HF layouts, as
for Qwen3-MoE (the same names under `model.layers.{i}.mlp.experts.`).

The multi-token-prediction head (`mtp.*`, present in the released checkpoints) is not used for
ordinary decoding and is skipped on purpose; the skipped names land in the metadata.
"""
from __future__ import annotations

import re
from typing import Collection

from checkpoints_convert import qwen3_moe_map
from checkpoints_convert.plan import Entry, Plan, copy, linear
from dynaexq_jax.model.config import ModelConfig

MODEL_TYPE = "qwen3_next"

_MTP = re.compile(r"mtp\..+")


def plan(cfg: ModelConfig, names: Collection[str]) -> Plan:
    mtp = (_MTP, "multi-token-prediction (MTP) head: not used for decoding")
    return qwen3_moe_map.decoder_plan(cfg, names, _layer, skip_rules=(mtp, qwen3_moe_map.SKIP_ROTARY))


def _conv(target: str, name: str, shape: tuple[int, int, int]) -> Entry:
    """HF depthwise Conv1d weight [C, 1, K] -> taps-major [K, C]."""
    return Entry(target, (name,), (shape,), lambda read: read(name)[:, 0, :].T)


def _layer(cfg: ModelConfig, i: int) -> tuple[Entry, ...]:
    H = cfg.hidden_size
    p = f"model.layers.{i}."
    out = [copy("input_norm", p + "input_layernorm.weight", (H,)),
           copy("post_norm", p + "post_attention_layernorm.weight", (H,))]
    if i in cfg.linear_layers:
        nK, nV = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv, K = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim
        a = p + "linear_attn."
        out += [linear("linear_attn.in_qkvz", a + "in_proj_qkvz.weight", (2 * nK * dk + 2 * nV * dv, H)),
                linear("linear_attn.in_ba", a + "in_proj_ba.weight", (2 * nV, H)),
                _conv("linear_attn.conv", a + "conv1d.weight", (2 * nK * dk + nV * dv, 1, K)),
                copy("linear_attn.dt_bias", a + "dt_bias", (nV,)),
                copy("linear_attn.A_log", a + "A_log", (nV,)),
                copy("linear_attn.norm", a + "norm.weight", (dv,)),
                linear("linear_attn.out", a + "out_proj.weight", (H, nV * dv))]
    else:
        out += qwen3_moe_map.attention_entries(cfg, p, q_heads_width=2)   # query + per-head gate
    if cfg.is_moe_layer(i):
        Is = cfg.shared_expert_intermediate_size
        s = p + "mlp.shared_expert."
        out += [linear("mlp.router", p + "mlp.gate.weight", (cfg.num_experts, H)),
                linear("mlp.shared.gate", s + "gate_proj.weight", (Is, H)),
                linear("mlp.shared.up", s + "up_proj.weight", (Is, H)),
                linear("mlp.shared.down", s + "down_proj.weight", (H, Is)),
                linear("mlp.shared_gate", p + "mlp.shared_expert_gate.weight", (1, H))]
    else:
        I = cfg.intermediate_size
        out += [linear("mlp.gate", p + "mlp.gate_proj.weight", (I, H)),
                linear("mlp.up", p + "mlp.up_proj.weight", (I, H)),
                linear("mlp.down", p + "mlp.down_proj.weight", (H, I))]
    return tuple(out)

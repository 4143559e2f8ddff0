"""Hugging Face `qwen3_moe` tensor names -> our Qwen3-MoE parameter tree.

The trees built here are what dynaexq_jax.serving.checkpoint turns back into models.qwen3_moe.Params:
  dense:  {embed [V,H], final_norm [H], lm_head [H,V] (untied only)}
  layer:  {input_norm, post_norm, attn: {q, k, v, o, q_norm, k_norm, (q|k|v|o)_bias},
           mlp: {router [H,E]} (MoE layers) or {gate, up, down} (dense layers)}
Experts come in two HF layouts, both accepted per layer: one tensor per expert and projection
(`mlp.experts.{e}.gate_proj.weight` [I,H], what transformers writes to disk), or fused 3-D tensors
(`mlp.experts.gate_up_proj` [E,2I,H] with the gate rows first, `mlp.experts.down_proj` [E,H,I],
the in-memory layout of transformers 5).
"""
from __future__ import annotations

import re
from typing import Collection

from checkpoints_convert.plan import Entry, Group, Plan, Reader, copy, linear, stack
from dynaexq_jax.model.config import ModelConfig

MODEL_TYPE = "qwen3_moe"

_ROTARY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


# Buffers some older exports saved; recomputed from the config, so dropped on purpose.
SKIP_ROTARY = (_ROTARY, "rotary inv_freq buffer: recomputed from rope_theta")


def plan(cfg: ModelConfig, names: Collection[str]) -> Plan:
    return decoder_plan(cfg, names, _layer, skip_rules=(SKIP_ROTARY,))


def decoder_plan(cfg: ModelConfig, names: Collection[str], layer_entries, skip_rules) -> Plan:
    """The plan shared by decoder-only MoE families: embeddings, final norm, (untied) head, and
    per layer layer_entries(cfg, i) plus the routed experts of MoE layers. skip_rules: (regex,
    reason) pairs for tensors dropped on purpose."""
    names = set(names)
    V, H = cfg.vocab_size, cfg.hidden_size
    skipped = [(n, reason) for rule, reason in skip_rules for n in sorted(names) if rule.fullmatch(n)]
    dense = [copy("embed", "model.embed_tokens.weight", (V, H)), copy("final_norm", "model.norm.weight", (H,))]
    if not cfg.tie_word_embeddings:
        dense.append(linear("lm_head", "lm_head.weight", (V, H)))
    elif "lm_head.weight" in names:
        skipped.append(("lm_head.weight", "tie_word_embeddings=true: the output head is the embedding"))
    groups = [Group("dense", tuple(dense))]
    layouts = {}
    for i in range(cfg.num_layers):
        experts = None
        if cfg.is_moe_layer(i):
            layouts[i], experts = _experts(cfg, i, names)
        groups.append(Group(f"layers/{i:03d}", layer_entries(cfg, i), layer=i, experts=experts))
    kinds = set(layouts.values())
    info = {"expert_layout": kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "none")}
    return Plan(tuple(groups), tuple(skipped), info)


def attention_entries(cfg: ModelConfig, p: str, q_heads_width: int = 1) -> list[Entry]:
    """q/k/v/o (+ biases) and the per-head q/k norms of layer prefix p. q_heads_width = 2 when
    q_proj also yields a per-head output gate (Qwen3-Next's gated attention)."""
    H, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    out = []
    for ours, hf, n_out, n_in in (("q", "q_proj", q_heads_width * q_out, H), ("k", "k_proj", kv_out, H),
                                  ("v", "v_proj", kv_out, H), ("o", "o_proj", H, q_out)):
        out.append(linear(f"attn.{ours}", f"{p}self_attn.{hf}.weight", (n_out, n_in)))
        if cfg.attention_bias:
            out.append(copy(f"attn.{ours}_bias", f"{p}self_attn.{hf}.bias", (n_out,)))
    return out + [copy("attn.q_norm", p + "self_attn.q_norm.weight", (hd,)),
                  copy("attn.k_norm", p + "self_attn.k_norm.weight", (hd,))]


def _layer(cfg: ModelConfig, i: int) -> tuple[Entry, ...]:
    H = cfg.hidden_size
    p = f"model.layers.{i}."
    out = [copy("input_norm", p + "input_layernorm.weight", (H,)),
           copy("post_norm", p + "post_attention_layernorm.weight", (H,))]
    out += attention_entries(cfg, p)
    if cfg.is_moe_layer(i):
        out.append(linear("mlp.router", p + "mlp.gate.weight", (cfg.num_experts, H)))
    else:
        I = cfg.intermediate_size
        out += [linear("mlp.gate", p + "mlp.gate_proj.weight", (I, H)),
                linear("mlp.up", p + "mlp.up_proj.weight", (I, H)),
                linear("mlp.down", p + "mlp.down_proj.weight", (H, I))]
    return tuple(out)


def _experts(cfg: ModelConfig, i: int, names: set[str]) -> tuple[str, Entry]:
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    p = f"model.layers.{i}.mlp.experts."
    if p + "gate_up_proj" in names:
        def fused(read: Reader):
            # [E, 2I, H] (gate rows first) and [E, H, I] -> input-major [E, H, I] x2, [E, I, H] (views)
            gate_up = read(p + "gate_up_proj")
            return {"gate": gate_up[:, :I].transpose(0, 2, 1), "up": gate_up[:, I:].transpose(0, 2, 1),
                    "down": read(p + "down_proj").transpose(0, 2, 1)}
        return "fused", Entry("experts", (p + "gate_up_proj", p + "down_proj"), ((E, 2 * I, H), (E, H, I)), fused)

    names_of = {proj: [f"{p}{e}.{proj}_proj.weight" for e in range(E)] for proj in ("gate", "up", "down")}

    def per_expert(read: Reader):
        # E tensors [I, H] (down: [H, I]) per projection -> one stack each, transposed to input-major.
        return {proj: stack(read, names).transpose(0, 2, 1) for proj, names in names_of.items()}
    sources = tuple(n for names in names_of.values() for n in names)
    return "per_expert", Entry("experts", sources, ((I, H),) * (2 * E) + ((H, I),) * E, per_expert)

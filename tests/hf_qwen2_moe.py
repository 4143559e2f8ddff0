"""Tiny random Qwen2-MoE models saved to disk. transformers 5.24 writes the routed experts per
expert (`mlp.experts.{e}.gate_proj.weight`); layout="fused" saves its in-memory layout instead
(save_original_format=False: `mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj`).
The shared expert (`mlp.shared_expert.*`, `mlp.shared_expert_gate.weight`) is the same in both."""
from __future__ import annotations

from tests.hf_models import save_tiny

TINY_QWEN2_MOE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, intermediate_size=96, max_position_embeddings=512)


def make_tiny_qwen2_moe(tmp_dir, *, seed: int, layout: str = "per_expert", max_shard_size=None, noise: bool = True,
                        **config_overrides):
    """Build, perturb and save a tiny Qwen2MoeForCausalLM (float32, eval mode) in tmp_dir/"hf".
    Returns (hf_dir, hf_model)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    hf_dir, model = save_tiny(Qwen2MoeForCausalLM, Qwen2MoeConfig, tmp_dir, seed=seed,
                              config={**TINY_QWEN2_MOE, **config_overrides}, layout=layout,
                              max_shard_size=max_shard_size, noise=noise)
    return hf_dir, model

"""Tiny random Qwen2-MoE models saved to disk. transformers 5.24 writes the routed experts per
expert (`mlp.experts.{e}.gate_proj.weight`); layout="fused" saves its in-memory layout instead
(save_original_format=False: `mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj`).
The shared expert (`mlp.shared_expert.*`, `mlp.shared_expert_gate.weight`) is the same in both."""
from __future__ import annotations

from pathlib import Path

from tests.hf_models import _perturbed, _write_tokenizer

TINY_QWEN2_MOE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, intermediate_size=96, max_position_embeddings=512)


def make_tiny_qwen2_moe(tmp_dir, *, seed: int, layout: str = "per_expert", max_shard_size=None, noise: bool = True,
                        **config_overrides):
    """Build, perturb and save a tiny Qwen2MoeForCausalLM (float32, eval mode) in tmp_dir/"hf".
    Returns (hf_dir, hf_model)."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout must be 'per_expert' or 'fused', not {layout!r}")
    kwargs = {**TINY_QWEN2_MOE, **config_overrides}
    torch.manual_seed(seed)
    model = _perturbed(Qwen2MoeForCausalLM(Qwen2MoeConfig(**kwargs)), noise)
    hf_dir = Path(tmp_dir) / "hf"
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(hf_dir, save_original_format=layout == "per_expert", **save_kwargs)
    _write_tokenizer(hf_dir, kwargs["vocab_size"])
    return hf_dir, model

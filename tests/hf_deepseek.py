"""Tiny random DeepSeek-V2 / DeepSeek-V3 models saved to disk, for the parity tests.

transformers 5.24 holds their routed experts fused in memory and writes them per expert
(mlp.experts.{e}.gate_proj.weight ...), as for Qwen3-MoE; `layout` picks what ends up on disk.
V3's e_score_correction_bias is a buffer that starts at zero: it is set to random values here, so
that it changes which experts are selected.
"""
from __future__ import annotations

from pathlib import Path

from tests.hf_models import _perturbed, _set_layout, _write_tokenizer

TINY_DEEPSEEK = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                     v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
                     moe_intermediate_size=32, intermediate_size=96, first_k_dense_replace=1, n_group=4, topk_group=2,
                     max_position_embeddings=512)


def make_tiny_deepseek(tmp_dir, *, seed: int, version: int, layout: str = "per_expert", max_shard_size=None,
                       noise: bool = True, **config_overrides):
    """Build, perturb and save a tiny DeepseekV2ForCausalLM (version 2) or DeepseekV3ForCausalLM
    (version 3), float32, eval mode, in tmp_dir/"hf". Returns (hf_dir, hf_model)."""
    import torch
    import transformers

    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout must be 'per_expert' or 'fused', not {layout!r}")
    kwargs = {**TINY_DEEPSEEK, **config_overrides}
    cfg = getattr(transformers, f"DeepseekV{version}Config")(**kwargs)
    torch.manual_seed(seed)
    model = _perturbed(getattr(transformers, f"DeepseekV{version}ForCausalLM")(cfg), noise)
    if version == 3:
        with torch.no_grad():
            for layer in model.model.layers[cfg.first_k_dense_replace:]:
                layer.mlp.gate.e_score_correction_bias.copy_(torch.rand(cfg.n_routed_experts) * 0.1)
    hf_dir = Path(tmp_dir) / "hf"
    model.save_pretrained(hf_dir, **({"max_shard_size": max_shard_size} if max_shard_size is not None else {}))
    _set_layout(hf_dir, layout, cfg.n_routed_experts)
    _write_tokenizer(hf_dir, cfg.vocab_size)
    return hf_dir, model

"""Tiny random Phi-3.5-MoE models (transformers.PhimoeForCausalLM) saved to disk, in any of the
expert layouts transformers 5 reads.

transformers 5.24 save_pretrained writes the released names: per expert
`block_sparse_moe.experts.{e}.w1/w3/w2.weight`, router `block_sparse_moe.gate.weight`. In memory
(and with save_original_format=False) they are `mlp.experts.gate_up_proj` / `down_proj` and
`mlp.router.weight` (conversion_mapping.py). It also reads the fused tensors under the released
`block_sparse_moe.` prefix (its renames apply to any name).
"""
from __future__ import annotations

import re

from tests.hf_mixtral import _rename
from tests.hf_models import save_tiny

TINY_PHIMOE = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
LAYOUTS = ("per_expert", "fused", "in_memory")


def longrope(original_max: int, head_dim: int = 16, short_mscale: float = 1.2, long_mscale: float = 1.2) -> dict:
    """rope_parameters for longrope with distinct short and long factors (the released model's two
    mscales are equal; distinct ones are refused)."""
    n = head_dim // 2
    return dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=original_max,
                short_factor=[1.0 + 0.05 * i for i in range(n)], long_factor=[1.5 + 0.25 * i for i in range(n)],
                short_mscale=short_mscale, long_mscale=long_mscale)


def make_tiny_phimoe(tmp_dir, *, seed: int, layout: str = "per_expert", max_shard_size=None, noise: bool = True,
                     **config_overrides):
    """Build, perturb and save a tiny PhimoeForCausalLM (float32, eval mode) in tmp_dir/"hf".
    layout: "per_expert" (what save_pretrained writes), "in_memory" (transformers' own names under
    `mlp.`), "fused" (the fused experts and the router under `block_sparse_moe.`). Returns (hf_dir, hf_model)."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    hf_dir, model = save_tiny(PhimoeForCausalLM, PhimoeConfig, tmp_dir, seed=seed,
                              config={**TINY_PHIMOE, **config_overrides}, layout=layout,
                              layouts=LAYOUTS, max_shard_size=max_shard_size, noise=noise)
    if layout == "fused":
        _rename(hf_dir, re.compile(r"(model\.layers\.\d+)\.mlp\.router\."), r"\1.mlp.gate.")
        _rename(hf_dir, re.compile(r"(model\.layers\.\d+)\.mlp\."), r"\1.block_sparse_moe.")
    return hf_dir, model

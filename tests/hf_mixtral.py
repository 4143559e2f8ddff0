"""Tiny random Mixtral models saved to disk, in any of the expert layouts transformers 5 reads.

transformers 5.24 save_pretrained writes Mixtral's experts per expert under the original names
(`block_sparse_moe.experts.{e}.w1|w3|w2.weight`, router `block_sparse_moe.gate.weight`); in memory
they are fused under `mlp.` (conversion_mapping.py renames `.block_sparse_moe.` to `.mlp.`), which
save_pretrained(save_original_format=False) writes. Both load back into transformers, and so does
the fused layout under the original `block_sparse_moe.` prefix (the rename applies to any name).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import safetensors.numpy as stn

from tests.hf_models import _shards, save_tiny

TINY_MIXTRAL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                    intermediate_size=32, max_position_embeddings=512)
LAYOUTS = ("per_expert", "fused", "in_memory")


def make_tiny_mixtral(tmp_dir, *, seed: int, layout: str = "per_expert", max_shard_size=None, noise: bool = True,
                      **config_overrides):
    """Build, perturb and save a tiny MixtralForCausalLM (float32, eval mode) in tmp_dir/"hf".
    layout: "per_expert" (what save_pretrained writes), "in_memory" (transformers' own fused names
    under `mlp.`), "fused" (the fused tensors under `block_sparse_moe.`). Returns (hf_dir, hf_model)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    hf_dir, model = save_tiny(MixtralForCausalLM, MixtralConfig, tmp_dir, seed=seed,
                              config={**TINY_MIXTRAL, **config_overrides}, layout=layout,
                              layouts=LAYOUTS, max_shard_size=max_shard_size, noise=noise)
    if layout == "fused":
        _rename(hf_dir, re.compile(r"(model\.layers\.\d+)\.mlp\."), r"\1.block_sparse_moe.")
    return hf_dir, model


def _rename(hf_dir: Path, rule: re.Pattern, replacement: str) -> None:
    """Rename the saved tensors in place, shard by shard, keeping the index consistent."""
    for shard in _shards(hf_dir):
        stn.save_file({rule.sub(replacement, n): t for n, t in stn.load_file(shard).items()}, shard,
                      metadata={"format": "pt"})
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        d = json.loads(index.read_text())
        d["weight_map"] = dict(sorted((rule.sub(replacement, n), f) for n, f in d["weight_map"].items()))
        index.write_text(json.dumps(d, indent=2))

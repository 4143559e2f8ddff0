"""DeepSeek-V3 (HF model_type `deepseek_v3`, DeepseekV3ForCausalLM): the DeepSeek family
(deepseek.py) with DeepseekV3Config's defaults."""
import re

from dynaexq_jax.model.families import qwen3_moe
from dynaexq_jax.model.families.deepseek import (
    MIXERS,
    Config,
    abstract,
    attention_workspace_bytes,
    config_fields,
    forward,
    init_cache,
    validate,
)

__all__ = ["HF_DEFAULTS", "MIXERS", "SKIPPED", "Config", "abstract", "attention_workspace_bytes", "config_fields",
           "forward", "init_cache", "validate"]

# Where a config.json omits a key, transformers falls back to DeepseekV3Config's defaults (q_lora_rank
# aside: see deepseek.config_fields).
HF_DEFAULTS = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
                   num_attention_heads=128, num_key_value_heads=128, max_position_embeddings=4096, bos_token_id=0,
                   eos_token_id=1, rope_theta=10000.0, kv_lora_rank=512, n_routed_experts=256, n_shared_experts=1,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, moe_intermediate_size=2048,
                   num_experts_per_tok=8, first_k_dense_replace=3, n_group=8, topk_group=4, norm_topk_prob=True,
                   routed_scaling_factor=2.5, rope_interleave=True)
# The released checkpoints carry one multi-token-prediction (MTP) layer after the 61 decoder layers,
# model.layers.61.*; transformers drops it too (_keys_to_ignore_on_load_unexpected).
SKIPPED = qwen3_moe.SKIPPED + ((re.compile(r"model\.layers\.61\..+"),
                                "DeepSeek-V3's multi-token-prediction (MTP) layer: not used for decoding"),)

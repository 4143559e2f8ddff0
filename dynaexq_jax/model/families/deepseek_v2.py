"""DeepSeek-V2 (HF model_type `deepseek_v2`, DeepseekV2ForCausalLM): the DeepSeek family
(deepseek.py) with DeepseekV2Config's defaults."""
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

# Where a config.json omits a key, transformers falls back to DeepseekV2Config's defaults (q_lora_rank
# aside: see deepseek.config_fields).
HF_DEFAULTS = dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                   rope_theta=10000.0, kv_lora_rank=512, n_routed_experts=64, n_shared_experts=2,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, moe_intermediate_size=1407,
                   first_k_dense_replace=0, routed_scaling_factor=1.0, topk_method="greedy")
SKIPPED = qwen3_moe.SKIPPED

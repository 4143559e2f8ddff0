"""The tiny Qwen3-MoE that the runtime tests serve (test_runtime, test_transfers; converted by
conftest's `tiny_ckpt` fixture): 3 layers x 8 experts top-2, int4 LO tier."""
import numpy as np

TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64)
BATCH, MAX_LEN, SEG = 2, 128, 4


def prompts(seed, n=BATCH, length=9):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, TINY["vocab_size"], length).tolist() for _ in range(n)]

"""Qwen3-MoE against transformers.Qwen3MoeForCausalLM: the family suite (family_suite.py) on tiny
random models, every parameter perturbed."""
from tests.family_suite import FamilySuite
from tests.hf_models import make_tiny_qwen3_moe


class TestQwen3Moe(FamilySuite):
    CASES = {
        "plain": dict(norm_topk_prob=False),
        "norm_topk+mlp_only+shards": dict(norm_topk_prob=True, mlp_only_layers=(1,), max_shard_size="100KB"),
        "tied+sparse_step2": dict(norm_topk_prob=True, tie_word_embeddings=True, decoder_sparse_step=2),
        "fused_layout+bias": dict(norm_topk_prob=False, layout="fused", attention_bias=True),
    }

    @staticmethod
    def build(tmp, seed, **options):
        # A larger init scale than HF's default keeps greedy generations from collapsing into one
        # repeated token, so that the 32-token comparison says something.
        return make_tiny_qwen3_moe(tmp, seed=seed, initializer_range=0.08, eos_token_id=None, **options)

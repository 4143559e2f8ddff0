"""Qwen2-MoE against transformers.Qwen2MoeForCausalLM: the family suite (family_suite.py) on tiny
random models, every parameter perturbed; plus the config defaults, the shared expert kept dense
(outside the tier pools, counted in the dense bytes the budget plans with), and the sliding-window
configs it rejects."""
import pytest
from transformers import Qwen2MoeConfig

from checkpoints_convert import convert
from dynaexq_jax.errors import UnsupportedArchitectureError
from dynaexq_jax.model.config import parse_hf_config
from dynaexq_jax.model.families import qwen2_moe
from dynaexq_jax.model.layers import DenseMLP, SharedMoE
from dynaexq_jax.runtime.budget import planned_checkpoint
from dynaexq_jax.serving.checkpoint import load_checkpoint, read_info
from tests.family_suite import LO, FamilySuite, assert_hf_defaults
from tests.hf_qwen2_moe import make_tiny_qwen2_moe


class TestQwen2Moe(FamilySuite):
    CASES = {
        "shared+sparse_step2": dict(decoder_sparse_step=2),
        "mlp_only+norm_topk+fused+shards": dict(mlp_only_layers=[0], norm_topk_prob=True, layout="fused",
                                                max_shard_size="100KB"),
        "tied+no_qkv_bias": dict(tie_word_embeddings=True, qkv_bias=False),
    }

    @staticmethod
    def build(tmp, seed, **options):
        # A larger init scale than HF's default keeps greedy generations from collapsing into one
        # repeated token, so that the 32-token comparison says something.
        return make_tiny_qwen2_moe(tmp, seed=seed, initializer_range=0.08, **options)


def test_shared_expert_is_dense(tmp_path):
    """The shared expert and its gate are dense parameters of each MoE layer; the tier pools hold
    the routed experts only; the metadata's dense bytes count the shared experts."""
    hf_dir, hf = make_tiny_qwen2_moe(tmp_path, seed=3, decoder_sparse_step=2, noise=False)
    ckpt = load_checkpoint(convert(hf_dir, tmp_path / "conv", lo=LO, progress=False))
    cfg = ckpt.config
    assert cfg.moe_layers == (1, 3) and sorted(ckpt.experts) == [1, 3]
    H, E, I, Is = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    for i, layer in enumerate(ckpt.params.layers):
        if i in cfg.moe_layers:
            assert isinstance(layer.mlp, SharedMoE) and layer.mlp.shared.gate.shape == (H, Is)
            assert layer.mlp.shared_gate.shape == (H, 1)
            assert ckpt.experts[i]["hi"].gate.data.shape == (E, H, I)
        else:
            assert type(layer.mlp) is DenseMLP and layer.mlp.gate.shape == (H, cfg.intermediate_size)
    # What the budget counts as dense, from the converted metadata and from config.json alone.
    dense = sum(p.numel() for n, p in hf.named_parameters() if ".mlp.experts." not in n) * 4
    assert read_info(ckpt.path).dense_nbytes == dense
    assert planned_checkpoint(hf_dir, hi="f32", lo=LO, dtype="f32").dense_nbytes == dense


def test_hf_defaults_for_omitted_keys():
    ours, ref = parse_hf_config({"model_type": "qwen2_moe"}), Qwen2MoeConfig()
    assert isinstance(ours, qwen2_moe.Config) and ours.qkv_bias is ref.qkv_bias is True
    assert ours.head_dim == ref.hidden_size // ref.num_attention_heads
    assert_hf_defaults(ours, ref, [("intermediate_size", "intermediate_size"),
                                   ("moe_intermediate_size", "moe_intermediate_size"),
                                   ("shared_expert_intermediate_size", "shared_expert_intermediate_size"),
                                   ("num_experts", "num_experts"), ("norm_topk_prob", "norm_topk_prob")])
    assert ours.moe_layers == tuple(range(ref.num_hidden_layers))


@pytest.mark.parametrize("overrides, message", [
    (dict(use_sliding_window=True), "use_sliding_window=true is not supported"),
    (dict(layer_types=["sliding_attention", "full_attention"], num_hidden_layers=2),
     r"layer_types \['sliding_attention'\] are not supported \(only full_attention\)"),
])
def test_sliding_window_is_unsupported(overrides, message):
    with pytest.raises(UnsupportedArchitectureError, match=message):
        parse_hf_config({"model_type": "qwen2_moe", **overrides})

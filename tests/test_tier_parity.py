"""The Qwen3-MoE layer computes through the mixed-tier MoE op: with every expert in one tier,
logits equal transformers' with that tier's dequantized expert weights put into the HF model."""
import numpy as np
import pytest
import torch

import dynaexq_jax
from checkpoints_convert import convert
from tests.hf_models import make_tiny_qwen3_moe


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiers")
    hf_dir, hf = make_tiny_qwen3_moe(tmp, seed=3, norm_topk_prob=True, mlp_only_layers=(2,),
                                     initializer_range=0.08, eos_token_id=None)
    return hf, convert(hf_dir, tmp / "conv", hi="bf16", lo="int4:g32", progress=False)


def hf_with_experts_of(hf, model):
    """A copy of the HF model whose routed-expert weights are our tier's dequantized weights."""
    import copy
    ref = copy.deepcopy(hf)
    for layer, pools in model.checkpoint.experts.items():
        pool = pools[model.tier]
        gate, up, down = (np.asarray(q.dequantize(), np.float32) for q in (pool.gate, pool.up, pool.down))
        experts = ref.model.layers[layer].mlp.experts
        with torch.no_grad():
            experts.gate_up_proj.copy_(torch.from_numpy(np.concatenate([gate, up], axis=2).transpose(0, 2, 1).copy()))
            experts.down_proj.copy_(torch.from_numpy(down.transpose(0, 2, 1).copy()))
    return ref


@pytest.mark.parametrize("tier", ["hi", "lo"])
def test_logits_match_hf_with_dequantized_tier(converted, tier):
    hf, path = converted
    ours = dynaexq_jax.load(path, tier=tier)
    assert ours.checkpoint.tiers[tier].name == {"hi": "bf16", "lo": "int4:g32"}[tier]
    ids = np.random.default_rng().integers(0, ours.config.vocab_size, (2, 13))
    with torch.no_grad():
        want = hf_with_experts_of(hf, ours)(torch.tensor(ids)).logits.numpy()
        plain = hf(torch.tensor(ids)).logits.numpy()
    got = ours.logits(ids)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale
    if tier == "lo":   # int4 really changes the model: the comparison above is not vacuous
        assert np.abs(plain - want).max() > 1e-3 * scale


def test_pallas_backend_in_interpret_mode_matches_xla(converted):
    _, path = converted
    ids = np.random.default_rng().integers(0, 256, (1, 6))
    xla = dynaexq_jax.load(path, tier="lo").logits(ids)
    pallas = dynaexq_jax.load(path, tier="lo", backend="pallas").logits(ids)
    assert np.abs(pallas - xla).max() <= 1e-4 * np.abs(xla).max()

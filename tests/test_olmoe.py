"""OLMoE against transformers.OlmoeForCausalLM: the family suite (family_suite.py) on tiny random
models, every parameter perturbed; plus the config defaults, the router against HF's (both
norm_topk_prob values), clip_qkv (it must bite, or the suite would not test it), bad configs."""
import dataclasses

import numpy as np
import pytest
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

import dynaexq_jax
from checkpoints_convert import convert
from dynaexq_jax.errors import ConfigError
from dynaexq_jax.model.config import parse_hf_config
from dynaexq_jax.model.families import decoder, olmoe
from dynaexq_jax.model.layers import rms_norm
from tests.family_suite import LO, TOL, FamilySuite, assert_hf_defaults, assert_router_equals_hf, hf_logits, rel_err
from tests.hf_olmoe import make_tiny_olmoe

CLIP = 1.0


class TestOlmoe(FamilySuite):
    CASES = {
        "plain": dict(),
        "norm_topk+clip+bias": dict(norm_topk_prob=True, clip_qkv=CLIP, attention_bias=True),
        "fused+shards+tied+mha": dict(layout="fused", max_shard_size="100KB", tie_word_embeddings=True,
                                      num_key_value_heads=4),
    }

    @staticmethod
    def build(tmp, seed, **options):
        # A larger init scale than HF's default keeps greedy generations from collapsing into one
        # repeated token, so that the 32-token comparison says something.
        return make_tiny_olmoe(tmp, seed=seed, initializer_range=0.08, **options)


@pytest.fixture(scope="module")
def clipped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clipped")
    hf_dir, hf = make_tiny_olmoe(tmp, seed=7, clip_qkv=CLIP, initializer_range=0.08)
    return hf, dynaexq_jax.load(convert(hf_dir, tmp / "conv", lo=LO, progress=False))


def test_clip_qkv_bites(clipped):
    """The clamp acts on the test activations: q and k (after their norms) and v exceed CLIP, and
    without the clamp our logits differ from HF's."""
    hf, ours = clipped
    cfg, attn = ours.config, ours.params.layers[0].attn
    assert cfg.clip_qkv == CLIP
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 17))
    x = rms_norm(ours.params.embed[ids], ours.params.layers[0].input_norm, cfg.rms_norm_eps)
    q, k, v = decoder.project(attn, cfg, x)        # the norms, without the clamp
    assert all(float(np.abs(a).max()) > 1.5 * CLIP for a in (q, k, v))
    ref = hf_logits(hf, ids)
    assert rel_err(ours.logits(ids), ref) <= TOL
    unclipped = dataclasses.replace(cfg, clip_qkv=None)
    got, _, _ = olmoe.forward(ours.params, unclipped, ids, olmoe.init_cache(unclipped, 2, 32))
    assert rel_err(np.asarray(got), ref) > 1e-2


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_router_matches_hf(norm_topk_prob):
    """Softmax in f32 over all experts, top-k, renormalised only when norm_topk_prob; probs: the
    selected experts' softmax scores before renormalisation (what hotness is measured from)."""
    kw = dict(hidden_size=32, num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm_topk_prob)
    cfg = parse_hf_config(dict(model_type="olmoe", vocab_size=16, num_hidden_layers=1, num_attention_heads=4, **kw))
    assert_router_equals_hf(OlmoeTopKRouter(OlmoeConfig(**kw)), cfg)


def test_hf_defaults_for_omitted_keys():
    ours, ref = parse_hf_config({"model_type": "olmoe"}), OlmoeConfig()
    assert isinstance(ours, olmoe.Config) and ours.clip_qkv is ref.clip_qkv is None
    assert ours.moe_intermediate_size == ours.intermediate_size == ref.intermediate_size
    assert ours.head_dim == ref.hidden_size // ref.num_attention_heads
    assert ours.eos_token_ids == (ref.eos_token_id,)
    assert_hf_defaults(ours, ref, [("num_experts", "num_experts"), ("norm_topk_prob", "norm_topk_prob"),
                                   ("attention_bias", "attention_bias")])
    assert ours.moe_layers == tuple(range(ref.num_hidden_layers))


def test_config_round_trips_through_the_checkpoint_metadata(clipped):
    _, ours = clipped
    assert type(ours.config) is olmoe.Config and ours.config.clip_qkv == CLIP


@pytest.mark.parametrize("overrides, message", [
    (dict(head_dim=32), "head_dim=32 x num_attention_heads=16 must equal hidden_size=2048"),
    (dict(clip_qkv=0), "clip_qkv=0 must be null or positive"),
])
def test_bad_configs_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_hf_config({"model_type": "olmoe", **overrides})

"""Phi-3.5-MoE against transformers.PhimoeForCausalLM: the family suite (family_suite.py) on tiny
random models, plus the in-memory expert layout, the sliding window, its config defaults, the
sparsemixer router, longrope as transformers 5.24 computes it and the options it refuses."""
import dataclasses

import numpy as np
import pytest
import torch

import dynaexq_jax
from checkpoints_convert import convert
from checkpoints_convert.plan import build_plan
from checkpoints_convert.safetensors_reader import SafetensorsCheckpoint
from dynaexq_jax.errors import ConfigError, UnsupportedArchitectureError
from dynaexq_jax.model.config import parse_hf_config
from dynaexq_jax.model.families import phimoe
from dynaexq_jax.model.layers import MoE
from dynaexq_jax.model.rope import rope
from tests.family_suite import LO, TOL, FamilySuite, assert_hf_defaults, hf_logits, rel_err
from tests.hf_phimoe import TINY_PHIMOE, longrope, make_tiny_phimoe

ORIGINAL_MAX = 16   # longrope's threshold: the suite's sequences cross it


class TestPhimoe(FamilySuite):
    CASES = {
        "default_rope+biases": dict(attention_bias=True, lm_head_bias=True),
        "longrope_crossing+wide_jitter": dict(rope_parameters=longrope(ORIGINAL_MAX), router_jitter_noise=0.1),
        "tied+head_bias+window8+fused+shards": dict(tie_word_embeddings=True, lm_head_bias=True, sliding_window=8,
                                                    attention_bias=True, layout="fused", max_shard_size="100KB"),
    }

    @staticmethod
    def build(tmp, seed, **options):
        # A larger init scale than HF's default keeps greedy generations from collapsing into one
        # repeated token, so that the 32-token comparison says something.
        return make_tiny_phimoe(tmp, seed=seed, initializer_range=0.08, eos_token_id=None, **options)


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory):
    """transformers' in-memory layout on disk (save_original_format=False: fused experts and the
    router under `mlp.`), longrope crossing its threshold, a window of 6, converted and loaded."""
    tmp = tmp_path_factory.mktemp("in_memory")
    hf_dir, hf = make_tiny_phimoe(tmp, seed=5, layout="in_memory", sliding_window=6, lm_head_bias=True,
                                  rope_parameters=longrope(ORIGINAL_MAX), initializer_range=0.08)
    return hf_dir, hf, dynaexq_jax.load(convert(hf_dir, tmp / "conv", lo=LO, progress=False))


def test_in_memory_layout_converts(in_memory):
    hf_dir, hf, ours = in_memory
    names = set(SafetensorsCheckpoint(hf_dir).tensors)
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.router.weight"} <= names
    assert build_plan(ours.config, names).used_names() == names
    assert ours.checkpoint.metadata["expert_layout"] == "fused"
    ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, (2, 20))
    assert rel_err(ours.logits(ids), hf_logits(hf, ids)) <= TOL


def test_sliding_window_changes_the_output(in_memory):
    """Without the window our logits differ from HF's past it: the window is applied, as HF applies it."""
    _, hf, ours = in_memory
    ids = np.random.default_rng(1).integers(0, ours.config.vocab_size, (1, 20))
    ref = hf_logits(hf, ids)
    assert rel_err(ours.logits(ids), ref) <= TOL
    unwindowed = dataclasses.replace(ours.config, sliding_window=None)
    got, _, _ = phimoe.forward(ours.params, unwindowed, ids, phimoe.init_cache(unwindowed, 1, 20))
    assert rel_err(np.asarray(got)[:, :6], ref[:, :6]) <= TOL and rel_err(np.asarray(got), ref) > 1e-3


def test_suite_sequences_cross_the_window_and_the_longrope_threshold():
    """The suite's full forward (17 tokens), long prompt and greedy runs (to 43 positions) pass both."""
    cases = TestPhimoe.CASES.values()
    windows = [c["sliding_window"] for c in cases if c.get("sliding_window")]
    thresholds = [c["rope_parameters"]["original_max_position_embeddings"] for c in cases if c.get("rope_parameters")]
    assert windows and thresholds and max(windows + thresholds) < 17


def test_config_defaults_are_phimoe_configs():
    from transformers import PhimoeConfig
    ref, ours = PhimoeConfig(), parse_hf_config({"model_type": "phimoe"})
    assert isinstance(ours, phimoe.Config)
    assert_hf_defaults(ours, ref, [("moe_intermediate_size", "intermediate_size"), ("num_experts", "num_local_experts"),
                                   ("attention_bias", "attention_bias"), ("router_jitter_noise", "router_jitter_noise"),
                                   ("lm_head_bias", "lm_head_bias"), ("sliding_window", "sliding_window")])
    assert ours.rope_scaling == ()
    assert ours.head_dim == ref.hidden_size // ref.num_attention_heads
    assert ours.moe_layers == tuple(range(ref.num_hidden_layers))


@pytest.mark.parametrize("jitter", [0.01, 0.1, 0.0])
def test_sparsemixer_is_hfs_router_in_eval_mode(jitter):
    """Through the router weights, as the MoE block calls it; logits drawn in several scales and
    with near ties, so that the relative masks keep anything from one expert to all of them."""
    from transformers import PhimoeConfig
    from transformers.models.phimoe.modeling_phimoe import PhimoeTopKRouter
    H, E = 16, 8
    router = PhimoeTopKRouter(PhimoeConfig(hidden_size=H, num_local_experts=E, router_jitter_noise=jitter)).eval()
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((64, H)) * s for s in (0.01, 1.0, 20.0)]).astype(np.float32)
    x[:8] = x[8]                                          # identical rows: identical routes
    with torch.no_grad():
        router.weight.copy_(torch.tensor(rng.standard_normal((E, H)).astype(np.float32) * 0.3))
        _, want_w, want_ids = router(torch.tensor(x))
    cfg = parse_hf_config({**TINY_PHIMOE, "model_type": "phimoe", "num_local_experts": E, "router_jitter_noise": jitter,
                           "hidden_size": H})
    ids, w, probs = phimoe.sparsemixer_route(MoE(router=router.weight.detach().numpy().T, experts=None), cfg, x)
    np.testing.assert_array_equal(np.asarray(ids), want_ids.numpy())
    np.testing.assert_allclose(np.asarray(w), want_w.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(probs), np.asarray(w))       # hotness sees the combine weights
    assert (np.asarray(ids)[:, 0] != np.asarray(ids)[:, 1]).all()
    if jitter:   # both kinds of rows occur: one expert alone near the max, and several sharing it
        assert (np.asarray(w) == 1.0).any() and (np.asarray(w) < 0.9).any()


def test_longrope_is_hfs_short_frequencies_times_the_mscale():
    """transformers 5.24's PhimoeRotaryEmbedding: short_factor frequencies at every length, cos and sin
    times the mscale, on both sides of original_max."""
    from transformers import PhimoeConfig
    from transformers.models.phimoe.modeling_phimoe import PhimoeRotaryEmbedding, apply_rotary_pos_emb
    params = longrope(ORIGINAL_MAX)
    hf_rope = PhimoeRotaryEmbedding(PhimoeConfig(**TINY_PHIMOE, rope_parameters=params))
    cfg = parse_hf_config({**TINY_PHIMOE, "model_type": "phimoe", "rope_parameters": params})
    table, hd = phimoe.rotary(cfg), cfg.head_dim
    for n in (ORIGINAL_MAX, ORIGINAL_MAX + 1, 3 * ORIGINAL_MAX):
        x = np.random.default_rng(n).standard_normal((1, n, cfg.num_heads, hd)).astype(np.float32)
        pos = torch.arange(n)[None]
        cos, sin = hf_rope(torch.zeros(1), pos)
        want, _ = apply_rotary_pos_emb(torch.tensor(x).transpose(1, 2), torch.zeros(1, 1, n, hd), cos, sin)
        got = np.asarray(rope(x, pos.numpy().astype(np.int32), table))
        np.testing.assert_allclose(got, want.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-5)
    # long_factor is never used (transformers 4.x and the released remote code used it past
    # original_max): this fails if transformers changes that, and the family must follow.
    default_inv_freq = hf_rope.compute_default_rope_parameters(hf_rope.config)[0].numpy()
    np.testing.assert_allclose(table.inv_freq, default_inv_freq / np.asarray(params["short_factor"]), rtol=1e-6)
    assert table.attention_factor == params["short_mscale"] != 1.0


BASE = {**TINY_PHIMOE, "model_type": "phimoe"}


@pytest.mark.parametrize("overrides, error, match", [
    (dict(num_experts_per_tok=1), UnsupportedArchitectureError, "sparsemixer router always selects 2 experts"),
    (dict(num_local_experts=0), ConfigError, "every Phi-3.5-MoE layer routes experts"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0, original_max_position_embeddings=16)),
     UnsupportedArchitectureError, "rope type 'yarn' is not supported for phimoe"),
    (dict(rope_parameters={k: v for k, v in longrope(16).items() if k != "long_mscale"}), ConfigError,
     "rope_scaling.long_mscale must be a number"),
    (dict(rope_parameters=dict(longrope(16), partial_rotary_factor=0.5)), UnsupportedArchitectureError,
     "partial_rotary_factor=0.5 is not supported for phimoe"),
    (dict(rope_parameters=longrope(16, short_mscale=1.1, long_mscale=1.3)), UnsupportedArchitectureError,
     "short_mscale=1.1 != long_mscale=1.3 is not supported: transformers recomputes every earlier position"),
])
def test_unsupported_options_raise_typed_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        parse_hf_config({**BASE, **overrides})

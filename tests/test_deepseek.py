"""DeepSeek-V2 and DeepSeek-V3 against transformers' DeepseekV2ForCausalLM / DeepseekV3ForCausalLM:
the family suite (family_suite.py) on tiny random models, every parameter perturbed (V3's
selection bias too); the config against the reference's modules; the latent cache; the routers
against transformers' on many tokens; the interleaved RoPE; the MTP layer skipped; unsupported
options refused with typed errors."""
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

from checkpoints_convert import convert
from checkpoints_convert.plan import build_plan
from dynaexq_jax.errors import ConfigError, UnsupportedArchitectureError
from dynaexq_jax.model.config import parse_hf_config
from dynaexq_jax.model.families import deepseek, family, schema
from dynaexq_jax.model.rope import config_table, rope_interleaved
from tests.family_suite import FamilySuite
from tests.hf_deepseek import TINY_DEEPSEEK, make_tiny_deepseek


def yarn(mscale: float, mscale_all_dim: float) -> dict:
    # factor = max_position_embeddings / original_max_position_embeddings, as a released config has it
    return dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                beta_fast=32, beta_slow=1, mscale=mscale, mscale_all_dim=mscale_all_dim)


class TestDeepseek(FamilySuite):
    CASES = {
        # V2-Lite's shape: no q LoRA, greedy softmax routing, one dense first layer, two shared experts.
        "v2_lite": dict(version=2, q_lora_rank=None),
        # V2's: q LoRA, group-limited greedy, routed scaling, yarn whose mscale and mscale_all_dim differ (cos and
        # sin scaled too), biases, fused experts on disk, shards.
        "v2+q_lora+group_limited+yarn+fused": dict(
            version=2, q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
            routed_scaling_factor=2.0, rope_parameters=yarn(0.707, 1.0), attention_bias=True, layout="fused",
            max_shard_size="100KB"),
        # V3's: noaux_tc (sigmoid, selection bias, groups by their top-2), yarn, renormalised top-k scaled by 2.5.
        "v3+noaux_tc+yarn": dict(version=3, q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                 n_shared_experts=1, norm_topk_prob=True, rope_parameters=yarn(1.0, 1.0)),
        # V3 without q LoRA, rotate-half RoPE (rope_interleave=false), no renormalisation, every layer MoE, tied head.
        "v3+rotate_half+no_norm+tied": dict(version=3, q_lora_rank=None, rope_interleave=False, norm_topk_prob=False,
                                            n_group=2, topk_group=1, routed_scaling_factor=1.5,
                                            first_k_dense_replace=0, tie_word_embeddings=True),
    }

    @staticmethod
    def build(tmp, seed, **options):
        # A larger init scale than HF's default keeps greedy generations from collapsing into one
        # repeated token, so that the 32-token comparison says something.
        return make_tiny_deepseek(tmp, seed=seed, initializer_range=0.08, eos_token_id=None, **options)

    def test_config_matches_reference(self, pair):
        case, _, hf, ours, _ = pair
        cfg, ref = ours.config, hf.config
        assert cfg.moe_layers == tuple(i for i, layer in enumerate(hf.model.layers)
                                       if type(layer.mlp).__name__.endswith(("Moe", "MoE")))
        attn = hf.model.layers[0].self_attn
        assert cfg.softmax_scale == pytest.approx(attn.scaling, rel=1e-12)
        table = config_table(cfg)
        np.testing.assert_allclose(table.inv_freq, hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
        assert table.attention_factor == pytest.approx(hf.model.rotary_emb.attention_scaling)
        assert (cfg.q_lora_rank, cfg.topk_method) == (ref.q_lora_rank, getattr(ref, "topk_method", "noaux_tc"))
        assert cfg.shared_expert_intermediate_size == ref.n_shared_experts * ref.moe_intermediate_size
        assert ours.checkpoint.metadata["expert_layout"] == self.CASES[case].get("layout", "per_expert")

    def test_the_cache_holds_the_latent_and_the_rope_key_only(self, pair):
        _, _, _, ours, _ = pair
        cfg = ours.config
        cache = family(cfg.model_type).init_cache(cfg, 2, 40, jnp.bfloat16)
        per_position = cfg.kv_lora_rank + cfg.qk_rope_head_dim            # not 2 * heads * head dims
        assert [x.shape for x in cache.kv] == [(2, 40, per_position)] * cfg.num_layers
        assert sum(x.nbytes for x in jax.tree.leaves(cache)) == cfg.num_layers * 2 * 40 * per_position * 2 + 2 * 4


def _hf_router(version: int, cfg, weight, bias=None):
    r = (hf_v2.DeepseekV2TopkRouter if version == 2 else hf_v3.DeepseekV3TopkRouter)(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.tensor(np.asarray(weight).T))
        if bias is not None:
            r.e_score_correction_bias.copy_(torch.tensor(np.asarray(bias)))
    return r


@pytest.mark.parametrize("version, options", [
    (2, dict(topk_method="greedy", routed_scaling_factor=1.0)),
    (2, dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0)),
    (3, dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
    (3, dict(n_group=8, topk_group=3, norm_topk_prob=False, routed_scaling_factor=1.0)),
], ids=["v2-greedy", "v2-group_limited", "v3-noaux_tc", "v3-noaux_tc-no_norm"])
def test_routing_equals_the_reference_router(version, options):
    """Ids, combine weights and hotness scores on 512 tokens, E=32, k=6 (weights that would differ
    if the bias entered them or a group were ranked by its best instead of its top-2 sum)."""
    kw = dict(TINY_DEEPSEEK, n_routed_experts=32, num_experts_per_tok=6, **options)
    ref_cfg = getattr(transformers, f"DeepseekV{version}Config")(**kw)
    cfg = parse_hf_config(ref_cfg.to_dict())
    rng = np.random.default_rng(version)
    x = rng.standard_normal((512, cfg.hidden_size)).astype(np.float32)
    w = rng.standard_normal((cfg.hidden_size, cfg.num_experts)).astype(np.float32) * 0.3
    bias = rng.uniform(0, 0.5, cfg.num_experts).astype(np.float32) if version == 3 else None
    p = deepseek.DeepseekMoE(router=jnp.asarray(w), experts=None, shared=None,
                             score_bias=None if bias is None else jnp.asarray(bias))
    ids, weights, probs = jax.jit(deepseek.route, static_argnums=1)(p, cfg, jnp.asarray(x))
    with torch.no_grad():
        logits, ref_w, ref_ids = _hf_router(version, ref_cfg, w, bias)(torch.tensor(x))
    order, ref_order = np.argsort(np.asarray(ids), -1), np.argsort(ref_ids.numpy(), -1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(ids), order, -1),
                                  np.take_along_axis(ref_ids.numpy(), ref_order, -1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(weights), order, -1),
                               np.take_along_axis(ref_w.numpy(), ref_order, -1), rtol=1e-5)
    scores = (torch.sigmoid(logits) if version == 3 else torch.softmax(logits, -1)).numpy()
    np.testing.assert_allclose(np.asarray(probs), np.take_along_axis(scores, np.asarray(ids), -1), rtol=1e-5)


def test_interleaved_rope_is_the_references_rotation():
    """V3's apply_rotary_pos_emb_interleave exactly; V2's complex product up to the de-interleaving
    permutation (which queries and keys share)."""
    cfg = parse_hf_config(transformers.DeepseekV3Config(**TINY_DEEPSEEK, rope_parameters=yarn(0.707, 1.0)).to_dict())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, cfg.qk_rope_head_dim)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], np.int32)
    got = np.asarray(rope_interleaved(jnp.asarray(x), jnp.asarray(positions), config_table(cfg)))
    ref_cfg = transformers.DeepseekV3Config(**TINY_DEEPSEEK, rope_parameters=yarn(0.707, 1.0))
    xt = torch.tensor(x).transpose(1, 2)                                      # [B, n, T, d]
    cos, sin = hf_v3.DeepseekV3RotaryEmbedding(ref_cfg)(xt, torch.tensor(positions))
    want, _ = hf_v3.apply_rotary_pos_emb_interleave(xt, xt, cos, sin)
    np.testing.assert_allclose(got, want.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-6)
    v2_cfg = transformers.DeepseekV2Config(**TINY_DEEPSEEK, rope_parameters=yarn(0.707, 1.0))
    freqs_cis = hf_v2.DeepseekV2RotaryEmbedding(v2_cfg)(xt, torch.tensor(positions))
    v2, _ = hf_v2.apply_rotary_emb(xt, xt, freqs_cis)
    d = cfg.qk_rope_head_dim
    deinterleave = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])
    np.testing.assert_allclose(got, v2.transpose(1, 2).numpy()[..., deinterleave], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("version", [2, 3])
def test_hf_defaults_for_omitted_keys(version):
    """Keys a config.json leaves out take the config class's defaults (q_lora_rank aside: parse_hf_config
    drops null values, so an omitted one reads as null, no q LoRA; every released config spells it out)."""
    d = dict(model_type=f"deepseek_v{version}", num_experts_per_tok=4, q_lora_rank=1536)
    ours, ref = parse_hf_config(d), getattr(transformers, f"DeepseekV{version}Config")(**d)
    for field, hf_name in [("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                           ("num_layers", "num_hidden_layers"), ("num_heads", "num_attention_heads"),
                           ("num_kv_heads", "num_key_value_heads"), ("head_dim", "head_dim"),
                           ("intermediate_size", "intermediate_size"),
                           ("moe_intermediate_size", "moe_intermediate_size"),
                           ("num_experts", "n_routed_experts"), ("norm_topk_prob", "norm_topk_prob"),
                           ("max_position_embeddings", "max_position_embeddings"), ("bos_token_id", "bos_token_id"),
                           ("rope_theta", "rope_theta"), ("kv_lora_rank", "kv_lora_rank"),
                           ("qk_nope_head_dim", "qk_nope_head_dim"), ("qk_rope_head_dim", "qk_rope_head_dim"),
                           ("v_head_dim", "v_head_dim"), ("n_shared_experts", "n_shared_experts"),
                           ("routed_scaling_factor", "routed_scaling_factor"), ("q_lora_rank", "q_lora_rank")]:
        want = ref.rope_parameters["rope_theta"] if hf_name == "rope_theta" else getattr(ref, hf_name)
        assert getattr(ours, field) == want, field
    assert ours.eos_token_ids == (ref.eos_token_id,)
    assert ours.moe_layers == tuple(range(ref.first_k_dense_replace, ref.num_hidden_layers))
    if version == 3:
        assert (ours.n_group, ours.topk_group, ours.rope_interleave) == (ref.n_group, ref.topk_group, True)
    assert parse_hf_config({k: v for k, v in d.items() if k != "q_lora_rank"}).q_lora_rank is None


def test_the_mtp_layer_of_v3_is_skipped():
    """A V3-shaped config of 61 tiny layers: the tensors of layer 61 (the MTP module) are dropped
    with a reason, every decoder layer's are read."""
    cfg = parse_hf_config(transformers.DeepseekV3Config(**dict(TINY_DEEPSEEK, num_hidden_layers=61)).to_dict())
    names = {n for _, _, spec in schema.leaves(family(cfg.model_type).abstract(cfg))
             for n in (spec.hf_shapes("per_expert") if isinstance(spec, schema.Experts) else [spec.hf_name])}
    mtp = {"model.layers.61.eh_proj.weight", "model.layers.61.enorm.weight", "model.layers.61.shared_head.head.weight",
           "model.layers.61.self_attn.kv_b_proj.weight", "model.layers.61.mlp.experts.3.up_proj.weight"}
    plan = build_plan(cfg, names | mtp)
    assert plan.used_names() == names
    assert {n for n, _ in plan.skipped} == mtp
    assert all("multi-token-prediction" in why for _, why in plan.skipped)


def _config(version: int, **overrides) -> dict:
    return {**getattr(transformers, f"DeepseekV{version}Config")(**TINY_DEEPSEEK).to_dict(), **overrides}


@pytest.mark.parametrize("version, overrides, words", [
    (2, dict(moe_layer_freq=2), "moe_layer_freq=2"),
    (2, dict(mlp_bias=True), "mlp_bias=true"),
    (2, dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (3, dict(scoring_func="softmax"), "scoring_func='softmax' for deepseek_v3"),
    (2, dict(norm_topk_prob=True), "norm_topk_prob=true for deepseek_v2"),
    (2, dict(topk_method="noaux_tc"), "topk_method 'noaux_tc' is not supported for deepseek_v2"),
    (3, dict(topk_method="greedy"), "topk_method 'greedy' is not supported for deepseek_v3"),
    (2, dict(n_shared_experts=0), "n_shared_experts=0"),
], ids=["moe_layer_freq", "mlp_bias", "hidden_act", "scoring_func", "v2-norm_topk", "v2-noaux", "v3-greedy",
        "no-shared"])
def test_unsupported_options_are_refused(version, overrides, words):
    with pytest.raises(UnsupportedArchitectureError, match=re.escape(words)):
        parse_hf_config(_config(version, **overrides))


def test_fp8_weights_plan_a_budget_but_do_not_convert(tmp_path):
    """The released V3 config.json (FP8 weights with block scales) plans a budget, which needs no
    weights; converting it is refused before any tensor is read, naming the quantization."""
    fp8 = _config(3, quantization_config=dict(quant_method="fp8", weight_block_size=[128, 128], fmt="e4m3"))
    assert parse_hf_config(fp8).model_type == "deepseek_v3"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(fp8))
    with pytest.raises(UnsupportedArchitectureError,
                       match=re.escape("quantization_config (quant_method 'fp8', weight_block_size [128, 128])")):
        convert(tmp_path / "hf", tmp_path / "conv", progress=False)
    assert not (tmp_path / "conv").exists()


@pytest.mark.parametrize("version, overrides, words", [
    (2, dict(num_key_value_heads=2), "num_key_value_heads=2 must equal num_attention_heads=4"),
    (2, dict(topk_method="group_limited_greedy", n_group=3, topk_group=1), "n_group=3, topk_group=1 do not fit 8"),
    (3, dict(n_group=8, topk_group=2), "groups of at least 2"),
    (3, dict(n_group=4, topk_group=1, num_experts_per_tok=3), "hold fewer than num_experts_per_tok=3"),
    (2, dict(kv_lora_rank=0), "kv_lora_rank=0 must be positive"),
], ids=["kv_heads", "v2-groups", "v3-group_size", "v3-too_few", "kv_lora_rank"])
def test_inconsistent_configs_are_config_errors(version, overrides, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        parse_hf_config(_config(version, **overrides))


def test_softmax_scale_follows_mscale_all_dim():
    cfg = parse_hf_config(_config(3, rope_parameters=yarn(1.0, 0.707)))
    assert cfg.softmax_scale == pytest.approx(24 ** -0.5 * (0.1 * 0.707 * math.log(4.0) + 1) ** 2)
    assert parse_hf_config(_config(3)).softmax_scale == 24 ** -0.5

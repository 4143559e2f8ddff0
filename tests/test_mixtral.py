"""Mixtral against transformers.MixtralForCausalLM: the family suite (family_suite.py) on tiny random
models, every parameter perturbed; plus the config defaults, the router against HF's, the sliding
window (it must change the output, or the suite would not test it), the in-memory fused layout
under `mlp.`, and bad configs."""
import dataclasses
import shutil

import numpy as np
import pytest
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

import dynaexq_jax
from checkpoints_convert import convert
from checkpoints_convert.plan import build_plan
from checkpoints_convert.safetensors_reader import SafetensorsCheckpoint
from dynaexq_jax.errors import ConfigError, UnexpectedTensorError
from dynaexq_jax.model.config import parse_hf_config
from dynaexq_jax.model.families import mixtral
from tests.family_suite import LO, TOL, FamilySuite, assert_hf_defaults, assert_router_equals_hf, hf_logits, rel_err
from tests.hf_mixtral import make_tiny_mixtral
from tests.hf_models import _add_tensors

# The suite's shortest multi-token sequence is 12 tokens (incremental decode; the others are 17,
# 60 and prompt + 32 generated): every window below is shorter, so every test crosses it.
SUITE_MIN_TOKENS = 12


class TestMixtral(FamilySuite):
    CASES = {
        "window8": dict(sliding_window=8),
        "no_window+tied": dict(sliding_window=None, tie_word_embeddings=True),
        "fused+window5+shards+kv1": dict(layout="fused", sliding_window=5, max_shard_size="100KB",
                                         num_key_value_heads=1),
    }

    @staticmethod
    def build(tmp, seed, **options):
        # A larger init scale than HF's default keeps greedy generations from collapsing into one
        # repeated token, so that the 32-token comparison says something.
        return make_tiny_mixtral(tmp, seed=seed, initializer_range=0.08, **options)


def test_suite_sequences_cross_every_window():
    windows = [c["sliding_window"] for c in TestMixtral.CASES.values() if c["sliding_window"]]
    assert windows and max(windows) < SUITE_MIN_TOKENS


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory):
    """transformers' in-memory layout on disk (save_original_format=False: fused experts and the
    router under `mlp.`), a window of 6, converted and loaded."""
    tmp = tmp_path_factory.mktemp("in_memory")
    hf_dir, hf = make_tiny_mixtral(tmp, seed=5, layout="in_memory", sliding_window=6, initializer_range=0.08)
    return hf_dir, hf, dynaexq_jax.load(convert(hf_dir, tmp / "conv", lo=LO, progress=False))


def test_in_memory_layout_converts(in_memory):
    hf_dir, hf, ours = in_memory
    names = set(SafetensorsCheckpoint(hf_dir).tensors)
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and "model.layers.0.mlp.gate.weight" in names
    assert build_plan(ours.config, names).used_names() == names
    assert ours.checkpoint.metadata["expert_layout"] == "fused"
    ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, (2, 20))
    assert rel_err(ours.logits(ids), hf_logits(hf, ids)) <= TOL


def test_sliding_window_changes_the_output(in_memory):
    """Without the window our logits differ from HF's past the window: the window is applied, and
    applied as HF applies it."""
    _, hf, ours = in_memory
    cfg = ours.config
    assert cfg.sliding_window == 6
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 20))
    ref = hf_logits(hf, ids)
    full = dataclasses.replace(cfg, sliding_window=None)
    got, _, _ = mixtral.forward(ours.params, full, ids, mixtral.init_cache(full, 1, 32))
    got = np.asarray(got)
    assert rel_err(got[:, :6], ref[:, :6]) <= TOL          # within the window nothing changes
    assert rel_err(got, ref) > 1e-2


def test_router_matches_hf():
    """Softmax in f32 over all experts, top-2, always renormalised; probs: the selected experts'
    softmax scores before renormalisation (what hotness is measured from)."""
    hf_cfg = MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2)
    cfg = parse_hf_config(dict(model_type="mixtral", hidden_size=32, num_local_experts=8, num_experts_per_tok=2,
                               vocab_size=16, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2))
    assert_router_equals_hf(MixtralTopKRouter(hf_cfg), cfg)


def test_hf_defaults_for_omitted_keys():
    """Keys a config.json leaves out take MixtralConfig's defaults; norm_topk_prob is not a Mixtral
    option (the router always renormalises), so a stray one is ignored as HF ignores it."""
    ours, ref = parse_hf_config({"model_type": "mixtral", "norm_topk_prob": False}), MixtralConfig()
    assert ours.norm_topk_prob is True
    assert ours.moe_intermediate_size == ours.intermediate_size == ref.intermediate_size
    assert ours.head_dim == ref.hidden_size // ref.num_attention_heads
    assert ours.eos_token_ids == (ref.eos_token_id,)
    assert_hf_defaults(ours, ref, [("num_experts", "num_local_experts"), ("sliding_window", "sliding_window"),
                                   ("bos_token_id", "bos_token_id")])
    assert ours.moe_layers == tuple(range(ref.num_hidden_layers))


@pytest.mark.parametrize("window", [0, -4])
def test_bad_sliding_window_is_a_config_error(window):
    with pytest.raises(ConfigError, match=f"sliding_window={window} must be null or >= 1"):
        parse_hf_config({"model_type": "mixtral", "sliding_window": window})


def test_a_tensor_under_both_spellings_is_an_error(in_memory, tmp_path):
    """A checkpoint holding the router both as `mlp.gate.weight` and `block_sparse_moe.gate.weight`
    is ambiguous: the conversion names the tensor it does not use instead of picking one."""
    hf_dir, _, _ = in_memory
    copy = tmp_path / "both"
    shutil.copytree(hf_dir, copy)
    router = SafetensorsCheckpoint(copy).read("model.layers.0.mlp.gate.weight")
    _add_tensors(copy, {"model.layers.0.block_sparse_moe.gate.weight": np.array(router)})
    with pytest.raises(UnexpectedTensorError, match="model.layers.0.block_sparse_moe.gate.weight"):
        convert(copy, tmp_path / "conv", lo=LO, progress=False)
    assert not (tmp_path / "conv").exists()

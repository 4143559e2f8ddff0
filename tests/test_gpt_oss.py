"""gpt-oss against transformers.GptOssForCausalLM: the family suite (family_suite.py) on tiny random
models (every parameter perturbed), and what is gpt-oss's own: config defaults, the router, YaRN
with truncate=false, the clamped SwiGLU really clamping, the MXFP4 reader, bad input."""
import json

import numpy as np
import pytest
import safetensors.numpy as stn
import torch

import dynaexq_jax
from checkpoints_convert import convert
from dynaexq_jax.errors import ConfigError, TensorShapeError, UnsupportedArchitectureError
from dynaexq_jax.model.config import load_hf_config, parse_hf_config
from dynaexq_jax.model.families import gpt_oss, schema
from dynaexq_jax.model.quant import parse_format
from dynaexq_jax.model.rope import config_table
from dynaexq_jax.serving.checkpoint import load_checkpoint
from tests.family_suite import LO, FamilySuite
from tests.hf_gpt_oss import TINY_GPT_OSS, hf_dequantize_mxfp4, make_tiny_gpt_oss, published_config, random_mxfp4

YARN = dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
            original_max_position_embeddings=16, rope_theta=150000.0)
FULL, SLIDING = "full_attention", "sliding_attention"


class TestGptOss(FamilySuite):
    CASES = {
        # gpt-oss-20b's shape of things: alternating sliding (a window of 4, shorter than the test
        # sequences) and full attention, sinks, attention and expert biases, HF's default YaRN.
        "20b-like": dict(),
        # YaRN that changes the frequencies (truncate=false) and a swiglu_limit that clamps a large
        # share of the gate and up activations (test_tight_limit_clamps_bite).
        "yarn+tight_limit": dict(rope_parameters=YARN, swiglu_limit=0.3, num_experts_per_tok=3),
        # the experts as the released checkpoints ship them: MXFP4 blocks and e8m0 scales.
        "mxfp4+plain_rope": dict(mxfp4=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                                 sliding_window=8),
        "no_attn_bias+layer_types": dict(attention_bias=False, layer_types=[FULL, SLIDING, SLIDING, FULL],
                                         sliding_window=3),
    }

    @staticmethod
    def build(tmp, seed, **options):
        # A larger init scale than HF's default keeps greedy generations from collapsing into one
        # repeated token, so that the 32-token comparison says something.
        return make_tiny_gpt_oss(tmp, seed=seed, initializer_range=0.08, **options)


def test_config_defaults_are_gpt_oss_configs():
    """A config.json with only model_type is GptOssConfig()'s model (its computed defaults included)."""
    from transformers import GptOssConfig
    ref = GptOssConfig()
    cfg = parse_hf_config({"model_type": "gpt_oss"})
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == \
        (ref.vocab_size, ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads,
         ref.head_dim)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == \
        (ref.num_local_experts, ref.num_experts_per_tok, ref.intermediate_size)
    assert cfg.moe_layers == tuple(range(ref.num_hidden_layers)) and not cfg.dense_layers
    assert cfg.layer_types == tuple(ref.layer_types) and cfg.sliding_window == ref.sliding_window
    assert (cfg.swiglu_alpha, cfg.swiglu_limit, cfg.attention_bias, cfg.rms_norm_eps, cfg.tie_word_embeddings) == \
        (ref.swiglu_alpha, ref.swiglu_limit, ref.attention_bias, ref.rms_norm_eps, ref.tie_word_embeddings)
    assert cfg.max_position_embeddings == ref.max_position_embeddings
    params = dict(ref.rope_parameters)
    assert cfg.rope_theta == params.pop("rope_theta") and dict(cfg.rope_scaling) == params


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_published_configs_parse_like_transformers(name):
    from transformers import GptOssConfig
    d = published_config(name)
    cfg, ref = parse_hf_config(d), GptOssConfig(**d)
    assert (cfg.num_layers, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size) == \
        (ref.num_hidden_layers, ref.num_local_experts, ref.hidden_size, ref.intermediate_size)
    assert cfg.layer_types == tuple(ref.layer_types) and cfg.sliding_window == 128
    assert dict(cfg.rope_scaling)["truncate"] is False


@pytest.mark.parametrize("rope_parameters", [None, YARN], ids=["default-yarn", "tiny-yarn"])
def test_yarn_table_is_transformers(rope_parameters):
    """rope.py's YaRN with truncate=false (gpt-oss's) against transformers' inv_freq and scaling."""
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = GptOssConfig(**TINY_GPT_OSS, rope_parameters=rope_parameters)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    table = config_table(parse_hf_config(hf.to_dict()))
    np.testing.assert_allclose(table.inv_freq, inv_freq.numpy(), rtol=1e-6)
    assert table.attention_factor == pytest.approx(factor, rel=1e-6)


def test_router_is_transformers_router():
    """Top-k of the biased logits, softmax over those k: ids and weights as GptOssTopKRouter's."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
    hf_cfg = GptOssConfig(**{**TINY_GPT_OSS, "num_experts_per_tok": 3})
    torch.manual_seed(0)
    router = GptOssTopKRouter(hf_cfg)
    with torch.no_grad():
        router.weight.normal_()
        router.bias.normal_()
    x = torch.randn(7, hf_cfg.hidden_size)
    with torch.no_grad():
        _, scores, ids = router(x)
    p = gpt_oss.GptOssMoE(router=router.weight.detach().numpy().T, experts=None,
                          router_bias=router.bias.detach().numpy())
    got_ids, got_w, got_probs = gpt_oss.route(p, parse_hf_config(hf_cfg.to_dict()), x.numpy())
    np.testing.assert_array_equal(np.asarray(got_ids), ids.numpy())
    np.testing.assert_allclose(np.asarray(got_w), scores.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_probs), scores.numpy(), rtol=1e-5)


def test_tight_limit_clamps_bite(tmp_path):
    """In the "yarn+tight_limit" case a good share of the experts' gate and up activations lie
    beyond swiglu_limit, so the parity tests of that case test the clamps."""
    options = TestGptOss.CASES["yarn+tight_limit"]
    _, hf = TestGptOss.build(tmp_path, seed=len("yarn+tight_limit"), **options)
    limit, seen = options["swiglu_limit"], []
    experts = hf.model.layers[1].mlp.experts
    handle = experts.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        hf(torch.tensor(np.random.default_rng(0).integers(0, 256, (2, 13))))
    handle.remove()
    gate_up = torch.einsum("th,ehn->etn", seen[0], experts.gate_up_proj) + experts.gate_up_proj_bias[:, None]
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    assert 0.1 < float((gate > limit).float().mean()) < 0.9
    assert 0.1 < float((up.abs() > limit).float().mean()) < 0.9


def test_mxfp4_dequantization_is_transformers_and_by_hand():
    rng = np.random.default_rng(0)
    blocks, scales = random_mxfp4(rng, (3, 8, 64), scale_exp=(-3, 3))
    got = gpt_oss.dequantize_mxfp4(blocks, scales)                       # [3, 8, 64], output-major rows
    np.testing.assert_array_equal(got.transpose(0, 2, 1), hf_dequantize_mxfp4(blocks, scales))
    fp4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    e, n, g, j = 2, 5, 1, 7
    byte, exp = int(blocks[e, n, g, j]), 2.0 ** (int(scales[e, n, g]) - 127)
    for nibble, col in ((byte & 15, g * 32 + 2 * j), (byte >> 4, g * 32 + 2 * j + 1)):
        want = (-1 if nibble & 8 else 1) * fp4[nibble & 7] * exp
        assert got[e, n, col] == want


def test_mxfp4_checkpoint_converts_to_its_exact_values(tmp_path):
    """The HI tier (hi=f32) holds exactly transformers' dequantized MXFP4 experts, and `source`
    for MXFP4 experts is the dense tensors' float format (bf16 holds every MXFP4 value)."""
    hf_dir, hf = make_tiny_gpt_oss(tmp_path, seed=5, mxfp4=True, num_hidden_layers=2,
                                   layer_types=[SLIDING, FULL])
    names = set(stn.load_file(hf_dir / "model.safetensors"))
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in names and \
        "model.layers.0.mlp.experts.gate_up_proj" not in names
    ckpt = load_checkpoint(convert(hf_dir, tmp_path / "conv", hi="f32", lo=LO, progress=False))
    assert ckpt.metadata["expert_layout"] == "mxfp4" and ckpt.metadata["source_dtype"] == "f32"
    for i, layer in enumerate(hf.model.layers):
        hi, ex = ckpt.experts[i]["hi"], layer.mlp.experts
        gate_up = ex.gate_up_proj.detach().numpy()
        np.testing.assert_array_equal(hi.gate.data, gate_up[..., ::2])
        np.testing.assert_array_equal(hi.up.data, gate_up[..., 1::2])
        np.testing.assert_array_equal(hi.down.data, ex.down_proj.detach().numpy())
        bias = ex.gate_up_proj_bias.detach().numpy()
        for tier in ("hi", "lo"):       # the float biases travel in both tiers
            pool = ckpt.experts[i][tier]
            np.testing.assert_array_equal(pool.gate_bias, bias[:, ::2])
            np.testing.assert_array_equal(pool.up_bias, bias[:, 1::2])
            np.testing.assert_array_equal(pool.down_bias, ex.down_proj_bias.detach().numpy())


def test_tier_bytes_count_the_expert_biases(tmp_path):
    hf_dir, _ = make_tiny_gpt_oss(tmp_path, seed=6, num_hidden_layers=2)
    ckpt = load_checkpoint(convert(hf_dir, tmp_path / "conv", lo=LO, progress=False))
    cfg = ckpt.config
    for tier, fmt in ckpt.tiers.items():
        pool = ckpt.experts[0][tier]
        assert pool.has_bias and pool.nbytes == cfg.num_experts * schema.expert_bytes(cfg, fmt)
    assert schema.expert_bytes(cfg, ckpt.tiers["hi"]) - (2 * 32 * 64 * 4 + 32 * 64 * 4) == (2 * 32 + 64) * 4


def test_bad_input_is_a_typed_error(tmp_path):
    base = {"model_type": "gpt_oss", **TINY_GPT_OSS}
    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    (fp8 / "config.json").write_text(json.dumps({**base, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(UnsupportedArchitectureError, match=r"quant_method 'fp8'.*\(this family reads: mxfp4\)"):
        convert(fp8, tmp_path / "conv", progress=False)
    with pytest.raises(ConfigError, match="sliding_window=0"):
        parse_hf_config({**base, "sliding_window": 0})
    with pytest.raises(ConfigError, match="swiglu_limit=0.0"):
        parse_hf_config({**base, "swiglu_limit": 0.0})
    with pytest.raises(UnsupportedArchitectureError, match="layer type"):
        parse_hf_config({**base, "layer_types": [FULL, "linear_attention", FULL, FULL]})
    # MXFP4 blocks that are not uint8 are named before anything is written.
    hf_dir, _ = make_tiny_gpt_oss(tmp_path, seed=7, mxfp4=True, num_hidden_layers=2, layer_types=[SLIDING, FULL])
    f = hf_dir / "model.safetensors"
    tensors = stn.load_file(f)
    name = "model.layers.1.mlp.experts.down_proj_scales"
    tensors[name] = tensors[name].astype(np.float32)
    stn.save_file(tensors, f)
    with pytest.raises(TensorShapeError, match=f"'{name}' has dtype F32, expected U8"):
        convert(hf_dir, tmp_path / "conv", progress=False)
    assert not (tmp_path / "conv").exists()


def test_info_and_budget_of_a_converted_checkpoint(tmp_path, capsys):
    from dynaexq_jax.cli import main
    hf_dir, _ = make_tiny_gpt_oss(tmp_path, seed=8, num_hidden_layers=2)
    out = convert(hf_dir, tmp_path / "conv", lo=LO, progress=False)
    assert main(["info", str(out)]) == 0
    assert "gpt_oss" in capsys.readouterr().out
    cfg = load_hf_config(hf_dir)
    assert cfg == dynaexq_jax.load(out).config       # the family's Config, restored from the metadata
    assert main(["budget", str(out), "--budget", "64MiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["feasible"], plan["error"]
    assert plan["expert_hi_bytes"] == schema.expert_bytes(cfg, parse_format("f32"))

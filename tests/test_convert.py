"""HF -> converted checkpoint -> reader round trips on tiny random Qwen3-MoE models."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as stn

import checkpoints_convert.converter as converter
from checkpoints_convert import convert
from dynaexq_jax.errors import ConfigError
from dynaexq_jax.model.config import parse_hf_config
from dynaexq_jax.model.layers import DenseMLP, MoE
from dynaexq_jax.model.moe import single_tier
from dynaexq_jax.model.quant import TierFormat, parse_format, parse_tier_format, quantize
from dynaexq_jax.serving.checkpoint import FORMAT_VERSION, attach_experts, load_checkpoint
from tests.hf_models import make_tiny_qwen3_moe

LO = "int4:g32"  # the tiny model's H=64, I=32: the default int4 group (128) does not divide them

CASES = {
    "single_file": dict(seed=1, norm_topk_prob=True),
    "shards_fused": dict(seed=2, norm_topk_prob=False, layout="fused", max_shard_size="40KB"),
    "shards_mlp_only_bias": dict(seed=3, norm_topk_prob=True, mlp_only_layers=(1,), max_shard_size="40KB",
                                 attention_bias=True),
    "tied_sparse_step": dict(seed=4, norm_topk_prob=False, tie_word_embeddings=True, decoder_sparse_step=2),
}


@pytest.fixture(scope="module", params=list(CASES))
def tiny(request, tmp_path_factory):
    hf_dir, model = make_tiny_qwen3_moe(tmp_path_factory.mktemp(request.param), **CASES[request.param])
    return request.param, hf_dir, model


def hf_expected(model, cfg):
    """What the reader must return, computed from the HF model's own state_dict (transformers 5
    holds experts fused in memory; transformers 4 per expert)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    E, I = cfg.num_experts, cfg.moe_intermediate_size
    dense = {"embed": sd["model.embed_tokens.weight"], "final_norm": sd["model.norm.weight"],
             "lm_head": None if cfg.tie_word_embeddings else sd["lm_head.weight"].T}
    layers, experts = [], {}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        t = {"input_norm": sd[p + "input_layernorm.weight"], "post_norm": sd[p + "post_attention_layernorm.weight"],
             "q_norm": sd[p + "self_attn.q_norm.weight"], "k_norm": sd[p + "self_attn.k_norm.weight"]}
        for x in "qkvo":
            t[x] = sd[f"{p}self_attn.{x}_proj.weight"].T
            t[x + "_bias"] = sd.get(f"{p}self_attn.{x}_proj.bias")
        if cfg.is_moe_layer(i):
            t["router"] = sd[p + "mlp.gate.weight"].T
            if p + "mlp.experts.gate_up_proj" in sd:
                gu, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
                gate, up = gu[:, :I], gu[:, I:]
            else:
                gate, up, down = (np.stack([sd[f"{p}mlp.experts.{e}.{n}_proj.weight"] for e in range(E)])
                                  for n in ("gate", "up", "down"))
            experts[i] = {"gate": gate.transpose(0, 2, 1), "up": up.transpose(0, 2, 1), "down": down.transpose(0, 2, 1)}
        else:
            for x in ("gate", "up", "down"):
                t[x] = sd[f"{p}mlp.{x}_proj.weight"].T
        layers.append(t)
    return dense, layers, experts


def assert_params_equal(params, dense, layers, dtype):
    def eq(got, want):
        if want is None:
            assert got is None
            return
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, want.astype(dtype))
    eq(params.embed, dense["embed"])
    eq(params.final_norm, dense["final_norm"])
    eq(params.lm_head, dense["lm_head"])
    assert len(params.layers) == len(layers)
    for layer, want in zip(params.layers, layers):
        eq(layer.input_norm, want["input_norm"])
        eq(layer.post_norm, want["post_norm"])
        for x in ("q", "k", "v", "o", "q_norm", "k_norm", "q_bias", "k_bias", "v_bias", "o_bias"):
            eq(getattr(layer.attn, x), want[x])
        if "router" in want:
            assert isinstance(layer.mlp, MoE) and layer.mlp.experts is None
            eq(layer.mlp.router, want["router"])
        else:
            assert isinstance(layer.mlp, DenseMLP)
            for x in ("gate", "up", "down"):
                eq(getattr(layer.mlp, x), want[x])


def assert_pool_equals_quantized(pool, stacks, tier):
    tier = parse_tier_format(tier)
    assert pool.fmt == tier and pool.size == stacks["gate"].shape[0]
    for x in ("gate", "up", "down"):
        fmt = tier.of(x)
        got, want = getattr(pool, x), quantize(stacks[x], fmt)
        assert got.fmt == fmt
        np.testing.assert_array_equal(np.asarray(got.data), np.asarray(want.data))
        if fmt.is_int:
            np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(want.scales))
        else:
            assert got.scales is None
        if fmt.has_zeros:
            np.testing.assert_array_equal(np.asarray(got.zeros), np.asarray(want.zeros))
        else:
            assert got.zeros is None


def test_round_trip(tiny, tmp_path, monkeypatch):
    name, hf_dir, model = tiny
    # Quantize two experts at a time so the chunked path is checked against whole-stack quantize.
    monkeypatch.setattr(converter, "_CHUNK_ELEMS", 2 * 3 * 64 * 32)
    out = convert(hf_dir, tmp_path / "out", lo=LO, progress=False)
    assert out == tmp_path / "out"
    ckpt = load_checkpoint(out)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    cfg = parse_hf_config(hf_config)
    assert ckpt.config == cfg
    assert ckpt.hf_config == hf_config
    dense, layers, experts = hf_expected(model, cfg)
    assert_params_equal(ckpt.params, dense, layers, np.float32)

    assert ckpt.tiers == {"hi": parse_tier_format("f32"), "lo": parse_tier_format(LO)}
    assert sorted(ckpt.experts) == sorted(cfg.moe_layers) == sorted(experts)
    for i, stacks in experts.items():
        assert_pool_equals_quantized(ckpt.experts[i]["hi"], stacks, ckpt.tiers["hi"])
        assert_pool_equals_quantized(ckpt.experts[i]["lo"], stacks, ckpt.tiers["lo"])
        np.testing.assert_array_equal(ckpt.experts[i]["hi"].gate.data, stacks["gate"])  # hi=source is exact

    meta = ckpt.metadata
    assert meta["format_version"] == FORMAT_VERSION == 2 and meta["model_type"] == "qwen3_moe"
    assert meta["tiers"] == {"hi": "f32", "lo": "int4:g32"} and meta["dtype"] == "f32"
    assert meta["config"] == cfg.to_dict() or meta["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert meta["expert_layout"] == CASES[name].get("layout", "per_expert")
    shards = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    assert sorted(f for f in meta["sources"] if f.endswith(".safetensors")) == shards
    assert all(len(h) == 64 for h in meta["sources"].values())
    assert "config.json" in meta["sources"]
    assert meta["skipped"] == []
    for f in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (out / f).read_bytes() == (hf_dir / f).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_layouts_on_disk(tmp_path):
    """per_expert and fused checkpoints hold what their names say, and both load in transformers."""
    import torch
    from transformers import Qwen3MoeForCausalLM
    for layout in ("per_expert", "fused"):
        hf_dir, model = make_tiny_qwen3_moe(tmp_path / layout, seed=5, norm_topk_prob=True, layout=layout)
        names = stn.load_file(hf_dir / "model.safetensors").keys()
        fused = "model.layers.0.mlp.experts.gate_up_proj" in names
        assert fused == (layout == "fused")
        assert ("model.layers.0.mlp.experts.7.down_proj.weight" in names) == (layout == "per_expert")
        again = Qwen3MoeForCausalLM.from_pretrained(hf_dir).state_dict()
        for k, v in model.state_dict().items():
            torch.testing.assert_close(again[k], v, rtol=0, atol=0)


def test_other_formats_and_bf16_source(tmp_path):
    hf_dir, model = make_tiny_qwen3_moe(tmp_path, seed=6, norm_topk_prob=True, max_shard_size="40KB")
    cfg = parse_hf_config(json.loads((hf_dir / "config.json").read_text()))
    dense, layers, experts = hf_expected(model, cfg)

    ckpt = load_checkpoint(convert(hf_dir, tmp_path / "a", hi="int8:g16", lo="int2:g16", dtype="bf16", progress=False))
    assert ckpt.metadata["dtype"] == "bf16" and ckpt.metadata["source_dtype"] == "f32"
    assert_params_equal(ckpt.params, dense, layers, ml_dtypes.bfloat16)
    for i, stacks in experts.items():
        assert_pool_equals_quantized(ckpt.experts[i]["hi"], stacks, parse_format("int8:g16"))
        assert_pool_equals_quantized(ckpt.experts[i]["lo"], stacks, parse_format("int2:g16"))

    # The mse and hqq quantizers, named by the format's suffix, recorded in the metadata and read
    # back (hqq's zeros as one more tensor per projection).
    ckpt = load_checkpoint(convert(hf_dir, tmp_path / "m", hi="int4:g16:mse", lo="int2:hqq", progress=False))
    # (int2's default group 64, fitted to the tiny model's dimensions: 32.)
    assert ckpt.tiers["hi"].name == "int4:g16:mse" and ckpt.tiers["lo"] == parse_tier_format("int2:g32:hqq")
    assert ckpt.metadata["tiers"]["lo"] == "int2:g32:hqq"
    for i, stacks in experts.items():
        assert_pool_equals_quantized(ckpt.experts[i]["hi"], stacks, parse_format("int4:g16:mse"))
        assert_pool_equals_quantized(ckpt.experts[i]["lo"], stacks, parse_format("int2:g32:hqq"))

    # Per-projection tiers: down in its own format, its default group fitted to the dimension it
    # reduces over (I = 32) alone, the note saying so; the files hold each projection's tensors.
    ckpt = load_checkpoint(convert(hf_dir, tmp_path / "p", hi="bf16+down=f32", lo="int2:g16:hqq+down=int4",
                                   progress=False))
    assert ckpt.metadata["tiers"] == {"hi": "bf16+down=f32", "lo": "int2:g16:hqq+down=int4:g32"}
    assert ckpt.metadata["tier_notes"] == {"lo": "down int4: the default group 128 does not divide the expert "
                                                 "dimensions 32; group 32 used"}
    assert ckpt.tiers["lo"] == TierFormat(parse_format("int2:g16:hqq"), parse_format("int4:g32"))
    for i, stacks in experts.items():
        assert_pool_equals_quantized(ckpt.experts[i]["hi"], stacks, "bf16+down=f32")
        assert_pool_equals_quantized(ckpt.experts[i]["lo"], stacks, "int2:g16:hqq+down=int4:g32")

    # A bf16 checkpoint: "source" means bf16 for the hi tier and the dense params.
    for shard in hf_dir.glob("*.safetensors"):
        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in stn.load_file(shard).items()}
        stn.save_file(tensors, shard, metadata={"format": "pt"})
    ckpt = load_checkpoint(convert(hf_dir, tmp_path / "b", lo="int4:g16", progress=False))
    assert ckpt.metadata["source_dtype"] == "bf16" and ckpt.metadata["dtype"] == "bf16"
    assert ckpt.tiers["hi"] == parse_tier_format("bf16")
    assert_params_equal(ckpt.params, dense, layers, ml_dtypes.bfloat16)
    for i, stacks in experts.items():
        bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in stacks.items()}
        assert_pool_equals_quantized(ckpt.experts[i]["hi"], bf, parse_format("bf16"))
        assert_pool_equals_quantized(ckpt.experts[i]["lo"], bf, parse_format("int4:g16"))


def test_tied_head_and_rotary_buffers_are_skipped(tmp_path):
    hf_dir, model = make_tiny_qwen3_moe(tmp_path, seed=7, norm_topk_prob=True, tie_word_embeddings=True)
    f = hf_dir / "model.safetensors"
    tensors = stn.load_file(f)
    assert "lm_head.weight" not in tensors  # transformers drops the tied copy
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    tensors["model.layers.1.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # older exports have these
    stn.save_file(tensors, f, metadata={"format": "pt"})
    ckpt = load_checkpoint(convert(hf_dir, tmp_path / "out", lo=LO, progress=False))
    assert ckpt.params.lm_head is None
    skipped = {s["name"]: s["reason"] for s in ckpt.metadata["skipped"]}
    assert sorted(skipped) == ["lm_head.weight", "model.layers.1.self_attn.rotary_emb.inv_freq"]
    assert "tie_word_embeddings" in skipped["lm_head.weight"]


def test_overwrite_progress_and_attach(tmp_path, capsys):
    hf_dir, _ = make_tiny_qwen3_moe(tmp_path, seed=8, norm_topk_prob=True, mlp_only_layers=(0,))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert(hf_dir, out, lo=LO, overwrite=True, progress=True)
    assert not (out / "stale.txt").exists() and (out / "metadata.json").exists()
    assert "layers/003" in capsys.readouterr().err  # the tqdm bar names the layer it is on
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]

    ckpt = load_checkpoint(out)
    pools = {i: single_tier(tiers["lo"]) for i, tiers in ckpt.experts.items()}
    params = attach_experts(ckpt.params, pools)
    for i, layer in enumerate(params.layers):
        assert (layer.mlp.experts is pools[i]) if i in pools else isinstance(layer.mlp, DenseMLP)
    assert all(layer.mlp.experts is None for layer in ckpt.params.layers if isinstance(layer.mlp, MoE))
    with pytest.raises(ConfigError, match="layer 0 is not an MoE layer"):
        attach_experts(ckpt.params, {0: pools[1]})

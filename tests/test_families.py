"""One schema per model family drives everything: its HF names and shapes are what transformers
saves, the conversion plan reads exactly them, restore returns them transformed, init builds its
shapes, HF export inverts it (transformers loads the export), random HF checkpoints of any family
convert; one registry says what is supported. Plus the default-group defect of `dynaexq convert`."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as stn

import dynaexq_jax
from checkpoints_convert import convert
from checkpoints_convert.plan import build_plan
from checkpoints_convert.safetensors_reader import SafetensorsCheckpoint
from dynaexq_jax.errors import QuantFormatError, UnsupportedArchitectureError
from dynaexq_jax.experiments import default_model
from dynaexq_jax.experiments.synthetic import qwen3_moe_config, save_safetensors, write_random_checkpoint
from dynaexq_jax.experiments.training import hf_state_dict, init_trainable, serving_params
from dynaexq_jax.model.config import load_hf_config, parse_hf_config
from dynaexq_jax.model.families import FAMILIES, family, schema
from dynaexq_jax.model.quant import Format, TierFormat, expert_nbytes, parse_tier_format
from dynaexq_jax.serving.checkpoint import load_checkpoint
from tests.hf_deepseek import TINY_DEEPSEEK, make_tiny_deepseek
from tests.hf_gpt_oss import TINY_GPT_OSS, make_tiny_gpt_oss
from tests.hf_mixtral import TINY_MIXTRAL, make_tiny_mixtral
from tests.hf_models import TINY_QWEN3_MOE, TINY_QWEN3_NEXT, make_tiny_qwen3_moe, make_tiny_qwen3_next
from tests.hf_olmoe import TINY_OLMOE, make_tiny_olmoe
from tests.hf_phimoe import TINY_PHIMOE, longrope, make_tiny_phimoe
from tests.hf_qwen2_moe import TINY_QWEN2_MOE, make_tiny_qwen2_moe

# Both families with a dense layer, an untied head and biases where the family has them, so that
# every kind of schema leaf occurs.
HF_MODELS = {
    "qwen3_moe": lambda tmp, **kw: make_tiny_qwen3_moe(tmp, seed=21, norm_topk_prob=True, mlp_only_layers=(1,),
                                                       attention_bias=True, **kw),
    "qwen3_next": lambda tmp, **kw: make_tiny_qwen3_next(tmp, seed=22, full_attention_interval=2, mlp_only_layers=[1],
                                                         attention_bias=True, **kw),
    "phimoe": lambda tmp, **kw: make_tiny_phimoe(tmp, seed=24, attention_bias=True, lm_head_bias=True,
                                                 rope_parameters=longrope(16), **kw),
    "mixtral": lambda tmp, **kw: make_tiny_mixtral(tmp, seed=26, sliding_window=8, **kw),
    "olmoe": lambda tmp, **kw: make_tiny_olmoe(tmp, seed=27, attention_bias=True, clip_qkv=4.0, **kw),
    "qwen2_moe": lambda tmp, **kw: make_tiny_qwen2_moe(tmp, seed=28, mlp_only_layers=[1], **kw),
    "deepseek_v2": lambda tmp, **kw: make_tiny_deepseek(tmp, seed=29, version=2, q_lora_rank=None, attention_bias=True,
                                                        **kw),
    "deepseek_v3": lambda tmp, **kw: make_tiny_deepseek(tmp, seed=30, version=3, q_lora_rank=24, attention_bias=True,
                                                        **kw),
    "gpt_oss": lambda tmp, **kw: make_tiny_gpt_oss(tmp, seed=31, **kw),
}


@pytest.fixture(scope="module", params=list(HF_MODELS))
def hf(request, tmp_path_factory):
    """(HF directory, transformers model, our config) of one family, per-expert layout on disk."""
    hf_dir, model = HF_MODELS[request.param](tmp_path_factory.mktemp(request.param))
    return hf_dir, model, load_hf_config(hf_dir)


def schema_hf_shapes(cfg, layout=None) -> dict[str, tuple]:
    """Every HF tensor the family's schema names, with its HF shape (experts in `layout`, default
    the one transformers saves)."""
    out = {}
    for _, _, spec in schema.leaves(family(cfg.model_type).abstract(cfg)):
        out.update(spec.hf_shapes(layout or spec.saved_layout) if isinstance(spec, schema.Experts)
                   else {spec.hf_name: spec.hf_shape})
    return out


def test_schema_names_and_shapes_are_what_transformers_saves(hf):
    hf_dir, _, cfg = hf
    saved = {n: t.shape for n, t in SafetensorsCheckpoint(hf_dir).tensors.items()}
    assert saved == schema_hf_shapes(cfg)


def test_conversion_plan_reads_exactly_the_schema_names(hf):
    """In every HF layout the family's experts have (per expert and fused; gpt-oss: fused and mxfp4)."""
    _, _, cfg = hf
    layouts = next(s for _, _, s in schema.leaves(family(cfg.model_type).abstract(cfg))
                   if isinstance(s, schema.Experts)).LAYOUTS
    assert len(layouts) == 2
    for layout in layouts:
        names = schema_hf_shapes(cfg, layout)
        plan = build_plan(cfg, list(names) + ["model.layers.0.self_attn.rotary_emb.inv_freq"])
        assert plan.used_names() == set(names)
        assert {s: shape for g in plan.groups for e in g.all_entries for s, shape in zip(e.sources, e.shapes)} == names
        assert [n for n, _ in plan.skipped] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
        assert plan.info["expert_layout"] == layout


def test_restore_of_a_converted_checkpoint_equals_the_source(hf, tmp_path):
    hf_dir, _, cfg = hf
    src = SafetensorsCheckpoint(hf_dir)
    ckpt = load_checkpoint(convert(hf_dir, tmp_path / "conv", lo="int4:g16", progress=False))
    tree = family(cfg.model_type).abstract(cfg)
    n_experts = 0
    for (layer, key, spec), got in zip(schema.leaves(tree), schema.values(tree, ckpt.params)):
        if isinstance(spec, schema.Experts):
            assert got is None                       # experts live in the tiers, not the dense params
            want = spec.from_hf(spec.saved_layout, src.read)
            hi = ckpt.experts[layer]["hi"]          # hi = the f32 source: exact
            for proj in schema.PROJECTIONS:
                np.testing.assert_array_equal(getattr(hi, proj).data, want[proj])
            n_experts += 1
        else:
            np.testing.assert_array_equal(got, spec.from_hf(src.read(spec.hf_name)), err_msg=f"{layer} {key}")
    assert n_experts == len(cfg.moe_layers) == len(ckpt.experts) > 0


def test_disk_keys_of_the_dense_trees_stay_those_of_format_version_1(tmp_path):
    """The tree path of a leaf is its key on disk; these keys are format version 1's (version 2 moved only the
    experts) and must not move."""
    import orbax.checkpoint as ocp
    hf_dir, _ = make_tiny_qwen3_next(tmp_path, seed=23, num_hidden_layers=2, full_attention_interval=2, noise=False)
    out = convert(hf_dir, tmp_path / "conv", lo="int4:g16", progress=False)
    assert json.loads((out / "metadata.json").read_text())["format_version"] == 2

    def keys(tree, prefix=""):
        return sorted(k for n, v in tree.items() for k in (keys(v, f"{prefix}{n}.") if isinstance(v, dict)
                                                            else [prefix + n]))
    with ocp.StandardCheckpointer() as c:
        dense, linear, full = (keys(c.restore((out / rel).absolute())) for rel in ("dense", "layers/000", "layers/001"))
    assert dense == ["embed", "final_norm", "lm_head"]
    mlp = ["mlp.router", "mlp.shared.down", "mlp.shared.gate", "mlp.shared.up", "mlp.shared_gate", "post_norm"]
    assert linear == ["input_norm"] + [f"linear_attn.{k}" for k in ("A_log", "conv", "dt_bias", "in_ba", "in_qkvz",
                                                                    "norm", "out")] + mlp
    assert full == [f"attn.{k}" for k in ("k", "k_norm", "o", "q", "q_norm", "v")] + ["input_norm"] + mlp


def test_init_builds_the_schema_shapes(hf):
    _, _, cfg = hf
    t = init_trainable(cfg, seed=0)
    tree = family(cfg.model_type).abstract(cfg)
    for (layer, key, spec), value in zip(schema.leaves(tree), schema.values(tree, t.params)):
        if isinstance(spec, schema.Experts):
            assert value is None
            assert tuple(x.shape for x in t.experts[layer]) == tuple(spec.shapes.values())
        else:
            assert value.shape == spec.shape, (layer, key)
    assert sorted(t.experts) == list(cfg.moe_layers)


def test_hf_export_loads_in_transformers_with_our_logits(hf, tmp_path):
    """Every initialised tensor perturbed (norms start at their identity, where a swapped or
    mis-transformed one would not show), exported through the schema's inverse transforms."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_dir, _, cfg = hf
    t = init_trainable(cfg, seed=1)
    keys = iter(jax.random.split(jax.random.PRNGKey(2), len(jax.tree.leaves(t))))
    t = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape), t)
    save_safetensors(hf_state_dict(t, cfg, dtype=np.float32).items(), tmp_path)
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        want = ref(torch.tensor(tokens)).logits.numpy()
    fam = family(cfg.model_type)
    got, _, _ = fam.forward(serving_params(t), cfg, jnp.asarray(tokens), fam.init_cache(cfg, 2, 16))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("family_config", [
    qwen3_moe_config(**TINY_QWEN3_MOE, mlp_only_layers=[2], attention_bias=True),
    dict(model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"], rope_theta=10000.0, eos_token_id=0,
         full_attention_interval=2, decoder_sparse_step=1, mlp_only_layers=[1], attention_bias=True,
         **TINY_QWEN3_NEXT),
    dict(model_type="phimoe", architectures=["PhimoeForCausalLM"], rope_theta=10000.0, eos_token_id=0,
         attention_bias=True, lm_head_bias=True, **TINY_PHIMOE),
    dict(model_type="mixtral", architectures=["MixtralForCausalLM"], rope_theta=10000.0, eos_token_id=0,
         sliding_window=8, **TINY_MIXTRAL),
    dict(model_type="olmoe", architectures=["OlmoeForCausalLM"], rope_theta=10000.0, attention_bias=True,
         clip_qkv=4.0, **TINY_OLMOE),
    dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], rope_theta=10000.0, eos_token_id=0,
         mlp_only_layers=[1], **TINY_QWEN2_MOE),
    dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], rope_theta=10000.0, eos_token_id=0,
         q_lora_rank=24, attention_bias=True, **TINY_DEEPSEEK),
    dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], **TINY_GPT_OSS),
], ids=["qwen3_moe", "qwen3_next", "phimoe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_random_checkpoints_of_every_family_convert(tmp_path, family_config):
    hf_dir = write_random_checkpoint(tmp_path / "hf", family_config, seed=4, tokenizer=False)
    cfg = parse_hf_config(family_config)
    assert set(stn.load_file(hf_dir / "model.safetensors")) == set(schema_hf_shapes(cfg))
    model = dynaexq_jax.load(convert(hf_dir, tmp_path / "conv", lo="int4:g16", progress=False))
    logits = model.logits(np.arange(12)[None])
    assert logits.shape == (1, 12, cfg.vocab_size) and np.isfinite(logits).all()
    assert logits.std() > 0.1       # random weights at a fan-in scale give logits that vary


def test_unsupported_family_names_the_supported_ones(tmp_path):
    supported = re.escape(f"(supported: {', '.join(FAMILIES)})")
    assert {"qwen3_moe", "qwen3_next"} <= set(FAMILIES) and "llama" not in FAMILIES
    for fail in (lambda: family("llama"), lambda: parse_hf_config({"model_type": "llama", "hidden_size": 8})):
        with pytest.raises(UnsupportedArchitectureError, match=rf"model_type 'llama' is not supported {supported}"):
            fail()
    hf_dir, _ = make_tiny_qwen3_moe(tmp_path, seed=24, norm_topk_prob=True, num_hidden_layers=1, noise=False)
    out = convert(hf_dir, tmp_path / "conv", lo="int4:g16", progress=False)
    meta = json.loads((out / "metadata.json").read_text())
    (out / "metadata.json").write_text(json.dumps({**meta, "model_type": "llama"}))
    with pytest.raises(UnsupportedArchitectureError, match=rf"conv: model_type 'llama' is not supported {supported}"):
        load_checkpoint(out)


def test_default_options_convert_the_default_model(tmp_path):
    """`dynaexq convert dynaexq_jax/assets/tiny-moe OUT` and the README's convert(..., lo="int4")
    used to fail: int4's default group 128 does not divide the expert dimension I = 64. A default
    group now shrinks to the largest that divides H and I, and the metadata says so; an explicit
    :gN that does not divide stays an error."""
    cfg = load_hf_config(default_model.HF_DIR)
    assert (cfg.hidden_size, cfg.moe_intermediate_size) == (256, 64)
    out = convert(default_model.HF_DIR, tmp_path / "default", progress=False)       # the CLI's defaults
    ckpt = load_checkpoint(out)
    assert ckpt.metadata["tiers"] == {"hi": "bf16", "lo": "int4:g64"}
    assert ckpt.tiers["lo"] == TierFormat.uniform(Format("int4", 64))
    assert list(ckpt.metadata["tier_notes"]) == ["lo"] and "default group 128" in ckpt.metadata["tier_notes"]["lo"]
    # What the budget counts per expert is what the loader holds.
    pool = ckpt.experts[0]["lo"]
    assert pool.nbytes == cfg.num_experts * expert_nbytes(ckpt.tiers["lo"], cfg.hidden_size, cfg.moe_intermediate_size)

    readme = load_checkpoint(convert(default_model.HF_DIR, tmp_path / "readme", hi="bf16", lo="int4", progress=False))
    assert readme.metadata["tiers"] == {"hi": "bf16", "lo": "int4:g64"}
    # A default that divides stays as it is, and needs no note.
    int2 = load_checkpoint(convert(default_model.HF_DIR, tmp_path / "int2", lo="int2", progress=False))
    assert int2.tiers["lo"] == parse_tier_format("int2") == TierFormat.uniform(Format("int2", 64))
    assert int2.metadata["tier_notes"] == {}
    with pytest.raises(QuantFormatError, match="group size 128 does not divide the input dimension 64"):
        convert(default_model.HF_DIR, tmp_path / "explicit", lo="int4:g128", progress=False)
    assert not (tmp_path / "explicit").exists()


def test_a_default_group_shrinks_only_to_whole_bytes(tmp_path):
    """H = 64, I = 36: int2 packs 4 values a byte, so its group must be a multiple of 4 dividing both."""
    hf_dir, _ = make_tiny_qwen3_moe(tmp_path, seed=25, norm_topk_prob=True, num_hidden_layers=1,
                                    moe_intermediate_size=36, noise=False)
    ckpt = load_checkpoint(convert(hf_dir, tmp_path / "conv", hi="int8", lo="int2", progress=False))
    assert ckpt.tiers == {"hi": parse_tier_format("int8:g4"), "lo": parse_tier_format("int2:g4")}

"""Qwen3-Next: parity with transformers.Qwen3NextForCausalLM (its torch fallbacks for the Gated
DeltaNet kernels) on tiny random models, every parameter perturbed, saved with save_pretrained,
converted and loaded; the chunked delta rule against the recurrent one; padding kept out of the
recurrent state; INT4/INT2 tiers; bad checkpoints."""
import copy
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen3NextConfig
from transformers.models.qwen3_next import modeling_qwen3_next as hf_qwen3_next

import dynaexq_jax
from checkpoints_convert import convert
from dynaexq_jax.api import Model
from dynaexq_jax.errors import MissingTensorError, TensorShapeError
from dynaexq_jax.model.config import parse_hf_config
from dynaexq_jax.model.families import qwen3_next
from dynaexq_jax.serving.checkpoint import load_checkpoint
from tests.hf_models import make_tiny_qwen3_next

LIN, FULL = "linear_attention", "full_attention"
CASES = {
    # full_attention_interval in config.json (as released), GQA in the linear layers (2 key / 4 value
    # heads), an MTP head to skip.
    "interval2+mtp": dict(full_attention_interval=2, mtp=True),
    # explicit layer_types, a dense layer, fused experts on disk, shards, conv kernel 3,
    # partial rotary 1/2, no top-k renormalisation, as many value as key heads.
    "layer_types+mlp_only+fused": dict(layer_types=[LIN, LIN, FULL, LIN], mlp_only_layers=[1], layout="fused",
                                       max_shard_size="100KB", linear_conv_kernel_dim=3, partial_rotary_factor=0.5,
                                       norm_topk_prob=False, linear_num_value_heads=2),
    # the reference's default schedule (every 4th layer full), MoE on odd layers only, biases, tied head.
    "sparse_step2+bias+tied": dict(decoder_sparse_step=2, attention_bias=True, tie_word_embeddings=True),
}


def _is_torch_fallback(fn) -> bool:
    """True if a kernel-or-fallback function of the reference resolves to its own torch code."""
    if isinstance(fn, torch.nn.Module):
        # With the `kernels` package installed, the function is wrapped in a module (`Func`) whose
        # forward calls it, so that `kernelize` can swap it for a hub kernel.
        fn = inspect.getclosurevars(type(fn).forward).nonlocals["func"]
    return inspect.getclosurevars(fn).nonlocals.get("implementation") is fn.__wrapped__


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    for fn in (hf_qwen3_next.torch_chunk_gated_delta_rule, hf_qwen3_next.torch_recurrent_gated_delta_rule,
               hf_qwen3_next.causal_conv1d_fn, hf_qwen3_next.causal_conv1d_update):
        assert _is_torch_fallback(fn), f"{fn.__name__} uses an optimized kernel, not the torch reference"
    tmp = tmp_path_factory.mktemp(request.param.replace("+", "_"))
    # A larger init scale than HF's default keeps greedy generations from collapsing into one
    # repeated token, so that the 32-token comparison says something.
    hf_dir, hf = make_tiny_qwen3_next(tmp, seed=len(request.param), initializer_range=0.08, eos_token_id=None,
                                      **CASES[request.param])
    out = convert(hf_dir, tmp / "conv", lo="int4:g32", progress=False)
    return request.param, hf_dir, hf, dynaexq_jax.load(out)


forward = jax.jit(qwen3_next.forward, static_argnames=("cfg", "backend"))
chunk_rule = jax.jit(qwen3_next.chunk_gated_delta_rule, static_argnums=6)
recurrent_rule = jax.jit(qwen3_next.recurrent_gated_delta_rule)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


def rel_err(got, ref):
    return np.abs(got - ref).max() / np.abs(ref).max()


def test_config_matches_reference(pair):
    name, hf_dir, hf, ours = pair
    cfg, ref = ours.config, hf.config
    assert cfg.layer_types == tuple(ref.layer_types)
    assert cfg.moe_layers == tuple(i for i in range(ref.num_hidden_layers)
                                   if type(hf.model.layers[i].mlp).__name__ == "Qwen3NextSparseMoeBlock")
    assert cfg.rotary_dim == hf.model.rotary_emb.inv_freq.shape[0] * 2
    meta = json.loads((ours.checkpoint.path / "metadata.json").read_text())
    skipped = {s["name"] for s in meta["skipped"]}
    assert ({n for n in skipped if n.startswith("mtp.")} != set()) == CASES[name].get("mtp", False)
    assert meta["expert_layout"] == CASES[name].get("layout", "per_expert")


def test_hf_defaults_for_omitted_keys():
    """Keys a config.json leaves out take Qwen3NextConfig's defaults, which differ from generic ones."""
    d = dict(model_type="qwen3_next", vocab_size=256, hidden_size=64, num_hidden_layers=8,
             num_attention_heads=4, rope_theta=10000.0)
    ours, ref = parse_hf_config(d), Qwen3NextConfig(**d)
    assert ours.layer_types == tuple(ref.layer_types)
    assert ours.partial_rotary_factor == ref.rope_parameters["partial_rotary_factor"]
    for field, hf_name in [("head_dim", "head_dim"), ("num_kv_heads", "num_key_value_heads"),
                           ("norm_topk_prob", "norm_topk_prob"), ("num_experts", "num_experts"),
                           ("num_experts_per_tok", "num_experts_per_tok"),
                           ("shared_expert_intermediate_size", "shared_expert_intermediate_size"),
                           ("linear_conv_kernel_dim", "linear_conv_kernel_dim"),
                           ("linear_key_head_dim", "linear_key_head_dim"),
                           ("linear_value_head_dim", "linear_value_head_dim"),
                           ("linear_num_key_heads", "linear_num_key_heads"),
                           ("linear_num_value_heads", "linear_num_value_heads")]:
        assert getattr(ours, field) == getattr(ref, hf_name), field


def test_full_forward_logits(pair):
    _, _, hf, ours = pair
    ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, (3, 17))
    ref = hf_logits(hf, ids)
    got = ours.logits(ids)
    assert got.shape == ref.shape and got.dtype == np.float32 and np.isfinite(got).all()
    assert rel_err(got, ref) <= 1e-4, f"max abs diff relative to logit scale: {rel_err(got, ref):.2e}"


def test_long_prompt_logits(pair):
    """150 tokens: three of the reference's 64-token chunks (ours too), state carried across them."""
    _, _, hf, ours = pair
    ids = np.random.default_rng(1).integers(0, ours.config.vocab_size, (1, 150))
    err = rel_err(ours.logits(ids), hf_logits(hf, ids))
    assert err <= 1e-4, f"{err:.2e}"


def test_incremental_decode_equals_full_forward(pair):
    """Segments of several tokens (chunked rule from a carried state) and single tokens (recurrent
    rule) continue the conv, recurrent and KV caches exactly."""
    _, _, _, ours = pair
    cfg = ours.config
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 17))   # test_full_forward's shape
    full = ours.logits(ids)
    cache = qwen3_next.init_cache(cfg, 3, 64)
    parts, t = [], 0
    for n in (4, 1, 4, 1, 1, 4, 1, 1):
        lg, cache, _ = forward(ours.params, cfg, jnp.asarray(ids[:, t:t + n]), cache)
        parts.append(np.asarray(lg))
        t += n
    assert np.asarray(cache.lengths).tolist() == [17] * 3
    assert rel_err(np.concatenate(parts, axis=1), full) <= 1e-4


def test_padded_prefill_leaves_state_of_real_tokens(pair):
    """Right-padded batched prefill: each row's conv and recurrent states equal the reference's
    after exactly that row's real tokens, and so do its logits then and over two more steps."""
    _, _, hf, ours = pair
    cfg = ours.config
    rng = np.random.default_rng(3)
    lengths = [2, 9, 16]   # 2 < K - 1: the carried conv state still holds part of the initial zeros
    tokens = rng.integers(0, cfg.vocab_size, (3, 16))   # the padding is random tokens, not zeros
    nxt = rng.integers(0, cfg.vocab_size, (3, 2))
    valid = jnp.asarray(lengths, jnp.int32)
    lg, cache, _ = forward(ours.params, cfg, jnp.asarray(tokens), qwen3_next.init_cache(cfg, 3, 64),
                           logits_at=valid - 1, valid=valid)
    assert np.asarray(cache.lengths).tolist() == lengths
    step_logits, cache_t = [], cache
    for t in range(2):
        lg_t, cache_t, _ = forward(ours.params, cfg, jnp.asarray(nxt[:, t:t + 1]), cache_t)
        step_logits.append(np.asarray(lg_t)[:, 0])
    K = cfg.linear_conv_kernel_dim
    for i, n in enumerate(lengths):
        with torch.no_grad():
            out = hf(torch.tensor(tokens[i:i + 1, :n]), use_cache=True)
            # The reference's states after exactly the n real tokens (copied: the steps update them in place).
            conv = [out.cache.get_conv_state(l)[0, :, -(K - 1):].T.numpy().copy() for l in cfg.linear_layers]
            rec = [out.cache.get_recurrent_state(l)[0].numpy().copy() for l in cfg.linear_layers]
            ref_logits = [out.logits[0, -1].numpy()]
            for t in range(2):
                ref_logits.append(hf(torch.tensor(nxt[i:i + 1, t:t + 1]), cache=out.cache, use_cache=True)
                                  .logits[0, -1].numpy())
        for j in range(len(cfg.linear_layers)):
            np.testing.assert_allclose(np.asarray(cache.conv[j])[i], conv[j], rtol=0, atol=1e-5)   # [K-1, C]
            np.testing.assert_allclose(np.asarray(cache.state[j])[i], rec[j], rtol=0, atol=1e-5)   # [nV, dk, dv]
        scale = np.abs(ref_logits[0]).max()
        for got, want in zip([np.asarray(lg)[i]] + [s[i] for s in step_logits], ref_logits):
            assert np.abs(got - want).max() <= 1e-4 * scale


def test_greedy_generation_matches_hf(pair):
    """Batched prompts of different lengths on our side, each compared to HF generate alone."""
    _, _, hf, ours = pair
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, ours.config.vocab_size, n).tolist() for n in (5, 23, 1)]
    res = ours.generate(prompts, max_new_tokens=32, stop_tokens=(), segment_len=8)
    for p, got in zip(prompts, res.tokens):
        # An explicit mask: without one, HF masks every prompt token equal to pad_token_id.
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist()
        assert got == ref
    assert len(set(res.tokens[0])) > 1


def _random_delta_inputs(rng, B, T, h, dk, dv):
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    q = qwen3_next.l2norm(f(B, T, h, dk)) * dk ** -0.5
    k = qwen3_next.l2norm(f(B, T, h, dk))
    g = -jnp.abs(f(B, T, h)) * 0.3
    beta = 1 / (1 + jnp.exp(-f(B, T, h)))
    return q, k, f(B, T, h, dv), g, beta, f(B, h, dk, dv) * 0.1


def test_chunked_delta_rule_equals_recurrent():
    """A prompt much longer than one chunk (170 tokens, chunks of 16 with a partial last one)."""
    q, k, v, g, beta, s0 = _random_delta_inputs(np.random.default_rng(5), 2, 170, 3, 16, 8)
    out_r, s_r = recurrent_rule(q, k, v, g, beta, s0)
    for C in (16, 64):
        out_c, s_c = chunk_rule(q, k, v, g, beta, s0, C)
        np.testing.assert_allclose(np.asarray(out_c), np.asarray(out_r), rtol=0, atol=2e-5)
        np.testing.assert_allclose(np.asarray(s_c), np.asarray(s_r), rtol=0, atol=2e-5)


def test_unit_lower_solvers_agree():
    """The CPU's forward substitution and the library solve that other platforms run."""
    rng = np.random.default_rng(10)
    a = np.tril(rng.standard_normal((2, 3, 64, 64)) * 0.2, -1) + np.eye(64)
    b = rng.standard_normal((2, 3, 64, 8))
    exact = np.linalg.solve(a, b)
    for solve in (qwen3_next._forward_substitution, qwen3_next._triangular_solve):
        got = np.asarray(jax.jit(solve)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
        assert np.abs(got - exact).max() <= 1e-4 * np.abs(exact).max()


def test_masked_tokens_leave_delta_state_unchanged():
    """g = 0, beta = 0 (how padding is masked): the final state is the state after the real tokens."""
    q, k, v, g, beta, s0 = _random_delta_inputs(np.random.default_rng(6), 1, 100, 2, 8, 8)
    real = jnp.arange(100)[None, :, None] < 37
    _, s_masked = chunk_rule(q, k, v, jnp.where(real, g, 0), jnp.where(real, beta, 0), s0, 16)
    _, s_real = recurrent_rule(q[:, :37], k[:, :37], v[:, :37], g[:, :37], beta[:, :37], s0)
    np.testing.assert_allclose(np.asarray(s_masked), np.asarray(s_real), rtol=0, atol=2e-5)


def test_int4_int2_tiers_match_reference_with_dequantized_experts(tmp_path):
    """The paper's Qwen3-Next tiers (HI = INT4, LO = INT2): each tier's logits equal the reference
    model with its routed experts replaced by that tier's dequantized weights (on xla-only: the CPU
    kernel's integer path quantizes activations, which the family suite bounds)."""
    hf_dir, hf = make_tiny_qwen3_next(tmp_path, seed=7, initializer_range=0.08, full_attention_interval=2)
    out = convert(hf_dir, tmp_path / "conv", hi="int4:g32", lo="int2:g16", progress=False)
    ckpt = load_checkpoint(out)
    ids = np.random.default_rng(8).integers(0, 256, (2, 19))
    float_ref = hf_logits(hf, ids)
    errs = {}
    for tier in ("hi", "lo"):
        ref_model = copy.deepcopy(hf)
        with torch.no_grad():
            for i, pools in ckpt.experts.items():
                t = pools[tier]
                gate, up, down = (np.array(x.dequantize()).transpose(0, 2, 1) for x in (t.gate, t.up, t.down))
                experts = ref_model.model.layers[i].mlp.experts
                experts.gate_up_proj.copy_(torch.from_numpy(np.concatenate([gate, up], axis=1)))
                experts.down_proj.copy_(torch.from_numpy(down))
        got = Model(ckpt, tier=tier, backend="xla-only").logits(ids)
        assert rel_err(got, hf_logits(ref_model, ids)) <= 1e-4, tier
        errs[tier] = rel_err(got, float_ref)
    assert 0 < errs["hi"] < errs["lo"]   # INT2 loses more than INT4


@pytest.mark.parametrize("damage", ["missing_linear_tensor", "shape_mismatch"])
def test_bad_checkpoint_fails_typed_and_writes_nothing(tmp_path, damage):
    hf_dir, _ = make_tiny_qwen3_next(tmp_path, seed=9, num_hidden_layers=2, full_attention_interval=2, noise=False)
    if damage == "missing_linear_tensor":
        import safetensors.numpy as stn
        f = hf_dir / "model.safetensors"
        tensors = stn.load_file(f)
        del tensors["model.layers.0.linear_attn.A_log"]
        stn.save_file(tensors, f, metadata={"format": "pt"})
        err, words = MissingTensorError, "model.layers.0.linear_attn.A_log"
    else:   # the config promises wider linear-attention value heads than the tensors have
        d = json.loads((hf_dir / "config.json").read_text())
        d["linear_value_head_dim"] = 16
        (hf_dir / "config.json").write_text(json.dumps(d))
        err, words = TensorShapeError, "linear_attn"
    out = tmp_path / "conv"
    with pytest.raises(err, match=words):
        convert(hf_dir, out, lo="int4:g32", progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]   # no staging directory left behind


def test_engine_serves_qwen3_next_with_int4_int2_tiers_under_budget(tmp_path):
    """The runtime serves Qwen3-Next with the paper's tier pair; its budget counts the hybrid
    cache (conv + recurrent state, not only KV) exactly, and swaps happen under it."""
    from dynaexq_jax.runtime.engine import Engine
    hf_dir, _ = make_tiny_qwen3_next(tmp_path, seed=9, initializer_range=0.08, full_attention_interval=2)
    ckpt = load_checkpoint(convert(hf_dir, tmp_path / "conv", hi="int4:g32", lo="int2:g16", progress=False))
    probe = Engine(ckpt, budget_bytes=10**9, policy="all-lo", batch=2, max_len=64, segment_len=4).plan
    budget = int((probe.total - probe.fixed.margin + 3 * len(probe.n_hi) * (probe.m_hi - probe.m_lo)) / 0.98) + 1
    eng = Engine(ckpt, budget_bytes=budget, policy="dynaexq", update_period=4, delta=0.0, batch=2, max_len=64,
                 segment_len=4)
    cache = qwen3_next.init_cache(ckpt.config, 2, 64, np.float32)
    assert eng.plan.fixed.kv_cache == sum(x.nbytes for x in jax.tree.leaves(cache))
    assert any(x.ndim == 4 and x.shape[-1] == ckpt.config.linear_value_head_dim for x in cache.state)
    res = eng.generate([[3, 5, 7, 9, 11], [200, 100]], max_new_tokens=24, stop_tokens=())
    assert all(len(t) == 24 for t in res.tokens)
    c = res.runtime["counters"]
    assert c["promotions"] > 0 and c["device_stalls"] == 0
    assert max(t["owned_bytes"] for t in eng.timeline) <= eng.budget_for_owned

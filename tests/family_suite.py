"""The guarantees every model family gives, as one test suite each family's test module runs.

A family's module subclasses FamilySuite (class name Test...), sets CASES (case name -> options
its builder understands, each a tiny random HF config that exercises some of the family's options)
and `build(tmp, seed, **options) -> (hf_dir, transformers model in f32 eval mode)`. Each case is
saved with save_pretrained, converted and loaded; the suite checks, against transformers:

* full-forward logits <= 1e-4 relative in f32, and a long prompt;
* incremental decoding (uneven chunks) equals the full forward;
* 32 greedy tokens equal HF `generate` with an explicit attention mask, batched with padding;
* the HI and LO tiers equal transformers with the same dequantized experts written into it;
* every MoE backend (xla with the CPU kernel, xla-only, pallas in interpret mode) gives the same logits;
* `dynaexq info --verify` describes its converted checkpoint;
* a gptq LO tier's calibration pass runs through the family's forward and beats hqq on its text;
* the budgeted runtime serves it with swaps, within budget, counting its cache exactly.

tests/conftest.py parametrises the class-scoped `case` fixture from CASES.
"""
from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy as stn
import torch

import dynaexq_jax
from checkpoints_convert import convert
from checkpoints_convert.safetensors_reader import SafetensorsCheckpoint
from dynaexq_jax.model.families import family, schema
from dynaexq_jax.serving.checkpoint import load_checkpoint

LO = "int4:g32"
TOL = 1e-4


def rel_err(got, ref) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def hf_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.float().numpy()


def hf_with_experts(hf_dir, out_dir, ckpt, tier: str):
    """transformers' model loaded from a copy of hf_dir whose routed experts are replaced by our
    `tier`'s dequantized weights (written through the family schema's own HF export)."""
    cfg = ckpt.config
    out_dir.mkdir()
    for f in hf_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out_dir / f.name)
    src = SafetensorsCheckpoint(hf_dir)
    expert_specs = {layer: spec for layer, _, spec in schema.leaves(family(cfg.model_type).abstract(cfg))
                    if isinstance(spec, schema.Experts)}
    replaced = set()
    tensors = {}
    for layer, spec in expert_specs.items():
        pool = ckpt.experts[layer][tier]
        stacks = {p: np.asarray(getattr(pool, p).dequantize(), np.float32) for p in schema.PROJECTIONS}
        stacks.update({b: np.asarray(getattr(pool, b)) for b in schema.BIASES if getattr(pool, b) is not None})
        tensors.update(dict(spec.to_hf(stacks)))
        replaced |= set(spec.hf_shapes(spec.layout(src.tensors)))
    tensors.update({n: np.asarray(src.read(n)) for n in src.tensors if n not in replaced})
    stn.save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()


# Our generic config fields and the HF config attributes they are read from, in every family.
GENERIC_FIELDS = (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                  ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
                  ("num_experts_per_tok", "num_experts_per_tok"), ("rms_norm_eps", "rms_norm_eps"),
                  ("max_position_embeddings", "max_position_embeddings"),
                  ("tie_word_embeddings", "tie_word_embeddings"))


def assert_router_equals_hf(hf_router, cfg, seed: int = 0):
    """Our router (layers.moe_route, the softmax-top-k family routers) on random tokens against an HF
    TopKRouter module (returns logits, weights, ids): the same experts, their combine weights, and
    probs = the selected experts' softmax scores before any renormalisation."""
    from dynaexq_jax.model.layers import MoE, moe_route
    torch.manual_seed(seed)
    torch.nn.init.normal_(hf_router.weight, std=0.5)
    x = torch.randn(64, hf_router.weight.shape[1])
    with torch.no_grad():
        logits, weights, ids = hf_router(x)
    got_ids, got_w, got_p = moe_route(MoE(router=hf_router.weight.detach().numpy().T, experts=None), cfg, x.numpy())
    np.testing.assert_array_equal(np.asarray(got_ids), ids.numpy())
    np.testing.assert_allclose(np.asarray(got_w), weights.numpy(), rtol=1e-5, atol=1e-6)
    probs = torch.softmax(logits, -1).gather(1, ids).numpy()
    np.testing.assert_allclose(np.asarray(got_p), probs, rtol=1e-5, atol=1e-6)


def assert_hf_defaults(ours, ref, fields=()):
    """Keys a config.json omits take the HF config class's defaults (ref: that class built with
    no arguments): the generic fields, rope_theta, and the family's own `fields` (our field, HF
    attribute)."""
    for field, hf_name in GENERIC_FIELDS + tuple(fields):
        assert getattr(ours, field) == getattr(ref, hf_name), field
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]


class FamilySuite:
    CASES: dict[str, dict] = {}   # and a staticmethod build(tmp, seed, **options), see above
    MAX_LEN = 64

    @pytest.fixture(scope="class")
    @classmethod
    def pair(cls, case, tmp_path_factory):
        """(case name, HF dir, transformers model, our Model, converted path) of one case."""
        tmp = tmp_path_factory.mktemp(case.replace("+", "_"))
        hf_dir, hf = cls.build(tmp, seed=len(case), **cls.CASES[case])
        out = convert(hf_dir, tmp / "conv", lo=LO, progress=False)
        return case, hf_dir, hf, dynaexq_jax.load(out), out

    def test_full_forward_logits(self, pair):
        _, _, hf, ours, _ = pair
        ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, (3, 17))
        ref = hf_logits(hf, ids)
        got = ours.logits(ids)
        assert got.shape == ref.shape and got.dtype == np.float32 and np.isfinite(got).all()
        assert rel_err(got, ref) <= TOL, f"max abs diff relative to logit scale: {rel_err(got, ref):.2e}"

    def test_long_prompt_logits(self, pair):
        _, _, hf, ours, _ = pair
        ids = np.random.default_rng(1).integers(0, ours.config.vocab_size, (1, self.MAX_LEN - 4))
        assert rel_err(ours.logits(ids), hf_logits(hf, ids)) <= TOL

    def test_incremental_decode_equals_full_forward(self, pair):
        _, _, _, ours, _ = pair
        cfg, fam = ours.config, family(ours.config.model_type)
        ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12))
        full = ours.logits(ids)
        forward = jax.jit(fam.forward, static_argnames=("cfg", "backend"))
        cache = fam.init_cache(cfg, 2, 32, np.float32)
        parts = []
        for a, b in [(0, 5), (5, 6), (6, 7), (7, 10), (10, 11), (11, 12)]:
            lg, cache, _ = forward(ours.params, cfg, ids[:, a:b], cache)
            parts.append(np.asarray(lg))
        assert rel_err(np.concatenate(parts, axis=1), full) <= TOL

    def test_greedy_generation_matches_hf(self, pair):
        _, _, hf, ours, _ = pair
        rng = np.random.default_rng(3)
        prompts = [rng.integers(0, ours.config.vocab_size, n).tolist() for n in (5, 11, 1)]
        res = ours.generate(prompts, max_new_tokens=32, stop_tokens=(), segment_len=8)
        for p, got in zip(prompts, res.tokens):
            ids = torch.tensor([p])
            with torch.no_grad():
                # An explicit attention mask: without one HF masks every prompt token equal to pad_token_id.
                ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            assert got == ref
        assert len(set(sum(res.tokens, []))) > 3, "degenerate generations would make this comparison weak"

    @pytest.mark.parametrize("tier", ["hi", "lo"])
    def test_tier_equals_hf_with_its_dequantized_experts(self, pair, tier, tmp_path):
        """On xla-only: the CPU kernel's integer path (the default backend's LO tier) quantizes
        activations, which the next test bounds."""
        _, hf_dir, hf, _, path = pair
        ours = dynaexq_jax.load(path, tier=tier, backend="xla-only")
        ref_model = hf_with_experts(hf_dir, tmp_path / "hf_deq", ours.checkpoint, tier)
        ids = np.random.default_rng(4).integers(0, ours.config.vocab_size, (2, 13))
        want = hf_logits(ref_model, ids)
        assert rel_err(ours.logits(ids), want) <= TOL
        if tier == "lo":   # int4 really changes the model: the comparison is not vacuous
            assert rel_err(hf_logits(hf, ids), want) > 1e-3

    def test_every_backend_gives_the_same_logits(self, pair):
        """Pallas exactly; the CPU kernel (backend "xla" on a CPU) exactly on the float HI tier.
        On the int4 LO tier its integer path quantizes activations (its op-level arithmetic is
        checked exactly in test_moe_backends.py), which can flip a router's choice and so move
        a token's logits by as much as the tier itself does: over 16 one-token sequences, the
        median one stays within a fifth of the LO tier's own departure from HI (a miswired tier
        would move every sequence by the whole of it)."""
        _, _, _, _, path = pair
        ids = np.random.default_rng(5).integers(0, 200, (1, 6))
        exact = {t: dynaexq_jax.load(path, tier=t, backend="xla-only") for t in ("hi", "lo")}
        ref = {t: m.logits(ids) for t, m in exact.items()}
        assert rel_err(dynaexq_jax.load(path, tier="lo", backend="pallas").logits(ids), ref["lo"]) <= TOL
        assert rel_err(dynaexq_jax.load(path, tier="hi", backend="xla").logits(ids), ref["hi"]) <= TOL
        tokens = np.random.default_rng(6).integers(0, 200, (16, 1))
        hi, lo = exact["hi"].logits(tokens), exact["lo"].logits(tokens)
        got = dynaexq_jax.load(path, tier="lo", backend="xla").logits(tokens)
        per_seq = [rel_err(got[i], lo[i]) for i in range(len(tokens))]
        lo_effect = np.median([rel_err(lo[i], hi[i]) for i in range(len(tokens))])
        assert lo_effect > 1e-3 and np.median(per_seq) <= lo_effect / 5

    def test_gptq_calibration_sees_what_the_forward_gives_each_layer(self, pair, tmp_path):
        """The calibration pass runs the family's own forward (every MoE layer's experts computed
        from the source weights) and GPTQ fits each LO expert to the inputs it saw: on the
        calibration tokens, every MoE layer's LO output, fed the HI (source) model's own layer
        inputs, is closer to its HI output with gptq than with hqq (same grid and storage). Inputs
        captured any other way than the forward's would not make gptq win on every layer."""
        from dynaexq_jax.model.moe import single_tier
        from dynaexq_jax.model.moe.api import experts_computed_by
        from dynaexq_jax.model.moe.xla import moe_experts_xla
        _, hf_dir, _, ours, _ = pair
        cfg, fam = ours.config, family(ours.config.model_type)
        tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 48))
        lo = {}
        for quantizer in ("gptq", "hqq"):
            out = convert(hf_dir, tmp_path / quantizer, lo=f"int2:g16:{quantizer}", progress=False,
                          calibration=tokens if quantizer == "gptq" else None)
            lo[quantizer] = load_checkpoint(out).experts
        hi = dynaexq_jax.load(out, tier="hi", backend="xla-only")
        layers, seen = iter(cfg.moe_layers), {}

        def run(pools, x, ids, weights, activation):
            return moe_experts_xla(x, ids, weights, pools, use_kernel=False, activation=activation)

        def experts(*args):                             # the HI model's own MoE, its inputs recorded
            layer = next(layers)
            seen[layer] = args
            return run(hi.params.layers[layer].mlp.experts, *args)
        with experts_computed_by(experts):
            fam.forward(hi.params, cfg, tokens, fam.init_cache(cfg, *tokens.shape, np.float32), backend="xla-only")
        assert sorted(seen) == list(cfg.moe_layers)
        for layer, args in seen.items():
            want = run(hi.params.layers[layer].mlp.experts, *args)
            err = {q: float(np.linalg.norm(run(single_tier(pools[layer]["lo"]), *args) - want))
                   for q, pools in lo.items()}
            assert err["gptq"] < err["hqq"], (layer, err)

    def test_dynaexq_info_reads_the_metadata(self, pair, capsys):
        from dynaexq_jax.cli import main
        _, _, _, ours, path = pair
        cfg = ours.config
        assert main(["info", str(path), "--verify"]) == 0
        out = capsys.readouterr().out
        assert f"{cfg.model_type}, {cfg.num_layers} layers ({len(cfg.moe_layers)} MoE)" in out, out
        assert f"{cfg.num_experts} experts top-{cfg.num_experts_per_tok}" in out, out

    def test_budgeted_runtime_swaps_within_budget(self, pair):
        from dynaexq_jax.runtime.engine import Engine
        _, _, _, _, path = pair
        ckpt = load_checkpoint(path)
        cfg, fam = ckpt.config, family(ckpt.config.model_type)
        probe = Engine(ckpt, budget_bytes=10**9, policy="all-lo", batch=2, max_len=self.MAX_LEN, segment_len=4).plan
        # Room for about a quarter of each layer's experts in HI.
        n_hi = max(1, cfg.num_experts // 4)
        budget = int((probe.total - probe.fixed.margin + n_hi * len(probe.n_hi) * (probe.m_hi - probe.m_lo)) / 0.98) + 1
        eng = Engine(ckpt, budget_bytes=budget, policy="dynaexq", update_period=4, delta=0.0, batch=2,
                     max_len=self.MAX_LEN, segment_len=4)
        cache = fam.init_cache(cfg, 2, self.MAX_LEN, np.float32)
        assert eng.plan.fixed.kv_cache == sum(x.nbytes for x in jax.tree.leaves(cache))
        assert 0 < min(eng.plan.n_hi) < cfg.num_experts
        res = eng.generate([[3, 5, 7, 9, 11], [200, 100]], max_new_tokens=24, stop_tokens=())
        assert all(len(t) == 24 for t in res.tokens)
        c = res.runtime["counters"]
        assert c["promotions"] > 0 and c["device_stalls"] == 0
        assert max(t["owned_bytes"] for t in eng.timeline) <= eng.budget_for_owned

"""GPTQ: the quantizer against a textbook implementation, and the converter's calibration (its
second pass over the experts) against Hessians and LO costs collected independently from the
Hugging Face model's own hidden states."""
from __future__ import annotations

import json

import numpy as np
import pytest

from checkpoints_convert import calibration as calib
from checkpoints_convert import convert
from dynaexq_jax.errors import CalibrationError, QuantFormatError
from dynaexq_jax.model.config import parse_hf_config
from dynaexq_jax.model.moe import ExpertPools, moe_experts_reference, quantize_experts
from dynaexq_jax.model.moe.api import experts_computed_by, moe_experts
from dynaexq_jax.model.quant import (
    GPTQ_DAMP,
    _hqq,
    dequantize,
    expert_nbytes,
    gptq_quantize,
    parse_format,
    parse_tier_format,
    quantize,
)
from dynaexq_jax.serving.checkpoint import load_checkpoint, verify_checkpoint
from dynaexq_jax.serving.conversion import calibration_rows
from pallas_kernels.grouped_matmul.activation import SWIGLU, glu
from tests.hf_models import make_tiny_qwen3_moe
from tests.test_convert import hf_expected

SEED = np.random.SeedSequence().entropy % 2**32


def correlated_inputs(rng, n: int, k: int) -> np.ndarray:
    """n inputs of k features with strong correlations (as a layer's activations have)."""
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    return (rng.standard_normal((n, k)) * rng.uniform(0.2, 3.0, k)) @ mix


def textbook_gptq(w: np.ndarray, h: np.ndarray, fmt) -> np.ndarray:
    """GPTQ as Optimal Brain Quantization in its first form, in f64, one row at a time: quantize
    row i, move the rows after it by the OBS update with the inverse Hessian of the rows left,
    then remove row i from that inverse (Gaussian elimination). No Cholesky factor, no blocks.
    Each group's grid from HQQ's solver on its current rows, as the project's. Returns the codes."""
    fmt = parse_format(fmt)
    K = w.shape[0]
    g = fmt.group_for(K)
    h = h.astype(np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h += GPTQ_DAMP * np.mean(np.diag(h)) * np.eye(K)
    hinv, W = np.linalg.inv(h), w.astype(np.float64).copy()
    codes = np.zeros(w.shape, np.int64)
    for i in range(K):
        if i % g == 0:
            s, z = (a[0, 0].astype(np.float64) for a in _hqq(W[None, None, i:i + g].astype(np.float32), fmt))
        codes[i] = np.clip(np.rint((W[i] - z) / s), fmt.qmin, fmt.qmax)
        err = W[i] - (codes[i] * s + z)
        W[i + 1:] -= np.outer(hinv[i, i + 1:] / hinv[i, i], err)
        hinv -= np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return codes


def codes_of(t) -> np.ndarray:
    from pallas_kernels import packing
    return np.asarray(packing.unpack_codes(np.asarray(t.data), t.fmt.kernel_format, np))


@pytest.mark.parametrize("fmt", ["int2:g32:gptq", "int3:g32:gptq", "int4:g64:gptq", "int4:channel:gptq"])
def test_gptq_matches_the_textbook_algorithm(fmt):
    # The blocked Cholesky form (lazy batch updates) is the row-by-row elimination, reorganised.
    rng = np.random.default_rng(SEED)
    K, N = 256, 24          # two blocks of 128 rows at group 32 and 64; one block per channel
    x = correlated_inputs(rng, 1024, K)
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    h = x.T @ x
    h[:, 7] = h[7, :] = 0.0                 # a dead input
    got = codes_of(gptq_quantize(w, h, fmt))
    want = textbook_gptq(w, h, fmt)
    # f32 against f64: a weight near a rounding boundary may round the other way, and its error
    # then moves the rows after it a little; the codes otherwise agree.
    assert (got == want).mean() > 0.97, (got == want).mean()


def test_gptq_with_an_identity_hessian_is_the_grid_rounding():
    # No correlation between inputs: nothing to compensate, every row rounds to HQQ's grid.
    rng = np.random.default_rng(SEED)
    w = rng.standard_normal((3, 128, 16)).astype(np.float32)
    for spec in ("int2:g64", "int4:g32", "int3:channel"):
        got = gptq_quantize(w, np.broadcast_to(np.eye(128), (3, 128, 128)), spec + ":gptq")
        want = quantize(w, spec + ":hqq")
        for a, b in ((got.data, want.data), (got.scales, want.scales), (got.zeros, want.zeros)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("spec,most", [("int2:g64", 0.9), ("int3:g64", 0.9), ("int4:g64", 0.9)])
def test_gptq_lowers_the_output_error(spec, most):
    # What GPTQ minimises: ||x W - x W_hat|| on the inputs the Hessian came from, well below what
    # the data-free quantizers reach with the same bits (hqq: the same grid and storage).
    rng = np.random.default_rng(SEED)
    E, K, N = 3, 256, 48
    x = np.stack([correlated_inputs(rng, 2048, K) for _ in range(E)]).astype(np.float32)
    w = rng.standard_normal((E, K, N)).astype(np.float32) * 0.05
    h = np.einsum("enk,enj->ekj", x, x)

    def output_error(t):
        return np.linalg.norm(x @ (np.asarray(dequantize(t, np.float32, np)) - w))
    gptq = output_error(gptq_quantize(w, h, spec + ":gptq"))
    assert gptq < most * output_error(quantize(w, spec + ":hqq"))
    assert gptq < most * output_error(quantize(w, spec))


def test_gptq_format_and_its_errors():
    fmt = parse_format("int2:g64:gptq")
    assert fmt.has_zeros and fmt.qmin == -2 and fmt.name == "int2:g64:gptq"
    assert parse_format("int4:gptq").group == 128
    assert expert_nbytes("int2:g64:gptq", 256, 64) == expert_nbytes("int2:g64:hqq", 256, 64)
    w = np.zeros((64, 8), np.float32)
    with pytest.raises(QuantFormatError, match="calibration"):
        quantize(w, fmt)
    with pytest.raises(QuantFormatError, match="expected"):
        gptq_quantize(w, np.eye(32), fmt)
    with pytest.raises(QuantFormatError, match="not a gptq format"):
        gptq_quantize(w, np.eye(64), "int2:g64:hqq")


def test_expert_tokens_and_calibration_rows():
    ids = np.array([[0, 1], [1, 2], [0, 2], [3, 1], [2, 0], [1, 3]])
    assert list(calib.expert_tokens(ids, 0, min_tokens=2)) == [0, 2, 4]          # enough routed: just those
    topped = calib.expert_tokens(ids, 3, min_tokens=4)                          # routed 3 and 5, plus two others
    assert len(topped) == 4 and {3, 5} <= set(topped) and len(set(topped)) == 4
    assert len(calib.expert_tokens(ids, 7, min_tokens=100)) == 6                 # never picked: the whole layer
    rows = calibration_rows(np.arange(1300), tokens=1200, row_length=512)
    assert rows.shape == (2, 512) and rows.dtype == np.int32 and rows[1, 0] == 512
    assert calibration_rows(np.arange(100)).shape == (1, 100)
    with pytest.raises(CalibrationError, match="at least"):
        calibration_rows(np.arange(10))
    with pytest.raises(CalibrationError, match="vocabulary"):
        calib.check_tokens(np.array([[1, 300]]), 256)
    with pytest.raises(CalibrationError, match="integer"):
        calib.check_tokens(np.zeros((2, 3), np.float32), 256)


def test_expert_chunks_add_up_to_the_layer():
    # Each chunk's share of the output, summed, is the float layer's (the reference op); each
    # tier's projections are gptq_quantize's on the Hessians of expert_tokens' inputs, or the
    # plain quantizer's where the format needs no data.
    rng = np.random.default_rng(SEED)
    E, H, I, T, k = 6, 64, 32, 300, 2
    stacks = {"gate": rng.standard_normal((E, H, I)) * 0.1, "up": rng.standard_normal((E, H, I)) * 0.1,
              "down": rng.standard_normal((E, I, H)) * 0.1}
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([rng.choice(E - 1, k, replace=False) for _ in range(T)]).astype(np.int32)   # expert 5: no token
    w = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    tiers = {"lo": parse_tier_format("int2:g32:gptq+down=int4:g32:gptq"),
             "hi": parse_tier_format("int4:g32")}
    out = np.zeros((T, H), np.float32)
    parts, costs, mass = {}, np.zeros(E), np.zeros(E)
    for rng_ in (range(0, 4), range(4, 6)):
        part, quantized, costs[rng_.start:rng_.stop], mass[rng_.start:rng_.stop] = calib.expert_chunk(
            {p: s[rng_] for p, s in stacks.items()}, None, rng_, E, x, ids, w, tiers, SWIGLU)
        out += part
        parts[rng_.start] = quantized
    ref = moe_experts_reference(x, ids, w, ExpertPools((quantize_experts(*stacks.values(), "f32"),),
                                                       np.zeros(E, np.int32), np.arange(E, dtype=np.int32)))
    np.testing.assert_allclose(out, np.asarray(ref), rtol=2e-5, atol=2e-5)

    inputs = [x[calib.expert_tokens(ids, e)] for e in range(4)]
    h_in = np.stack([xe.T @ xe for xe in inputs])
    lo = parts[0]["lo"]
    np.testing.assert_array_equal(np.asarray(lo["gate"].data),
                                  np.asarray(gptq_quantize(stacks["gate"][:4], h_in, "int2:g32:gptq").data))
    g, u = (np.asarray(dequantize(lo[p], np.float32, np)) for p in ("gate", "up"))
    h_down = np.stack([a.T @ a for a in (np.asarray(glu(xe @ g[e], xe @ u[e], SWIGLU)) for e, xe in enumerate(inputs))])
    want = gptq_quantize(stacks["down"][:4], h_down, "int4:g32:gptq")
    assert (codes_of(lo["down"]) == codes_of(want)).mean() > 0.99
    np.testing.assert_array_equal(np.asarray(parts[4]["hi"]["up"].data),
                                  np.asarray(quantize(stacks["up"][4:], "int4:g32").data))
    # LO costs: per expert sum (w |y_lo - y_hi|)^2 / sum w over its routed tokens, from each tier's
    # own dequantized weights; expert 5, which no token picks, gets its top-up tokens' mean
    # |y_lo - y_hi|^2 times the layer's sum w^2 / sum w.
    def expert_out(q, e, xe):
        g, u, d = (np.asarray(dequantize(q[p], np.float32, np))[e % 4] for p in ("gate", "up", "down"))
        return np.asarray(glu(xe @ g, xe @ u, SWIGLU)) @ d
    for e in range(E):
        part = parts[e // 4 * 4]
        xe = x[calib.expert_tokens(ids, e)]
        sq = ((expert_out(part["lo"], e, xe) - expert_out(part["hi"], e, xe)) ** 2).sum(axis=1)
        we = np.where(ids[calib.expert_tokens(ids, e)] == e, w[calib.expert_tokens(ids, e)], 0).sum(axis=1)
        want = (we ** 2 * sq).sum() / we.sum() if e < 5 else sq.mean() * (w.astype(np.float64) ** 2).sum() / w.sum()
        np.testing.assert_allclose(costs[e], want, rtol=1e-4)
        np.testing.assert_allclose(mass[e], np.where(ids == e, w, 0).sum(), rtol=1e-5)
    assert (costs > 0).all() and mass[5] == 0


def test_experts_computed_by_replaces_every_moe_call():
    x, ids, w = np.ones((3, 4), np.float32), np.zeros((3, 1), np.int32), np.ones((3, 1), np.float32)
    seen = []
    with experts_computed_by(lambda *a: seen.append(a) or a[0] * 2):
        out = moe_experts(x, ids, w, None)
    assert len(seen) == 1 and seen[0][3] == SWIGLU
    np.testing.assert_array_equal(out, x * 2)
    with pytest.raises(AttributeError):           # outside the context the pools are read again
        moe_experts(x, ids, w, None)


def hf_mlp_inputs(model, tokens: np.ndarray) -> dict[int, np.ndarray]:
    """Layer -> the HF model's own MLP inputs on tokens (forward pre-hooks)."""
    import torch
    captured = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0].detach().numpy()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(torch.from_numpy(tokens.astype(np.int64)))
    for h in hooks:
        h.remove()
    return captured


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gptq")
    hf_dir, model = make_tiny_qwen3_moe(tmp, seed=int(SEED % 1000), norm_topk_prob=True)
    tokens = np.random.default_rng(SEED).integers(0, 256, (4, 128)).astype(np.int32)
    out = convert(hf_dir, tmp / "conv", hi="int4:g32", lo="int2:g32:gptq", calibration=tokens, progress=False)
    return hf_dir, model, tokens, out


def test_calibrated_conversion_matches_hessians_from_the_hf_model(calibrated):
    # Independently of our forward: the HF model's own MoE inputs (forward pre-hooks), its router
    # weights for the routing, and the checkpoint's own gate/up for down's inputs.
    hf_dir, model, tokens, out = calibrated
    cfg = parse_hf_config(json.loads((hf_dir / "config.json").read_text()))
    _, _, experts = hf_expected(model, cfg)
    ckpt = load_checkpoint(out)
    assert ckpt.metadata["calibration"]["tokens"] == tokens.size and ckpt.metadata["calibration"]["tiers"] == ["lo"]
    captured = hf_mlp_inputs(model, tokens)
    agree = []
    for i, stacks in experts.items():
        x = captured[i].reshape(-1, cfg.hidden_size)
        logits = x @ model.model.layers[i].mlp.gate.weight.detach().numpy().T
        ids = np.argsort(-logits, axis=1)[:, :cfg.num_experts_per_tok]
        inputs = [x[calib.expert_tokens(ids, e)] for e in range(cfg.num_experts)]
        lo = ckpt.experts[i]["lo"]
        want = gptq_quantize(stacks["gate"], np.stack([xe.T @ xe for xe in inputs]), "int2:g32:gptq")
        agree.append((codes_of(lo.gate) == codes_of(want)).mean())
        g, u = (np.asarray(dequantize(getattr(lo, p), np.float32, np)) for p in ("gate", "up"))
        acts = [np.asarray(glu(xe @ g[e], xe @ u[e], SWIGLU)) for e, xe in enumerate(inputs)]
        want = gptq_quantize(stacks["down"], np.stack([a.T @ a for a in acts]), "int2:g32:gptq")
        agree.append((codes_of(lo.down) == codes_of(want)).mean())
        np.testing.assert_array_equal(np.asarray(ckpt.experts[i]["hi"].up.data),
                                      np.asarray(quantize(stacks["up"], "int4:g32").data))
    # The two forwards differ by float rounding (f32 torch vs XLA): near-ties round apart.
    assert min(agree) > 0.97, agree
    assert verify_checkpoint(out)[0] == len(ckpt.metadata["files"])


def test_stored_lo_costs_match_the_hf_models_inputs(calibrated):
    # The LO costs and routed masses stored beside the tiers, recomputed from the HF model's own
    # MoE inputs and routing (forward pre-hooks, its router, top-k renormalised) and the
    # checkpoint's two tiers.
    hf_dir, model, tokens, out = calibrated
    cfg = parse_hf_config(json.loads((hf_dir / "config.json").read_text()))
    ckpt = load_checkpoint(out)
    stored = ckpt.lo_costs
    assert stored.shape == ckpt.routed_mass.shape == (len(cfg.moe_layers), cfg.num_experts)
    assert "experts/calibration.safetensors" in ckpt.metadata["files"]
    captured = hf_mlp_inputs(model, tokens)
    for row, i in enumerate(cfg.moe_layers):
        x = captured[i].reshape(-1, cfg.hidden_size).astype(np.float64)
        logits = x @ model.model.layers[i].mlp.gate.weight.detach().numpy().T.astype(np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        ids = np.argsort(-probs, axis=1)[:, :cfg.num_experts_per_tok]
        w = np.take_along_axis(probs, ids, 1)
        w /= w.sum(1, keepdims=True)
        tiers = {t: [np.asarray(dequantize(getattr(ckpt.experts[i][t], p), np.float32, np), np.float64)
                     for p in ("gate", "up", "down")] for t in ("hi", "lo")}
        for e in range(cfg.num_experts):
            t = np.flatnonzero((ids == e).any(1))
            we = np.where(ids[t] == e, w[t], 0).sum(1)
            np.testing.assert_allclose(ckpt.routed_mass[row, e], we.sum(), rtol=1e-4, atol=1e-6)
            if not t.size:
                continue
            y = {k: np.asarray(glu(x[t] @ g[e], x[t] @ u[e], SWIGLU), np.float64) @ d[e]
                 for k, (g, u, d) in tiers.items()}
            want = (we ** 2 * ((y["lo"] - y["hi"]) ** 2).sum(1)).sum() / we.sum()
            np.testing.assert_allclose(stored[row, e], want, rtol=2e-3)
    # Same tiers: no expert's LO copy costs anything.
    same = convert(hf_dir, out.parent / "same", hi="int4:g32", lo="int4:g32", calibration=tokens, progress=False)
    assert not load_checkpoint(same).lo_costs.any()


def test_calibrated_checkpoint_serves(calibrated):
    import dynaexq_jax
    _, _, tokens, out = calibrated
    for tier in ("hi", "lo"):
        logits = dynaexq_jax.load(out, tier=tier).logits(tokens[:1, :16])
        assert np.isfinite(logits).all()


def test_calibration_errors_leave_nothing_behind(tmp_path, calibrated):
    hf_dir = calibrated[0]
    tokens = np.zeros((1, 64), np.int32)
    for kwargs, match in (({"lo": "int2:g32:gptq"}, "LO tier int2:g32:gptq: gptq quantizes"),
                          ({"hi": "int4:g32:gptq", "calibration": tokens + 999}, "outside the vocabulary")):
        with pytest.raises(CalibrationError, match=match):
            convert(hf_dir, tmp_path / "out", progress=False, **kwargs)
        assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_the_embedded_model_calibrates_on_its_corpus(tmp_path, calibrated):
    # converted_model (compare, the demo) gives a gptq tier of the embedded model its corpus's
    # calibration split, and reuses the conversion while that stays the same; another model's
    # gptq tier needs `dynaexq convert --calibration` first.
    from dynaexq_jax.experiments import default_model
    tokens = default_model.calibration_tokens()
    assert tokens.shape == (16, 512) and tokens.size == default_model.CALIBRATION_TOKENS
    out = default_model.converted_model(None, tmp_path / "c", lo="int2:g64:gptq", progress=False)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["calibration"]["tokens"] == tokens.size and meta["tiers"]["lo"] == "int2:g64:gptq"
    stamp = (out / "metadata.json").stat().st_mtime_ns
    assert default_model.converted_model(None, tmp_path / "c", lo="int2:g64:gptq", progress=False) == out
    assert (out / "metadata.json").stat().st_mtime_ns == stamp
    with pytest.raises(CalibrationError, match="--calibration FILE"):
        default_model.converted_model(calibrated[0], tmp_path / "other", lo="int2:g32:gptq", progress=False)

"""Calibration for the gptq quantizer (model/quant.py): what each expert's inputs look like on
real text, collected while that text runs through the model being converted.

The converter (converter.py) first writes the dense parameters and every tier that needs no data.
Then one eager forward of the family's own code runs the calibration tokens over those dense
parameters, with every MoE layer's experts computed here instead of by a backend
(moe.api.experts_computed_by), from the source checkpoint's float weights, a chunk of experts at
a time (expert_chunk):
  * the layer's output is the source experts' own (the XLA op on float pools), so every layer
    sees the inputs the unquantized model gives it;
  * per expert, gate and up's Hessian H = sum x x^T over the tokens routed to it; an expert with
    fewer than MIN_TOKENS routed tokens is topped up with other tokens of the same layer, evenly
    spaced, so every Hessian has data behind it (an expert no token picks still gets MIN_TOKENS);
  * per tier, down's Hessian from those tokens' activations through THAT tier's quantized gate
    and up: an expert's three matrices always sit in one tier, so these are what its down
    projection multiplies when it runs there;
and GPTQ (quant.gptq_quantize) quantizes every projection whose format is gptq; a tier's other
projections are quantized as they are without calibration. Every tier is written by this pass.

Then what each expert's LO copy costs (lo_costs, stored beside the tiers with each expert's
routed mass, the sum of its routing weights, for the sensitivity policy, runtime.policies):
over the tokens routed to it, with routing weights w, the change of
its share of the layer's output when it runs in LO instead of HI, cost = sum (w |y_lo - y_hi|)^2 /
sum w: the squared output change a unit of its traffic brings, in the residual stream's units.
(experiments.sensitivity measures the same change in loss units, through the gradient, which needs
the whole model; this needs one layer.) An expert no calibration token is routed to gets the mean
|y_lo - y_hi|^2 over its top-up tokens times the layer's sum w^2 / sum w.

Memory: the dense parameters, the calibration tokens' activations and KV cache, and one chunk of
experts per thread with its Hessians.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import CalibrationError
from dynaexq_jax.model.moe import HI, ExpertPools, quantize_experts
from dynaexq_jax.model.moe.xla import moe_experts_xla
from dynaexq_jax.model.quant import GPTQ_BLOCK, GPTQ_DAMP, QTensor, TierFormat, dequantize, gptq_quantize, quantize
from dynaexq_jax.serving.checkpoint import CALIBRATION_FILE
from dynaexq_jax.serving.conversion import calibration_digest
from pallas_kernels.grouped_matmul.activation import Activation, glu

MIN_TOKENS = 256        # the fewest tokens behind any expert's Hessian (routed ones, then others of its layer)


def check_tokens(tokens, vocab_size: int) -> np.ndarray:
    """Calibration token ids as int32 [B, T], checked: integers, two dimensions, within the vocabulary."""
    a = np.asarray(tokens)
    if a.ndim != 2 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
        raise CalibrationError(f"calibration tokens must be non-empty integer ids [rows, tokens], "
                               f"not {a.dtype}{list(a.shape)}")
    if a.min() < 0 or a.max() >= vocab_size:
        raise CalibrationError(f"calibration token id {a.min() if a.min() < 0 else a.max()} is outside the "
                               f"vocabulary [0, {vocab_size}): tokenized with another model's tokenizer?")
    return a.astype(np.int32)


# What the calibration file's arrays measure (module docstring), as the metadata records it.
MEASURED = {"lo_costs": "sum (w |y_lo - y_hi|)^2 / sum w over routed tokens", "routed_mass": "sum w"}


def metadata(tokens: np.ndarray, tiers: list[str]) -> dict:
    """What the metadata records of a calibration: enough to say whether two conversions saw the
    same; tiers: those quantized with its data (gptq)."""
    return {"tiers": tiers, "tokens": int(tokens.size), "rows": int(tokens.shape[0]),
            "row_length": int(tokens.shape[1]), "sha256": calibration_digest(tokens), "min_tokens": MIN_TOKENS,
            "model": "source", **({"damp": GPTQ_DAMP, "block": GPTQ_BLOCK} if tiers else {}),
            "file": CALIBRATION_FILE, "measured": MEASURED}


def expert_tokens(ids: np.ndarray, expert: int, min_tokens: int = MIN_TOKENS) -> np.ndarray:
    """Indices of the tokens behind an expert's Hessian: those routed to it (ids [T, k]), and if
    fewer than min_tokens, evenly spaced others of the layer up to min_tokens (or all T)."""
    routed = np.flatnonzero((ids == expert).any(axis=1))
    short = min(min_tokens, ids.shape[0]) - routed.size
    if short <= 0:
        return routed
    others = np.setdiff1d(np.arange(ids.shape[0]), routed, assume_unique=True)
    return np.sort(np.concatenate([routed, others[np.linspace(0, others.size - 1, short).round().astype(int)]]))


def _bucket(n: int) -> int:
    """n rounded up to a power of two (at least 64): the padded sizes of eager jax calls."""
    return 1 << int(np.ceil(np.log2(max(n, 64))))


def _hessian(x: np.ndarray) -> np.ndarray:
    return (x.T @ x).astype(np.float64)


def _quantize(w: np.ndarray, fmt, hessian) -> QTensor:
    """w in fmt; hessian() (called only for gptq) gives its inputs' Hessians."""
    return gptq_quantize(w, hessian(), fmt) if fmt.needs_calibration else quantize(w, fmt)


def expert_chunk(stacks: dict[str, np.ndarray], biases: tuple | None, rng: range, num_experts: int, x: np.ndarray,
                 ids: np.ndarray, weights: np.ndarray, tiers: dict[str, TierFormat], activation: Activation
                 ) -> tuple[np.ndarray, dict[str, dict[str, QTensor]], np.ndarray, np.ndarray]:
    """Experts `rng` of a layer of num_experts: stacks {gate, up: [e, H, I], down: [e, I, H]} float,
    biases (gate, up, down) or None; the layer's tokens x [T, H] f32 routed by ids/weights [T, k].
    Returns (their share of the layer's output, f32 [T, H], in the source precision; per tier of
    `tiers` (HI and LO), {proj: QTensor}; their LO costs and routed masses f64 [e], module docstring)."""
    gate, up, down = (np.asarray(stacks[p], np.float32) for p in ("gate", "up", "down"))
    out = np.zeros(x.shape, np.float32)
    rows = np.flatnonzero(((ids >= rng.start) & (ids < rng.stop)).any(axis=1))
    if rows.size:
        # Only these experts: every other one sits on a tier out of range, so contributes nothing.
        # The rows routed here, padded with weight-0 rows to a power of two: few shapes to compile.
        e, n = np.arange(num_experts), _bucket(rows.size)
        mine = ExpertPools((quantize_experts(gate, up, down, "f32", biases),),
                           jnp.asarray(np.where((e >= rng.start) & (e < rng.stop), HI, HI + 1), jnp.int32),
                           jnp.asarray(np.clip(e - rng.start, 0, len(rng) - 1), jnp.int32))
        pad = n - rows.size
        y = moe_experts_xla(jnp.asarray(np.pad(x[rows], ((0, pad), (0, 0)))),
                            jnp.asarray(np.pad(ids[rows], ((0, pad), (0, 0)), constant_values=rng.start)),
                            jnp.asarray(np.pad(weights[rows], ((0, pad), (0, 0)))), mine, activation=activation)
        out[rows] = np.asarray(y)[: rows.size]
    tokens = [expert_tokens(ids, e) for e in rng]
    inputs = [x[t] for t in tokens]
    h_in = np.stack([_hessian(xe) for xe in inputs])
    quantized, outputs = {}, {}
    for name, tier in tiers.items():
        g, u = (_quantize(w, tier.gate_up, lambda: h_in) for w in (gate, up))
        acts = _activations(inputs, g, u, biases, activation)
        d = _quantize(down, tier.down, lambda acts=acts: np.stack([_hessian(a) for a in acts]))
        quantized[name] = {"gate": g, "up": u, "down": d}
        outputs[name] = _outputs(acts, d, biases)
    # Per expert, its routing weight on each of its tokens (0 on the top-up ones).
    routed = [np.where(ids[t] == e, weights[t], 0.0).sum(axis=1) for e, t in zip(rng, tokens)]
    mass = np.array([r.sum() for r in routed], np.float64)
    return out, quantized, _lo_costs(outputs["hi"], outputs["lo"], routed, weights), mass


def _activations(inputs: list[np.ndarray], gate: QTensor, up: QTensor, biases, activation: Activation
                 ) -> list[np.ndarray]:
    """Per expert, its tokens `inputs[i]` through these (quantized) gate and up: the inputs of its
    down projection."""
    pre_g, pre_u = ([xe @ w[i] for i, xe in enumerate(inputs)]
                    for w in (dequantize(gate, np.float32, np), dequantize(up, np.float32, np)))
    if biases is not None:
        pre_g, pre_u = ([p + b[i] for i, p in enumerate(pre)] for pre, b in ((pre_g, biases[0]), (pre_u, biases[1])))
    pre_g, pre_u = np.concatenate(pre_g), np.concatenate(pre_u)
    # One activation call for the whole chunk, padded to a power of two rows: few shapes to compile.
    pad = ((0, _bucket(len(pre_g)) - len(pre_g)), (0, 0))
    a = np.asarray(glu(np.pad(pre_g, pad), np.pad(pre_u, pad), activation), np.float32)
    return np.split(a[: len(pre_g)], np.cumsum([len(xe) for xe in inputs])[:-1])


def _outputs(acts: list[np.ndarray], down: QTensor, biases) -> list[np.ndarray]:
    """Per expert, its output on its tokens: its activations through this (quantized) down."""
    d = dequantize(down, np.float32, np)
    return [a @ d[i] + (0.0 if biases is None else biases[2][i]) for i, a in enumerate(acts)]


def _lo_costs(hi: list[np.ndarray], lo: list[np.ndarray], routed: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """f64 [e]: per expert, sum (w |y_lo - y_hi|)^2 / sum w over its tokens (routing weights
    `routed`), or for one no token is routed to, mean |y_lo - y_hi|^2 times the layer's
    sum w^2 / sum w (weights [T, k]: every routed pair's)."""
    w = weights.astype(np.float64)
    pair_scale = (w ** 2).sum() / max(w.sum(), 1e-30)
    out = np.empty(len(hi))
    for i, (yh, yl, r) in enumerate(zip(hi, lo, routed)):
        sq = ((yl.astype(np.float64) - yh) ** 2).sum(axis=1)
        r = r.astype(np.float64)
        out[i] = (r ** 2 * sq).sum() / r.sum() if r.sum() > 0 else sq.mean() * pair_scale
    return out

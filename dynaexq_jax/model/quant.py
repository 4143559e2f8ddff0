"""Expert weight formats: bf16/fp16/f32 and group-wise int8/int4/int3/int2.

A weight is stored input-major, [..., K, N] with K the input (reduction) dimension, so that
y = x @ W. Integer formats keep one fp16 scale s per group of `group` consecutive rows along K and
per column, and codes q stored offset-binary as q + 2**(bits-1); w ~ s * q. Three quantizers, named
by a suffix on the format, write the same codes (every backend reads all three):
  rtn (default, the method's): s = max|w| / qmax with qmax = 2**(bits-1) - 1,
      q = clip(round(w / s), -qmax, qmax): symmetric, code 0 unused (int2 keeps 3 of its 4 levels);
  mse ('int2:g64:mse'): per group and column the scale, of either sign, whose codes on the whole
      grid [-2**(bits-1), qmax] (int8: [-qmax, qmax], Format.qmin) reconstruct the group with the
      least squared error (a search over candidate scales, each refined by least-squares steps;
      rtn's scale among them, so never worse than rtn). No data, as for rtn; the grid's extra
      level is what int2 gains most from.
  hqq ('int2:g64:hqq', asymmetric): w ~ s * q + z with a zero z per group and column (fp16, as
      many bytes again as the scales): HQQ (Badri & Shaji 2023, no data): the scale from the
      group's range, the zero point by half-quadratic proximal steps on the l_0.7 error, then a
      least-squares refit of (s, z) for those codes wherever it lowers the squared error.
  gptq ('int4:g128:gptq', asymmetric as hqq, same storage): GPTQ (Frantar et al. 2023): the rows
      of K quantized in order, each row's rounding error spread over the rows still to come through
      the inverse Hessian of the layer's inputs, H = sum x x^T over calibration tokens, so that
      the error of the OUTPUTS x @ W, not of the weights, is what is minimised; each group's grid
      from HQQ's solver on the group's weights as updated so far. It needs data: gptq_quantize
      takes the Hessian, and the converter collects it from calibration text
      (checkpoints_convert/calibration.py).

An expert tier has a TierFormat: one Format for gate and up, one for down (the same, or down's own:
'int2:g64:hqq+down=int4:g64').

Sub-byte values are packed WITHIN each K-block of `group` rows, as sub-tiles of consecutive rows that
unpack with shifts and masks of whole byte rows (int3: three bit planes, 3 bits per weight exactly).
That is the layout the Pallas kernels read: pallas_kernels/packing.py defines it with the kernels'
static format metadata (Format.kernel_format) and holds the one packing and unpacking (quantize
and dequantize here use them).
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct

from dynaexq_jax.errors import QuantFormatError
from pallas_kernels import packing

_FLOAT_DTYPES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}
_DEFAULT_GROUP = {8: 128, 4: 128, 3: 128, 2: 64}
QUANTIZERS = ("rtn", "mse", "hqq", "gptq")
SCALE_DTYPE = np.float16
BIAS_DTYPE = np.float32      # expert biases (gpt-oss) stay float in every tier


@dataclasses.dataclass(frozen=True)
class Format:
    """A named storage format. `group` is the quantization group along K (0 = whole K, 'channel')."""
    kind: str          # "f32" | "bf16" | "fp16" | "int8" | "int4" | "int3" | "int2"
    group: int = 0
    quantizer: str = "rtn"   # integer formats: "rtn" | "mse" | "hqq" | "gptq" (module docstring)

    @property
    def is_int(self) -> bool:
        return self.kind.startswith("int")

    @property
    def bits(self) -> int:
        return {"f32": 32, "bf16": 16, "fp16": 16}.get(self.kind) or int(self.kind[3:])

    @property
    def subtiles(self) -> int:
        """The sub-tiles a packed block unpacks into (a group must hold whole ones): packing.py."""
        return packing.subtiles(self.bits) if self.is_int else 1

    def packed_rows(self, k: int) -> int:
        """Stored rows of k weight rows (k * bits / 8 for integer formats)."""
        return self.kernel_format.packed_rows(k)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def offset(self) -> int:
        return 2 ** (self.bits - 1)

    @property
    def qmin(self) -> int:
        """The lowest code the quantizer writes: -qmax (rtn, symmetric) or -offset (mse, hqq, gptq:
        the whole grid; int8 excepted: the CPU kernel's AVX2 dot product negates weight codes, and -128
        has no int8 negation, while the extra level is worth 1/255 of the range)."""
        return -self.qmax if self.quantizer == "rtn" or self.bits == 8 else -self.offset

    @property
    def has_zeros(self) -> bool:
        """Asymmetric: a zero beside every scale (w = q * s + z)."""
        return self.quantizer in ("hqq", "gptq")

    @property
    def needs_calibration(self) -> bool:
        """Quantizing needs data (the Hessians of the weight's inputs): gptq."""
        return self.quantizer == "gptq"

    @property
    def name(self) -> str:
        if not self.is_int:
            return self.kind
        name = f"{self.kind}:g{self.group}" if self.group else f"{self.kind}:channel"
        return name if self.quantizer == "rtn" else f"{name}:{self.quantizer}"

    @property
    def storage_dtype(self):
        return np.uint8 if self.is_int else _FLOAT_DTYPES[self.kind]

    @property
    def kernel_format(self) -> packing.WeightFormat:
        """The static metadata the kernels (and dequantize) read weights of this format with."""
        return packing.WeightFormat("int", self.bits, self.group, self.has_zeros) if self.is_int else packing.FLOAT

    def group_for(self, k: int) -> int:
        """The group size used for an input dimension k (per-channel formats use all of k)."""
        return self.group or k

    def check(self, k: int) -> None:
        if not self.is_int:
            return
        g = self.group_for(k)
        if k % g:
            raise QuantFormatError(
                f"format {self.name}: group size {g} does not divide the input dimension {k}; "
                f"pick a group that does, e.g. '{self.kind}:g{np.gcd(k, g)}'")
        if g % self.subtiles:
            raise QuantFormatError(f"format {self.name}: group {g} is not a multiple of {self.subtiles}")

    def nbytes(self, k: int, n: int) -> int:
        """Exact bytes of one [k, n] weight in this format, scales (and zeros) included."""
        self.check(k)
        if not self.is_int:
            return k * n * np.dtype(self.storage_dtype).itemsize
        per_group = (2 if self.has_zeros else 1) * np.dtype(SCALE_DTYPE).itemsize
        return self.packed_rows(k) * n + (k // self.group_for(k)) * n * per_group

    def __str__(self) -> str:
        return self.name


def parse_format(spec: str | Format) -> Format:
    """'bf16', 'fp16', 'f32', 'int8', 'int4', 'int3', 'int2', 'int4:g64', 'int8:channel', and a quantizer
    suffix on an integer format: 'int2:g64:mse', 'int4:hqq' (default group), ':rtn' (the default)."""
    if isinstance(spec, Format):
        return spec
    m = re.fullmatch(r"(f32|float32|bf16|bfloat16|fp16|float16|int8|int4|int3|int2)(?::(?:g(\d+)|(channel)))?"
                     r"(?::(rtn|mse|hqq|gptq))?", spec.strip().lower())
    if not m:
        raise QuantFormatError(
            f"unknown format '{spec}' (use f32, bf16, fp16, int8, int4, int3, int2, optionally ':gN' or ':channel', "
            f"then optionally a quantizer, {' or '.join(QUANTIZERS)}: e.g. int2:g64:mse)")
    kind = {"float32": "f32", "bfloat16": "bf16", "float16": "fp16"}.get(m.group(1), m.group(1))
    if kind in _FLOAT_DTYPES:
        if m.group(2) or m.group(3) or m.group(4):
            raise QuantFormatError(f"format '{spec}': float formats take no group size or quantizer")
        return Format(kind)
    quantizer = m.group(4) or "rtn"
    if m.group(3):
        return Format(kind, 0, quantizer)
    group = int(m.group(2)) if m.group(2) else _DEFAULT_GROUP[int(kind[3:])]
    fmt = Format(kind, group, quantizer)
    if group <= 0 or group % fmt.subtiles:
        raise QuantFormatError(f"format '{spec}': group must be a positive multiple of {fmt.subtiles}")
    return fmt


def fit_default_group(spec, fmt: Format, dims: tuple[int, ...]) -> tuple[Format, str | None]:
    """A format parsed from spec, its group fitted to the input dimensions it reduces over: a
    default group (no ':gN' in spec) that does not divide them becomes the largest smaller one that
    does and holds whole bytes, with a note saying so; an explicit group is kept (Format.check then
    names the problem)."""
    if not (fmt.is_int and fmt.group and isinstance(spec, str) and not re.search(r":(g\d|channel)", spec)
            and any(d % fmt.group for d in dims)):
        return fmt, None
    fits = [g for g in range(fmt.group, 0, -1) if g % fmt.subtiles == 0 and all(d % g == 0 for d in dims)]
    if not fits:
        return fmt, None
    note = (f"{fmt.kind}: the default group {fmt.group} does not divide the expert dimensions "
            f"{' and '.join(map(str, dims))}; group {fits[0]} used")
    return dataclasses.replace(fmt, group=fits[0]), note


@dataclasses.dataclass(frozen=True)
class TierFormat:
    """An expert tier's formats by projection. gate and up share one: the kernels read both against
    the same input in one pass (one activation quantization on the CPU, one Pallas gate/up kernel);
    down may have its own, e.g. 'int2:g64:hqq+down=int4:g64' (in MoE experts the down projection is
    the matrix that suffers most from low bits). A uniform tier is named by its one format."""
    gate_up: Format
    down: Format

    @classmethod
    def uniform(cls, fmt: Format) -> TierFormat:
        return cls(fmt, fmt)

    def of(self, proj: str) -> Format:
        """The format of projection proj ("gate", "up" or "down")."""
        return self.down if proj == "down" else self.gate_up

    @property
    def is_uniform(self) -> bool:
        return self.gate_up == self.down

    @property
    def needs_calibration(self) -> bool:
        return self.gate_up.needs_calibration or self.down.needs_calibration

    @property
    def name(self) -> str:
        return self.gate_up.name if self.is_uniform else f"{self.gate_up.name}+down={self.down.name}"

    def __str__(self) -> str:
        return self.name


def _source_or(spec: str, source: Format | None, what: str) -> Format:
    """A format spec where 'source' stands for the source checkpoint's float format (None: unknown here)."""
    if spec.strip().lower() != "source":
        return parse_format(spec)
    if source is None:
        raise QuantFormatError(f"{what} '{spec}': 'source' (the source checkpoint's dtype) is unknown here")
    return source


def parse_dense_format(spec: str | Format, source: Format | None = None) -> Format:
    """The dense parameters' dtype: a float format, or 'source' (the source checkpoint's)."""
    fmt = spec if isinstance(spec, Format) else _source_or(spec, source, "dtype")
    if fmt.is_int:
        raise QuantFormatError(f"dtype '{spec}': dense parameters need a float dtype (source, f32, bf16, fp16)")
    return fmt


def parse_tier_format(spec: str | Format | TierFormat, source: Format | None = None) -> TierFormat:
    """An expert tier's format: one format for all three projections ('int4:g64', parse_format), or
    gate/up's then down's, 'int2:g64:hqq+down=int4:g64'. source: what 'source' stands for (the
    source checkpoint's float format), None where it means nothing."""
    if isinstance(spec, TierFormat):
        return spec
    if isinstance(spec, Format):
        return TierFormat.uniform(spec)
    base, *extra = spec.split("+")
    gate_up = _source_or(base, source, "tier format")
    if not extra:
        return TierFormat.uniform(gate_up)
    proj, _, fmt = extra[0].partition("=")
    if len(extra) > 1 or proj.strip().lower() != "down" or not fmt:
        raise QuantFormatError(
            f"tier format '{spec}': after the gate/up format only '+down=FORMAT' may follow (gate and up share "
            f"one format: the kernels read them in one pass), e.g. 'int2:g64:hqq+down=int4:g64'")
    return TierFormat(gate_up, _source_or(fmt, source, "tier format"))


def fit_tier_format(spec: str | Format | TierFormat, hidden: int, inter: int,
                    source: Format | None = None) -> tuple[TierFormat, str | None]:
    """A tier format (parse_tier_format) fitted to the expert dimensions: gate/up reduce over hidden,
    down over inter; a default group that does not divide its dimensions shrinks (fit_default_group;
    a uniform tier's one format fits both, so it stays one) and the note says so; an explicit group
    that does not divide them is a QuantFormatError."""
    tier = parse_tier_format(spec, source)
    text = spec if isinstance(spec, str) else None
    if text is None or "+" not in text:
        fmt, note = fit_default_group(text, tier.gate_up, (hidden, inter))
        tier = TierFormat(fmt, fmt if tier.is_uniform else tier.down)
    else:
        base, _, down = text.partition("+")
        (gate_up, n1), (down, n2) = (fit_default_group(base, tier.gate_up, (hidden,)),
                                     fit_default_group(down.partition("=")[2], tier.down, (inter,)))
        tier, note = TierFormat(gate_up, down), "; ".join(n for n in (n1 and f"gate/up {n1}", n2 and f"down {n2}")
                                                          if n) or None
    tier.gate_up.check(hidden)
    tier.down.check(inter)
    return tier, note


def expert_nbytes(fmt: str | Format | TierFormat, hidden: int, inter: int, bias: bool = False) -> int:
    """Bytes of one SwiGLU expert (gate [H, I], up [H, I], down [I, H]) in `fmt` (a tier format),
    scales and zeros included, and with bias its float biases (gate/up [I], down [H])."""
    tier = parse_tier_format(fmt)
    biases = (2 * inter + hidden) * np.dtype(BIAS_DTYPE).itemsize if bias else 0
    return 2 * tier.gate_up.nbytes(hidden, inter) + tier.down.nbytes(inter, hidden) + biases


@struct.dataclass
class QTensor:
    """A stack of weights [..., K, N] in one Format. data: float [..., K, N] or uint8 [..., K/p, N];
    scales: fp16 [..., K/group, N] for integer formats, None for float formats; zeros: like the
    scales for asymmetric formats (Format.has_zeros), else None."""
    data: jax.Array
    scales: jax.Array | None
    fmt: Format = struct.field(pytree_node=False)
    zeros: jax.Array | None = None

    @property
    def k(self) -> int:
        return self.fmt.kernel_format.weight_rows(self.data.shape[-2])

    @property
    def n(self) -> int:
        return self.data.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.data, self.scales, self.zeros) if a is not None)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


def quantize(w: np.ndarray, fmt: Format | str) -> QTensor:
    """Quantize (numpy, at conversion time) a float weight [..., K, N] into `fmt`."""
    fmt = parse_format(fmt)
    w = np.asarray(w)
    k = w.shape[-2]
    fmt.check(k)
    if not fmt.is_int:
        return QTensor(w.astype(fmt.storage_dtype), None, fmt)
    g = fmt.group_for(k)
    # C order whatever w's layout: numpy's sums then run in one order, so a group's codes do not
    # depend on how its stack was sliced or transposed.
    wg = np.ascontiguousarray(w, np.float32).reshape(*w.shape[:-2], k // g, g, w.shape[-1])
    amax = np.abs(wg).max(axis=-2)
    scales = (amax / fmt.qmax).astype(SCALE_DTYPE)
    if not np.all(np.isfinite(scales)):
        raise QuantFormatError(f"format {fmt.name}: a group's max |w| overflows fp16 scales")
    zeros = None
    if fmt.quantizer == "mse":
        scales = _least_error_scales(wg, scales, fmt)
    elif fmt.quantizer == "hqq":
        scales, zeros = _hqq(wg, fmt)
    elif fmt.quantizer == "gptq":
        raise QuantFormatError(f"format {fmt.name}: GPTQ needs the Hessian of the weight's inputs "
                               f"(gptq_quantize); convert with calibration text (dynaexq convert --calibration FILE)")
    q = _codes(wg, scales, fmt, zeros).astype(np.int32) + fmt.offset
    packed = packing.pack_codes(q.reshape(w.shape), fmt.kernel_format)
    return QTensor(packed, scales, fmt, zeros)


def _codes(wg: np.ndarray, scales: np.ndarray, fmt: Format, zeros: np.ndarray | None = None) -> np.ndarray:
    """The codes (offset not added) of groups wg [..., G, g, N] under scales (and zeros) [..., G, N]:
    the nearest of the grid to each weight."""
    s = scales.astype(np.float32)[..., None, :]
    if zeros is not None:
        wg = wg - zeros.astype(np.float32)[..., None, :]
    return np.clip(np.rint(wg / np.where(s != 0, s, 1.0)), fmt.qmin, fmt.qmax)


def _squared_error(wg, q, scales, zeros=None) -> np.ndarray:
    """Per group and column, the squared error of reconstructing wg [..., G, g, N] from its codes q
    with these (fp16) scales and zeros."""
    w_hat = q * scales.astype(np.float32)[..., None, :]
    if zeros is not None:
        w_hat = w_hat + zeros.astype(np.float32)[..., None, :]
    return ((wg - w_hat) ** 2).sum(axis=-2)


# The mse quantizer's search: candidate scales +-max|w| / t for CANDIDATES values of t between
# 0.6 qmax and the grid's long side (offset), each refined by REFINE least-squares steps.
CANDIDATES, REFINE = 12, 2


def _least_error_scales(wg: np.ndarray, rtn: np.ndarray, fmt: Format) -> np.ndarray:
    """Per group and column the fp16 scale (rtn's or a searched one, either sign) whose codes on
    [qmin, qmax] give the least squared error over the group."""
    amax = np.abs(wg).max(axis=-2)

    def error(scales):
        return _squared_error(wg, _codes(wg, scales, fmt), scales)
    best, best_err = rtn, error(rtn)
    for sign in (1.0, -1.0) if fmt.qmin != -fmt.qmax else (1.0,):     # a symmetric grid: one sign is enough
        for t in np.linspace(0.6 * fmt.qmax, fmt.offset, CANDIDATES):
            s = sign * amax / t
            for _ in range(REFINE):
                # The least-squares scale for these codes: sum(w q) / sum(q^2) over the group.
                q = _codes(wg, s, fmt)
                qq = (q * q).sum(axis=-2)
                s = np.where(qq > 0, (wg * q).sum(axis=-2) / np.where(qq > 0, qq, 1.0), s)
            s = np.clip(s, -65504.0, 65504.0).astype(SCALE_DTYPE)
            err = error(s)
            better = err < best_err
            best, best_err = np.where(better, s, best), np.where(better, err, best_err)
    return best


# HQQ's solver with the `hqq` package's defaults: l_p error with p = 0.7, beta 10 growing by kappa
# 1.01 per step, at most 20 steps, stopping once the mean |error| no longer falls; then HQQ_REFINE
# least-squares refits (4: int2 error about 5% below 2 refits; about 0.5 us per weight in all).
HQQ_P, HQQ_BETA, HQQ_KAPPA, HQQ_STEPS, HQQ_REFINE = 0.7, 10.0, 1.01, 20, 4


def _hqq(wg: np.ndarray, fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """HQQ on groups wg [..., G, g, N] -> fp16 (scales, zeros) [..., G, N], w ~ q * s + z. In HQQ's
    terms u = q - qmin in [0, levels], w ~ (u - zero) / inv: inv from the group's range, the zero
    point by proximal steps (the error's l_p shrinkage, then the zero that fits the shrunk
    residual); then per group the least-squares (s, z) for the chosen codes where it is better."""
    levels = fmt.qmax - fmt.qmin
    lo, hi = wg.min(axis=-2, keepdims=True), wg.max(axis=-2, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.minimum(levels / (hi - lo), 2e4)                 # HQQ's clamp (constant groups)
    zero, beta = -lo * inv, HQQ_BETA
    best_zero, best_err, done = zero, np.full(zero.shape, np.inf, np.float32), np.zeros(zero.shape, bool)
    # HQQ stops at the first step that does not lower the mean error; here each group stops on its
    # own, so a group's result depends on its weights alone (not on what it is quantized beside).
    for _ in range(HQQ_STEPS):
        u = np.clip(np.rint(wg * inv + zero), 0, levels)
        residual = wg - (u - zero) / inv
        err = np.abs(residual).mean(axis=-2, keepdims=True)
        improved = ~done & (err < best_err)
        done |= ~improved
        if done.all():
            break
        best_err, best_zero = np.where(improved, err, best_err), np.where(improved, zero, best_zero)
        with np.errstate(divide="ignore"):        # |0| ** (p - 1) = inf: shrinks to 0, as it should
            shrunk = np.sign(residual) * np.maximum(np.abs(residual) - np.abs(residual) ** (HQQ_P - 1) / beta, 0.0)
        zero = np.where(improved, (u - (wg - shrunk) * inv).mean(axis=-2, keepdims=True), zero)
        beta *= HQQ_KAPPA
    s = 1.0 / inv[..., 0, :]
    scales, zeros = _fp16(s, -(fmt.qmin + best_zero[..., 0, :]) * s)
    q = _codes(wg, scales, fmt, zeros)
    err = _squared_error(wg, q, scales, zeros)
    wm = wg.mean(axis=-2, keepdims=True)
    for _ in range(HQQ_REFINE):
        # The least-squares (s, z) for the current codes: a line through (q, w) per group.
        qm = q.mean(axis=-2, keepdims=True)
        var = ((q - qm) ** 2).sum(axis=-2)
        s_ls = np.where(var > 0, ((q - qm) * (wg - wm)).sum(axis=-2) / np.where(var > 0, var, 1.0), scales)
        s_ls, z_ls = _fp16(s_ls, (wm - s_ls[..., None, :] * qm)[..., 0, :])
        q_ls = _codes(wg, s_ls, fmt, z_ls)
        err_ls = _squared_error(wg, q_ls, s_ls, z_ls)
        better = err_ls < err
        scales, zeros = np.where(better, s_ls, scales), np.where(better, z_ls, zeros)
        q, err = np.where(better[..., None, :], q_ls, q), np.where(better, err_ls, err)
    if not (np.all(np.isfinite(scales)) and np.all(np.isfinite(zeros))):
        raise QuantFormatError(f"format {fmt.name}: a group's scale or zero overflows fp16")
    return scales, zeros


# GPTQ's settings, as in the paper's code: the Hessian damped by 1% of its mean diagonal, rows
# processed in blocks of 128 (lazy batch updates: the same result, most of the work in matmuls).
GPTQ_DAMP, GPTQ_BLOCK = 0.01, 128


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, fmt: Format | str) -> QTensor:
    """GPTQ (module docstring) of float weights w [..., K, N] (y = x @ w) given the Hessians of
    their inputs, hessian [..., K, K] = sum x x^T (any positive scale; one per leading index).
    Rows are quantized in order; row i's error e = (w_i - w_hat_i) / U[i, i] is taken out of the
    rows after it as w_j -= U[i, j] e, U the upper Cholesky factor of H^-1 (H^-1 = U^T U): the
    optimal update for the outputs' squared error. A group's (scale, zero) comes from HQQ's
    solver on its rows when its first row is reached. Inputs no token activated (H[i, i] = 0) are
    rounded plainly and move nothing."""
    fmt = parse_format(fmt)
    if fmt.quantizer != "gptq":
        raise QuantFormatError(f"gptq_quantize: format {fmt.name} is not a gptq format")
    w = np.asarray(w)
    *lead, K, N = w.shape
    fmt.check(K)
    if np.shape(hessian) != (*lead, K, K):
        raise QuantFormatError(f"gptq_quantize: Hessian of shape {list(np.shape(hessian))} for weights "
                               f"{list(w.shape)}: expected {[*lead, K, K]}")
    g = fmt.group_for(K)
    block = K if g == K else g * max(1, GPTQ_BLOCK // g)      # whole groups per block
    W = np.array(w, np.float32).reshape(-1, K, N)
    U = _gptq_factor(np.asarray(hessian, np.float64).reshape(-1, K, K))
    codes = np.empty(W.shape, np.int32)
    scales = np.empty((W.shape[0], K // g, N), SCALE_DTYPE)
    zeros = np.empty_like(scales)
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        rows, errors = W[:, b0:b1].copy(), np.empty((W.shape[0], b1 - b0, N), np.float32)
        for j, i in enumerate(range(b0, b1)):
            if i % g == 0:
                s, z = _hqq(rows[:, None, j:j + g], fmt)
                scales[:, i // g], zeros[:, i // g] = s[:, 0], z[:, 0]
            s, z = scales[:, i // g][:, None], zeros[:, i // g][:, None]
            q = _codes(rows[:, None, j:j + 1], s, fmt, z)[:, 0, 0]
            codes[:, i] = q
            errors[:, j] = (rows[:, j] - (q * s[:, 0].astype(np.float32) + z[:, 0].astype(np.float32))) \
                / U[:, i, i, None]
            rows[:, j + 1:] -= U[:, i, i + 1:b1, None] * errors[:, j, None, :]
        W[:, b1:] -= np.swapaxes(U[:, b0:b1, b1:], 1, 2) @ errors
    packed = packing.pack_codes((codes + fmt.offset).reshape(w.shape), fmt.kernel_format)
    return QTensor(packed, scales.reshape(*lead, K // g, N), fmt, zeros.reshape(*lead, K // g, N))


def _gptq_factor(h: np.ndarray) -> np.ndarray:
    """f32 [E, K, K]: the upper Cholesky factor U of each damped Hessian's inverse (H^-1 = U^T U).
    A dead input (H[i, i] = 0: no token activated it, so its row and column are zero) gets
    H[i, i] = 1, which leaves it out of every update."""
    h, k = h.copy(), np.arange(h.shape[-1])
    diag = h[:, k, k]
    diag[diag <= 0] = 1.0
    h[:, k, k] = diag + GPTQ_DAMP * diag.mean(axis=-1, keepdims=True)
    try:
        inverse = np.linalg.inv(h)
        return np.swapaxes(np.linalg.cholesky(inverse), 1, 2).astype(np.float32)
    except np.linalg.LinAlgError:
        raise QuantFormatError("gptq_quantize: a Hessian is not positive semi-definite (not sum x x^T?)") from None


def _fp16(scales, zeros):
    return scales.astype(SCALE_DTYPE), zeros.astype(SCALE_DTYPE)


def dequantize(t: QTensor, dtype=jnp.float32, xp=jnp):
    """QTensor -> float [..., K, N] (jax by default; xp=np for a numpy reference)."""
    return packing.dequantize(t.data, t.scales, t.fmt.kernel_format, dtype, xp, t.zeros)

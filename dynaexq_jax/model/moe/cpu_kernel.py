"""The CPU kernels (csrc/moe_cpu.cc), called from XLA as FFI custom calls:

  tier_contribution  one tier's routed experts, each streamed once from its pool slot. The "xla"
                     backend (xla.py) calls it for every tier at any shape, with XLA's gradients;
                     moe_experts_cpu_kernel runs every tier through it (forward only).
  matmul             a dense x @ w of few rows (decode) with 16-bit weights read in place and a
                     transposed w (the tied embedding as the head) read without a copy; the
                     model's projections call it through dense_matmul (XLA's gradients).

They are compiled on first use with the machine's C++ compiler against the XLA FFI headers that
jaxlib ships, cached by a hash of everything that shapes the binary, and registered for the
"cpu" platform. The binary picks its instruction set at run time (AVX-512 with VNNI, AVX2, or
portable code; isa(), DYNAEXQ_CPU_ISA=avx2|generic forces a lesser one). Without a compiler (or
with DYNAEXQ_CPU_KERNEL=0) XLA serves everything.

The numerical contract: float weights (f32/bf16/fp16) give XLA's results up to float summation
order; integer weights are multiplied with integer dot products against activations quantized to
int8 per block of at most 32 K rows (symmetric, round to nearest: quantize_activations is that
step in pure JAX). tests/test_moe_backends.py holds every ISA to the dequantized reference with
that step modelled, and the step itself to INT_DOT_RTOL of the output's scale. Groups whose
sub-tiles (packing.py) are not whole sets of 4 rows dequantize instead (exact).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from dynaexq_jax.model.moe.base import ExpertPools, tier_pairs
from pallas_kernels.grouped_matmul.activation import SWIGLU, Activation

SOURCE = Path(__file__).parent / "csrc" / "moe_cpu.cc"
SOURCES = (SOURCE, SOURCE.parent / "tiles.inc")     # everything the binary is built from
TARGET = "dynaexq_moe_tier"
MATMUL_TARGET = "dynaexq_matmul"
# No -march: the binary runs on any CPU of its architecture and chooses its ISA at run time.
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC"]
# The integer path's error bound relative to the output's largest magnitude (activations
# quantized to int8 per block: each term carries at most half a code step of the block's
# max|x| / 127). Over 550 random cases of the conformance suite the MoE op's error was 9e-3 of
# the output's scale at the median, 2.4e-2 at worst.
INT_DOT_RTOL = 3e-2
# The dense matmul kernel serves products of at most this many rows (decode and short prompts);
# longer ones are XLA's GEMMs.
MATMUL_MAX_ROWS = 64
_KINDS = {"f32": 0, "bf16": 1, "fp16": 2}
_ACTIVATIONS = {"swiglu": 0, "clamped_swiglu": 1}


def cache_dir() -> Path:
    return Path(os.environ.get("DYNAEXQ_CACHE", Path.home() / ".cache" / "dynaexq-jax"))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build(cxx: str) -> Path:
    """Compile the kernel (or return the cached binary). Raises on a compiler error."""
    include = Path(jaxlib.__file__).parent / "include"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"compiler '{cxx}' does not run: {e}") from e
    key = hashlib.sha256("\0".join([*(f.read_text() for f in SOURCES), " ".join(FLAGS), jaxlib.__version__,
                                    version, platform.machine()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"moe_cpu-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        proc = subprocess.run([cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(tmp_so)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{cxx} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp_so, out)   # atomic: concurrent builders never load a half-written file
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built kernels with their FFI targets registered (once per process), or None."""
    cxx = _compiler()
    if cxx is None:
        warnings.warn("no C++ compiler found: the MoE op runs on the (slower) XLA path on the CPU", stacklevel=2)
        return None
    try:
        lib = ctypes.cdll.LoadLibrary(str(build(cxx)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.DynaexqMoeTier), platform="cpu")
        jax.ffi.register_ffi_target(MATMUL_TARGET, jax.ffi.pycapsule(lib.DynaexqMatmul), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        warnings.warn(f"the CPU MoE kernel could not be built, using the XLA path: {e}", stacklevel=2)
        return None
    for name in ("DynaexqCpuIsa", "DynaexqCpuIsas"):
        getattr(lib, name).restype = ctypes.c_char_p
    wanted = os.environ.get("DYNAEXQ_CPU_ISA", "")
    if wanted and not lib.DynaexqSetIsa(wanted.encode()):
        raise RuntimeError(f"DYNAEXQ_CPU_ISA={wanted}: this CPU runs {lib.DynaexqCpuIsas().decode()}")
    return lib


def available() -> bool:
    """Whether the kernels are built and registered (once per process)."""
    return _library() is not None


def isas() -> tuple[str, ...]:
    """The instruction sets this CPU runs the kernels with, best first (e.g. avx512, avx2, generic)."""
    return tuple(_library().DynaexqCpuIsas().decode().split(","))


def isa() -> str:
    """The instruction set the kernels use now."""
    return _library().DynaexqCpuIsa().decode()


def set_isa(name: str = "") -> None:
    """Run the kernels with `name` (one of isas(); "" = the best) from the next call on, in
    compiled functions too (the choice is made inside the kernel)."""
    if not _library().DynaexqSetIsa(name.encode()):
        raise ValueError(f"instruction set '{name}': this CPU runs {', '.join(isas())}")


def enabled() -> bool:
    """Whether the MoE op should call the kernel: DYNAEXQ_CPU_KERNEL is read each time a function
    is traced (already compiled functions keep their choice), the build happens once."""
    return os.environ.get("DYNAEXQ_CPU_KERNEL", "1") != "0" and available()


def scratch_bytes(tokens: int, k: int, hidden: int, inter: int) -> int:
    """Host memory one kernel call allocates beside XLA's buffers (csrc/moe_cpu.cc, at most): the
    per-pair outputs f32 [T*k, H], bf16 activations widened to f32 [T, H], and each routed slot's
    rows, gate/up and output (their rows add up to at most T*k) with their int8 quantization."""
    pairs = tokens * k
    return 4 * (pairs * hidden + tokens * hidden + pairs * (2 * hidden + 2 * inter)) + 3 * pairs * max(hidden, inter)


def tier_contribution(x, pool, slots, weights, act: Activation = SWIGLU):
    """One tier's share of the MoE output. x [T, H] (f32 or bf16); slots int32 [T, k], -1 where
    another tier serves the pair; weights f32 [T, k]; the pool's biases (if any) and the activation
    go into the kernel. Returns f32 [T, H]."""
    def attrs(fmt, prefix=""):      # a matrix format as the kernel's attributes
        return {prefix + "kind": np.int32(3 if fmt.is_int else _KINDS[fmt.kind]),
                prefix + "bits": np.int32(fmt.bits if fmt.is_int else 0), prefix + "group": np.int32(fmt.group)}
    dummy, no_zeros = jnp.zeros((1,), jnp.float16), jnp.zeros((0,), jnp.float16)
    args = []
    for t in (pool.gate, pool.up, pool.down):
        args += [t.data, dummy if t.scales is None else t.scales, no_zeros if t.zeros is None else t.zeros]
    no_bias = jnp.zeros((0,), jnp.float32)     # an empty bias: the kernel adds none
    args += [no_bias if b is None else b.astype(jnp.float32) for b in (pool.gate_bias, pool.up_bias, pool.down_bias)]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32))
    return call(x, slots.reshape(-1).astype(jnp.int32), weights.reshape(-1).astype(jnp.float32), *args,
                **attrs(pool.gate.fmt), **attrs(pool.down.fmt, "down_"), act=np.int32(_ACTIVATIONS[act.kind]),
                alpha=np.float32(act.alpha), limit=np.float32(act.limit))


ACT_BLOCK = 32   # the longest run of K rows that shares one activation scale (Mat::kActBlock)


def int_dot(fmt, k: int) -> bool:
    """Whether the kernel multiplies weights of format fmt with k input rows by integer dot
    products (quantizing the activations): integer groups whose sub-tiles (packing.py) are whole
    sets of 4 rows."""
    return fmt.is_int and fmt.group_for(k) // fmt.subtiles % 4 == 0


def act_block(fmt, k: int) -> int:
    """The activations' quantization block of the integer path (Mat::act_block): the largest
    multiple of 4 up to ACT_BLOCK that divides a group's sub-tile (g/p consecutive K rows)."""
    rows = fmt.group_for(k) // fmt.subtiles
    return next(b for b in range(min(rows, ACT_BLOCK) // 4 * 4, 3, -4) if rows % b == 0)


def quantize_activations(x, block: int):
    """What the kernel's integer path does to its activations x [..., K], in pure JAX: int8 per
    block of `block` values along K, symmetric (scale max|x| / 127), round to nearest even;
    returned dequantized (f32), so a float matmul with it models the kernel's integer one."""
    xf = x.astype(jnp.float32)
    blocks = xf.reshape(*xf.shape[:-1], -1, block)
    amax = jnp.abs(blocks).max(-1, keepdims=True)
    inv = jnp.where(amax > 0, jnp.float32(127) / amax, 0.0)
    return (jnp.round(blocks * inv) * (amax / jnp.float32(127))).reshape(xf.shape)


def matmul(x, w, transposed: bool = False):
    """x [T, K] (f32 or bf16) @ w (f32/bf16/fp16 [K, N]; [N, K] read as its transpose when
    `transposed`) -> f32 [T, N], on the CPU (no gradient: dense_matmul adds XLA's)."""
    n = w.shape[0] if transposed else w.shape[1]
    call = jax.ffi.ffi_call(MATMUL_TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return call(x, w, transposed=np.int32(transposed))


def _xla_matmul(x, w, transposed: bool):
    return x @ (w.T if transposed else w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kernel_matmul(x, w, transposed: bool):
    """x [T, K] @ w from the CPU kernel when lowered for the CPU (XLA elsewhere, e.g. in an export
    for CUDA); gradients from XLA."""
    dtype = jnp.result_type(x.dtype, w.dtype)
    return jax.lax.platform_dependent(
        x, w, cpu=lambda x, w: matmul(x, w, transposed).astype(dtype),
        default=lambda x, w: _xla_matmul(x, w, transposed))


def _kernel_matmul_fwd(x, w, transposed):
    return _kernel_matmul(x, w, transposed), (x, w)


def _kernel_matmul_bwd(transposed, res, g):
    return jax.vjp(lambda x, w: _xla_matmul(x, w, transposed), *res)[1](g)


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)

_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def serves(backend: str, platform: str | None = None) -> bool:
    """Whether the kernels serve a model run with MoE backend `backend` on `platform` (default:
    JAX's default backend): the routed experts' op (xla.moe_experts_xla's choice) and the residual
    stream's dtype follow it."""
    return backend == "xla" and (platform or jax.default_backend()) == "cpu" and enabled()


def residual_dtype(dtype, backend: str, platform: str | None = None):
    """The residual stream's dtype for a model whose embedding is `dtype`: f32 where the kernels
    serve a 16-bit model, else dtype. The kernels read 16-bit weights against f32 activations
    either way, and XLA CPU's 16-bit elementwise ops (norms, RoPE, softmax, the residual adds:
    hundreds per decode step) take about 2.5x as long as f32's (benchmarks/decode_profile.py); f32
    is also the more exact stream. The KV cache keeps the model's dtype."""
    return jnp.float32 if jnp.dtype(dtype).itemsize == 2 and serves(backend, platform) else dtype


def dense_matmul(x, w, transposed: bool = False):
    """x [..., K] @ w [K, N] (w [N, K] read as its transpose when `transposed`: the tied embedding
    as the head), the model's dense projections. Few rows (decode: at most MATMUL_MAX_ROWS) go
    through the kernel where it is built and wanted (whatever the MoE backend; DYNAEXQ_CPU_KERNEL=0
    turns it off): XLA CPU would widen 16-bit weights to f32 copies, and copy a transposed w;
    longer products are XLA's GEMMs."""
    rows = math.prod(x.shape[:-1])
    if (rows > MATMUL_MAX_ROWS or w.ndim != 2 or x.dtype not in (jnp.float32, jnp.bfloat16)
            or w.dtype not in _KERNEL_DTYPES or not enabled()):
        if w.dtype.itemsize == 2:
            # Tied to x, a 16-bit w is widened (by XLA CPU) when its product runs, not up front
            # with every other layer's: one layer's f32 copies live at a time, not the model's.
            x, w = jax.lax.optimization_barrier((x, w))
        return _xla_matmul(x, w, transposed)
    y = _kernel_matmul(x.reshape(rows, x.shape[-1]), w, transposed)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def moe_experts_cpu_kernel(x, ids, weights, experts: ExpertPools, activation: Activation = SWIGLU):
    """The MoE op with every tier through the kernel, whatever the shape: x [T, H] (f32 or bf16),
    ids/weights [T, k] -> [T, H] in x.dtype. CPU only and not differentiable (the "xla" backend
    is both where it matters)."""
    if not available():
        raise RuntimeError("the CPU MoE kernel is not built (no C++ compiler, or the build failed)")
    out = jnp.zeros(x.shape, jnp.float32)
    for pool, slots, w, on_tier in tier_pairs(ids, weights, experts):
        out = out + tier_contribution(x, pool, jnp.where(on_tier, slots, -1), w, activation)
    return out.astype(x.dtype)

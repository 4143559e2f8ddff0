"""The CPU kernel of the MoE op (csrc/moe_cpu.cc): one tier's routed experts, each streamed
once from its pool slot and dequantized on the fly, called from XLA as an FFI custom call. The
"xla" backend (xla.py) calls it for every tier at any shape, with XLA's gradients;
moe_experts_cpu_kernel runs every tier through it (forward only).

It is compiled on first use with the machine's C++ compiler against the XLA FFI headers that
jaxlib ships, cached by a hash of everything that shapes the binary, and registered for the
"cpu" platform. Without a compiler (or with DYNAEXQ_CPU_KERNEL=0) the XLA path serves: the
kernel changes speed, never results beyond float rounding.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
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
TARGET = "dynaexq_moe_tier"
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"]
_KINDS = {"f32": 0, "bf16": 1, "fp16": 2}
_ACTIVATIONS = {"swiglu": 0, "clamped_swiglu": 1}


def cache_dir() -> Path:
    return Path(os.environ.get("DYNAEXQ_CACHE", Path.home() / ".cache" / "dynaexq-jax"))


def _cpu_id() -> str:
    """-march=native binds the binary to this CPU: its model and feature flags join the key."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({l for l in lines if l.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build(cxx: str) -> Path:
    """Compile the kernel (or return the cached binary). Raises on a compiler error."""
    include = Path(jaxlib.__file__).parent / "include"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"compiler '{cxx}' does not run: {e}") from e
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), jaxlib.__version__, version,
                                    _cpu_id()]).encode()).hexdigest()[:16]
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
def available() -> bool:
    """Whether the kernel is built and registered (once per process)."""
    cxx = _compiler()
    if cxx is None:
        warnings.warn("no C++ compiler found: the MoE op runs on the (slower) XLA path on the CPU", stacklevel=2)
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build(cxx)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.DynaexqMoeTier), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        warnings.warn(f"the CPU MoE kernel could not be built, using the XLA path: {e}", stacklevel=2)
        return False
    return True


def enabled() -> bool:
    """Whether the MoE op should call the kernel: DYNAEXQ_CPU_KERNEL is read each time a function
    is traced (already compiled functions keep their choice), the build happens once."""
    return os.environ.get("DYNAEXQ_CPU_KERNEL", "1") != "0" and available()


def scratch_bytes(tokens: int, k: int, hidden: int, inter: int) -> int:
    """Host memory one kernel call allocates beside XLA's buffers (csrc/moe_cpu.cc, at most): the
    per-pair outputs f32 [T*k, H], bf16 activations widened to f32 [T, H], and each routed slot's
    rows, gate/up and output while it runs (their rows add up to at most T*k)."""
    pairs = tokens * k
    return 4 * (pairs * hidden + tokens * hidden + pairs * (2 * hidden + 2 * inter))


def tier_contribution(x, pool, slots, weights, act: Activation = SWIGLU):
    """One tier's share of the MoE output. x [T, H] (f32 or bf16); slots int32 [T, k], -1 where
    another tier serves the pair; weights f32 [T, k]; the pool's biases (if any) and the activation
    go into the kernel. Returns f32 [T, H]."""
    fmt = pool.fmt
    kind = 3 if fmt.is_int else _KINDS[fmt.kind]
    dummy = jnp.zeros((1,), jnp.float16)
    args = []
    for t in (pool.gate, pool.up, pool.down):
        args += [t.data, t.scales if t.scales is not None else dummy]
    no_bias = jnp.zeros((0,), jnp.float32)     # an empty bias: the kernel adds none
    args += [no_bias if b is None else b.astype(jnp.float32) for b in (pool.gate_bias, pool.up_bias, pool.down_bias)]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32))
    return call(x, slots.reshape(-1).astype(jnp.int32), weights.reshape(-1).astype(jnp.float32), *args,
                kind=np.int32(kind), bits=np.int32(fmt.bits if fmt.is_int else 0), group=np.int32(fmt.group),
                act=np.int32(_ACTIVATIONS[act.kind]), alpha=np.float32(act.alpha), limit=np.float32(act.limit))


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

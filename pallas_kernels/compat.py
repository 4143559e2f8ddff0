"""Version shims for the Pallas Triton backend across JAX 0.10.x and 0.11.x.

What differs (read from the JAX sources of both lines):
* `jax.experimental.pallas.triton.CompilerParams(num_warps, num_stages)` is the compiler-params class
  in both (older releases called it TritonCompilerParams / pl.GPUCompilerParams; not supported here).
* The custom call the lowering emits: `__gpu$xla.gpu.triton` (XLA compiles the embedded Triton IR)
  on 0.10.x with jaxlib <= 0.10.2 and on 0.11.x while `USE_NEW_CUSTOM_CALL` is off; the alternative
  is `triton_kernel_call_ffi` (Triton compiled at lowering time). 0.11 exports the name in use as
  `pallas.triton.CUSTOM_CALL_TARGET_NAME`.
* Lowering without a GPU: 0.10.x silently targets sm_90; 0.11.x raises unless an abstract GPU device
  is in scope (`jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=...))`).
* 0.11.x warns (DeprecationWarning) each time a Pallas Triton kernel is lowered: the backend is
  deprecated in favour of Mosaic GPU. We keep Triton on purpose (Ampere support, sub-byte unpacking,
  a CPU interpreter) and silence exactly that message.
"""
from __future__ import annotations

import contextlib
import warnings

import jax
from jax.experimental.pallas import triton as _pl_triton

CompilerParams = _pl_triton.CompilerParams

# Every name a Pallas Triton kernel may lower to; the one in use first where JAX says which.
TRITON_CUSTOM_CALL_TARGETS: tuple[str, ...] = tuple(dict.fromkeys((
    getattr(_pl_triton, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton"),
    "__gpu$xla.gpu.triton",
    "triton_kernel_call_ffi",
)))

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)


def triton_params(num_warps: int, num_stages: int):
    return CompilerParams(num_warps=num_warps, num_stages=num_stages)


def default_interpret() -> bool:
    """Interpret mode unless the default backend is a GPU (the Triton kernels only compile there)."""
    return jax.default_backend() != "gpu"


def disabled_triton_checks() -> list:
    """jax.export safety checks to disable so that a module with Triton custom calls serializes."""
    return [jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_CUSTOM_CALL_TARGETS]


@contextlib.contextmanager
def cuda_lowering_target(device_kind: str = "NVIDIA H100"):
    """Scope in which `jax.export(..., platforms=["cuda"])` can lower Pallas Triton kernels on a
    machine without a GPU. On a GPU machine the real device is used and this does nothing."""
    if jax.default_backend() == "gpu":
        yield
        return
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        yield

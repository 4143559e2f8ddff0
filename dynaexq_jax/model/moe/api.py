"""The MoE op's entry point: one signature, dispatched to a backend by name."""
from __future__ import annotations

import contextlib
import contextvars

from dynaexq_jax.model.moe.base import ExpertPools
from dynaexq_jax.model.moe.pallas import moe_experts_pallas
from dynaexq_jax.model.moe.sharded import moe_experts_sharded
from dynaexq_jax.model.moe.xla import moe_experts_xla
from pallas_kernels.grouped_matmul.activation import SWIGLU, Activation

BACKENDS = ("xla", "xla-only", "pallas")
XLA_BACKENDS = ("xla", "xla-only")    # the XLA op, with or without the CPU kernel
_computed_by = contextvars.ContextVar("moe_experts_computed_by", default=None)


@contextlib.contextmanager
def experts_computed_by(fn):
    """While active (in this thread), every moe_experts call returns fn(x, ids, weights,
    activation) instead of running a backend; the pools are not read. The converter's
    calibration pass (checkpoints_convert/calibration.py) runs a family's own forward eagerly
    this way, computing each MoE layer's experts itself from the source weights."""
    token = _computed_by.set(fn)
    try:
        yield
    finally:
        _computed_by.reset(token)


def moe_experts(x, ids, weights, experts: ExpertPools, backend: str = "xla", activation: Activation = SWIGLU):
    """The mixed-tier MoE op: tokens x [T, H] routed to ids/weights [T, k] -> [T, H] in x.dtype.
    backend: "xla" (XLA, with the CPU kernel for the routed experts on a CPU), "xla-only" (XLA
    everywhere) or "pallas" (the Pallas kernels; interpreted, slowly, without a GPU). activation
    (static): SwiGLU, or gpt-oss's clamped variant (pallas_kernels.grouped_matmul.activation); the
    experts' biases, where the pools hold them, are added on every backend. Pools split across
    devices (experts.mesh set, moe.sharded) run on each device over its own slots, summed."""
    if (computed_by := _computed_by.get()) is not None:
        return computed_by(x, ids, weights, activation)
    if experts.mesh is not None:
        return moe_experts_sharded(x, ids, weights, experts,
                                   lambda x, ids, weights, mine: moe_experts(x, ids, weights, mine, backend,
                                                                             activation))
    if backend in XLA_BACKENDS:
        return moe_experts_xla(x, ids, weights, experts, use_kernel=backend == "xla", activation=activation)
    if backend == "pallas":
        return moe_experts_pallas(x, ids, weights, experts, activation=activation)
    raise ValueError(f"unknown MoE backend '{backend}' (use one of {BACKENDS})")

"""The gated activation between the two grouped matmuls, as static kernel metadata.

  swiglu          SiLU(g) * u                                   (Qwen, Mixtral, ...)
  clamped_swiglu  g' = min(g, limit), u' = clip(u, -limit, limit),
                  g' * sigmoid(alpha * g') * (u' + 1)            (gpt-oss)

The one formula (glu) is what every kernel epilogue and every reference applies, in f32; it uses
only elementwise min / max / exp, which the Triton lowering expresses."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

KINDS = ("swiglu", "clamped_swiglu")


@dataclasses.dataclass(frozen=True)
class Activation:
    kind: str = "swiglu"
    alpha: float = 1.0      # clamped_swiglu: the sigmoid's gain
    limit: float = 0.0      # clamped_swiglu: the clamp

    def __post_init__(self):
        if self.kind not in KINDS or (self.kind == "clamped_swiglu" and not self.limit > 0):
            raise ValueError(f"Activation(kind={self.kind!r}, limit={self.limit}): use 'swiglu', or "
                             f"'clamped_swiglu' with a positive limit")


SWIGLU = Activation()


def clamped_swiglu(alpha: float, limit: float) -> Activation:
    return Activation("clamped_swiglu", float(alpha), float(limit))


def glu(g, u, act: Activation):
    """The activation of gate g and up u (f32 arrays of one shape)."""
    if act.kind == "swiglu":
        return g * jax.nn.sigmoid(g) * u
    g = jnp.minimum(g, act.limit)
    u = jnp.minimum(jnp.maximum(u, -act.limit), act.limit)
    return g * jax.nn.sigmoid(act.alpha * g) * (u + 1.0)

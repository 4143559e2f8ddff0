"""The MoE layer as a Flax NNX module, for researchers who build models with Flax.

MoELayer owns what training learns, the router weight; the experts are an INPUT of every call:
the ExpertPools (pools + precision assignment) that the runtime rebuilds between segments, or
single_tier(pool) for a fixed model. Passing them in keeps the module's state free of what the
runtime owns (residency changes never touch the module) and, because the assignment is data,
a new assignment never recompiles an nnx.jit'd model. The layer is route + moe_experts, the same
pure functions the model families use, so it computes exactly what they compute.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dynaexq_jax.model.moe.api import moe_experts
from dynaexq_jax.model.moe.base import ExpertPools, route


class MoELayer(nnx.Module):
    """Routed-expert FFN of one layer: router [H, E] (an nnx.Param), top-k routing as HF Qwen3-MoE.
    The routing comes back on request (return_routing) rather than sown as an nnx.Intermediate:
    sown values grow the module's state at every call, and a jitted model whose state changes
    shape recompiles, which serving must never do."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, norm_topk_prob: bool = True,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        init = jax.nn.initializers.normal(stddev=hidden_size ** -0.5)
        self.router = nnx.Param(init(rngs.params(), (hidden_size, num_experts), param_dtype))
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def __call__(self, x: jax.Array, experts: ExpertPools, *, backend: str = "xla", return_routing: bool = False):
        """x [..., H], experts: this layer's ExpertPools over the router's E experts -> [..., H] in x.dtype;
        with return_routing, (out, expert ids int32 [..., k], their router probabilities f32 [..., k]),
        what the DynaExq runtime's hotness is computed from."""
        if experts.num_experts != self.router.shape[1]:
            raise ValueError(f"MoELayer routes to {self.router.shape[1]} experts but the ExpertPools assign "
                             f"{experts.num_experts}")
        flat = x.reshape(-1, x.shape[-1])
        ids, weights, probs = route(flat, self.router[...], self.top_k, self.norm_topk_prob)
        out = moe_experts(flat, ids, weights, experts, backend).reshape(x.shape)
        if not return_routing:
            return out
        lead = x.shape[:-1] + (self.top_k,)
        return out, ids.reshape(lead), probs.reshape(lead)

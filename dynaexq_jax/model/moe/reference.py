"""The dense reference of the MoE op: every backend is tested against it."""
from __future__ import annotations

import jax.numpy as jnp

from dynaexq_jax.model.moe import cpu_kernel
from dynaexq_jax.model.moe.base import ExpertPools, tier_pairs
from pallas_kernels.grouped_matmul.activation import SWIGLU, Activation, glu


def tier_hidden(x, ids, weights, experts: ExpertPools, activation: Activation = SWIGLU, *,
                int_dot: bool = False):
    """Per tier that routed tokens reach: (pool, combine [T, S], h [T, S, I] f32), h the activations
    its down projection multiplies (routing weights applied), before the integer path quantizes
    them; combine[t, s] is token t's routing weight for the expert held in slot s. int_dot: x
    quantized as the CPU kernel's integer path does (moe_experts_reference)."""
    H = x.shape[1]
    for pool, slots, w, _ in tier_pairs(ids, weights, experts):
        xf = x.astype(jnp.float32)
        if int_dot and cpu_kernel.int_dot(pool.gate.fmt, H):
            xf = cpu_kernel.quantize_activations(xf, cpu_kernel.act_block(pool.gate.fmt, H))
        combine = jnp.zeros((x.shape[0], pool.size), jnp.float32).at[jnp.arange(x.shape[0])[:, None], slots].add(w)
        g = jnp.einsum("th,shi->tsi", xf, pool.gate.dequantize(jnp.float32))
        u = jnp.einsum("th,shi->tsi", xf, pool.up.dequantize(jnp.float32))
        if pool.has_bias:
            g, u = g + pool.gate_bias[None], u + pool.up_bias[None]
        yield pool, combine, glu(g, u, activation) * combine[..., None]


def moe_experts_reference(x, ids, weights, experts: ExpertPools, activation: Activation = SWIGLU, *,
                          int_dot: bool = False):
    """Dequantize every expert at its assigned tier and slot, run every slot on every token, combine.
    x: [T, H], ids/weights: [T, k] -> [T, H] (f32 accumulation, x.dtype out). int_dot: model the
    CPU kernel's integer path, which quantizes the activations of the matrices it multiplies that
    way (cpu_kernel.int_dot, cpu_kernel.quantize_activations)."""
    out = jnp.zeros(x.shape, jnp.float32)
    I = experts.pools[0].gate.n
    for pool, combine, h in tier_hidden(x, ids, weights, experts, activation, int_dot=int_dot):
        if int_dot and cpu_kernel.int_dot(pool.down.fmt, I):
            h = cpu_kernel.quantize_activations(h, cpu_kernel.act_block(pool.down.fmt, I))
        out = out + jnp.einsum("tsi,sih->th", h, pool.down.dequantize(jnp.float32))
        if pool.has_bias:
            out = out + combine @ pool.down_bias.astype(jnp.float32)
    return out.astype(x.dtype)

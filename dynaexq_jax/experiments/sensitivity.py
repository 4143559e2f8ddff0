"""What a LO copy costs, per expert: the loss a token pays when one of its experts runs in LO
instead of HI, measured on calibration text (issue: allocation that knows the cost of a LO copy).

For every routed (token, expert) pair of the all-HI model, the pair's output changes by
w * (y_lo - y_hi) when that expert alone is LO (w its routing weight); to first order the loss
changes by g . w (y_lo - y_hi), g the loss gradient at the MoE layer's output. lo_costs averages
the square of that change per unit of routed weight: cost[l, e] = sum (g . w dy)^2 / sum w over the
pairs routed to e. It is in loss units, so it compares across layers: traffic x cost is the loss
a HI slot saves, which is what the sensitivity policy ranks by (runtime.policies) and what the
greedy capacity strategy allocates slots by (runtime.budget).

One jitted forward and backward per calibration stream: the forward recomputes each pair in both
tiers on the side, the backward differentiates the loss with respect to a zero added to every MoE
layer's output (the gradients g).
Plain XLA (the CPU kernel has no gradient), every expert of a layer in one pool per tier."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import ConfigError
from dynaexq_jax.model.families import decoder
from dynaexq_jax.model.layers import MoE, moe_route
from dynaexq_jax.model.moe import HI, LO, ExpertPools
from dynaexq_jax.model.moe.api import moe_experts
from dynaexq_jax.serving.checkpoint import Checkpoint, attach_experts

BACKEND = "xla-only"
FAMILIES = ("qwen3_moe",)       # whose forward is decoder.decode with the plain routed MLP


def lo_costs(ckpt: Checkpoint, streams: list[np.ndarray]) -> np.ndarray:
    """f64 [L_moe, E]: each expert's first-order loss cost of its LO copy per unit of routed
    weight (module docstring), over token streams (int [B, N + 1] each, scored teacher-forced
    from an empty cache). Experts no token reached cost 0."""
    cfg = ckpt.config
    if cfg.model_type not in FAMILIES:
        raise ConfigError(f"lo_costs supports {', '.join(FAMILIES)} models, not {cfg.model_type}")
    E, k, layers = cfg.num_experts, cfg.num_experts_per_tok, list(cfg.moe_layers)
    # Every expert in both pools; tier/slot select all-HI, LO by replacing the tiers.
    both = {l: ExpertPools((jax.device_put(ckpt.experts[l]["hi"]), jax.device_put(ckpt.experts[l]["lo"])),
                           jnp.full(E, HI, jnp.int32), jnp.arange(E, dtype=jnp.int32)) for l in layers}
    params = attach_experts(ckpt.params, both)
    cost, mass = np.zeros((len(layers), E)), np.zeros((len(layers), E))

    def loss(params, tokens, zeros):
        """The streams' summed NLL, and per MoE layer every (token, expert) pair recomputed in both
        tiers: (expert ids [P], output changes dy [P, H], routing weights [P]), P = B T k."""
        moe, pairs = iter(range(len(layers))), {}

        def mlp(p, c, h, backend):
            if not isinstance(p, MoE):
                return decoder.mlp(p, c, h, backend)
            i = next(moe)
            B, T, H = h.shape
            flat = h.reshape(B * T, H)
            ids, w, probs = moe_route(p, c, flat)
            x, e = jnp.repeat(flat, k, axis=0), ids.reshape(-1, 1)       # one row per pair
            one = jnp.ones(e.shape, jnp.float32)
            lo = ExpertPools(p.experts.pools, jnp.full(E, LO, jnp.int32), p.experts.slot)
            dy = moe_experts(x, e, one, lo, BACKEND).astype(jnp.float32) - moe_experts(x, e, one, p.experts, BACKEND)
            pairs[i] = (e[:, 0], dy, w.reshape(-1))
            out = moe_experts(flat, ids, w, p.experts, BACKEND).reshape(B, T, H) + zeros[i]
            return out, ids.reshape(B, T, k), probs.reshape(B, T, k)
        inputs = tokens[:, :-1]
        logits, _, _ = decoder.decode(params, cfg, inputs, decoder.init_cache(cfg, *inputs.shape),
                                      backend=BACKEND, mlp=mlp)
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).sum(), pairs

    @jax.jit
    def pair_changes(params, tokens, zeros):
        """Per MoE layer (expert ids, first-order loss changes g . w dy, routing weights), each [P]:
        one forward (the pairs ride along as auxiliary outputs) and its backward (the gradients)."""
        grads, pairs = jax.grad(loss, argnums=2, has_aux=True)(params, tokens, zeros)
        return {i: (e, (dy * jnp.repeat(grads[i].reshape(-1, cfg.hidden_size), k, axis=0)).sum(-1) * w, w)
                for i, (e, dy, w) in pairs.items()}

    for stream in streams:
        tokens = jnp.asarray(stream, jnp.int32)
        B, T = tokens.shape[0], tokens.shape[1] - 1
        zeros = [jnp.zeros((B, T, cfg.hidden_size), jnp.float32) for _ in layers]
        for i, (e, change, w) in pair_changes(params, tokens, zeros).items():
            e = np.asarray(e)
            np.add.at(cost[i], e, np.asarray(change, np.float64) ** 2)
            np.add.at(mass[i], e, np.asarray(w, np.float64))
    return np.where(mass > 0, cost / np.where(mass > 0, mass, 1.0), 0.0)

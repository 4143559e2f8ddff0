"""The MoE layer as a Flax NNX module: the functional path's numbers, under nnx.jit, in a model."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynaexq_jax.model.moe import ExpertPools, moe_experts, quantize_experts, route, single_tier
from dynaexq_jax.model.moe.nnx import MoELayer

SEED = int.from_bytes(os.urandom(4), "little")
E, H, I, K = 8, 32, 32, 2


def _pools(rng, spec="int4:g16") -> ExpertPools:
    raw = [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in [(E, H, I), (E, H, I), (E, I, H)]]
    return jax.device_put(single_tier(quantize_experts(*raw, spec)))


def _two_tiers(rng) -> ExpertPools:
    """The first three experts HI (bf16), the rest LO (int4), in reversed slot order."""
    raw = [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in [(E, H, I), (E, H, I), (E, I, H)]]
    hi, lo = np.arange(3)[::-1], np.arange(3, E)[::-1]
    pools = (quantize_experts(*[w[hi] for w in raw], "bf16"), quantize_experts(*[w[lo] for w in raw], "int4:g16"))
    tier = np.array([0] * 3 + [1] * (E - 3), np.int32)
    slot = np.concatenate([np.arange(3)[::-1], np.arange(E - 3)[::-1]]).astype(np.int32)
    return jax.device_put(ExpertPools(pools, jnp.asarray(tier), jnp.asarray(slot)))


@pytest.mark.parametrize("backend", ["xla", "xla-only"])
def test_layer_equals_the_functional_path(backend):
    rng = np.random.default_rng(SEED)
    layer = MoELayer(H, E, K, norm_topk_prob=True, rngs=nnx.Rngs(SEED % 1000))
    experts = _two_tiers(rng)
    x = jnp.asarray(rng.standard_normal((2, 5, H)), jnp.float32)
    got, got_ids, got_probs = layer(x, experts, backend=backend, return_routing=True)
    flat = x.reshape(-1, H)
    ids, w, probs = route(flat, layer.router[...], K, True)
    want = moe_experts(flat, ids, w, experts, backend).reshape(x.shape)
    assert got.shape == x.shape and got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"seed {SEED}")
    np.testing.assert_array_equal(np.asarray(layer(x, experts, backend=backend)), np.asarray(want))
    assert np.array_equal(got_ids, ids.reshape(2, 5, K)) and np.array_equal(got_probs, probs.reshape(2, 5, K))
    with pytest.raises(ValueError, match="routes to 8 experts"):
        layer(x, single_tier(experts.pools[0]))


def test_layer_jits_and_a_new_assignment_does_not_recompile():
    """The assignment is data: swapping experts between tiers reuses the compiled function."""
    rng = np.random.default_rng(SEED)
    layer = MoELayer(H, E, K, rngs=nnx.Rngs(0))
    traces = []

    @nnx.jit
    def apply(layer, x, experts):
        traces.append(None)
        return layer(x, experts)

    x = jnp.asarray(rng.standard_normal((3, H)), jnp.float32)
    a = _two_tiers(rng)
    # Experts 5-7 now HI, 0-4 LO (the pools' slots now hold other experts' weights: the op reads the slots).
    b = a.replace(tier=jnp.asarray([1] * 5 + [0] * 3, jnp.int32), slot=jnp.asarray([0, 1, 2, 3, 4, 0, 1, 2], jnp.int32))
    for experts in (a, b):
        np.testing.assert_allclose(np.asarray(apply(layer, x, experts)), np.asarray(layer(x, experts)),
                                   rtol=1e-5, atol=1e-6, err_msg=f"seed {SEED}")
    assert len(traces) == 1


class TinyMoEModel(nnx.Module):
    """What a researcher writes: embedding, a norm, the MoE layer as a residual block, logits."""

    def __init__(self, vocab: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, H, rngs=rngs)
        self.norm = nnx.RMSNorm(H, rngs=rngs)
        self.moe = MoELayer(H, E, K, rngs=rngs)

    def __call__(self, tokens, experts: ExpertPools):
        h = self.embed(tokens)
        h = h + self.moe(self.norm(h), experts)
        return self.embed.attend(h)


def test_a_tiny_nnx_model_with_the_layer_trains_its_router():
    """Forward under nnx.jit, and a gradient step through the routed experts reaches the router."""
    rng = np.random.default_rng(SEED)
    model = TinyMoEModel(50, rngs=nnx.Rngs(1))
    experts = _pools(rng, "f32")
    tokens = jnp.asarray(rng.integers(0, 50, (2, 6)), jnp.int32)
    logits = nnx.jit(lambda m, t, e: m(t, e))(model, tokens, experts)
    assert logits.shape == (2, 6, 50) and np.isfinite(np.asarray(logits)).all()

    def loss(model):
        out = model(tokens[:, :-1], experts)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), tokens[:, 1:, None], -1))

    grads = nnx.jit(nnx.grad(loss))(model)
    assert float(jnp.abs(grads.moe.router[...]).max()) > 0, f"seed {SEED}"

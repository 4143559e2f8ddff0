"""Qwen3-Next (HF model_type `qwen3_next`) as pure functions over flax.struct pytrees.

A hybrid stack: each layer's token mixer is either gated full attention or a Gated DeltaNet
(linear attention with a recurrent state), chosen by cfg.layer_types; each layer's MLP is dense
or routed experts plus a sigmoid-gated shared expert. Weights are input-major ([in, out]); the
shared decoder pieces (layers.py: RMSNorm, RoPE, the attention core, the MLPs, the logits tail)
and Qwen3-MoE's attention parameters are reused. Unlike Qwen3-MoE, every model-level RMSNorm here
is zero-centred: x_hat * (1 + w). `abstract(cfg)` describes the parameter tree once (schema.py).

The linear layers follow the reference's torch fallbacks (torch_chunk_gated_delta_rule,
torch_recurrent_gated_delta_rule, causal_conv1d_update): a chunked delta rule for multi-token
inputs (intra-chunk work batched over chunks, one lax.scan carrying the state across chunks) and
the per-token recurrence for single-token decode.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
from flax import struct

from dynaexq_jax.model.config import FULL_ATTENTION, LINEAR_ATTENTION, ModelConfig
from dynaexq_jax.model.families import qwen3_moe
from dynaexq_jax.model.families.decoder import Attention, attention_schema
from dynaexq_jax.model.families.schema import CONV, LINEAR, Tensor
from dynaexq_jax.model.layers import (
    DenseMLP,
    Params,
    RouterInfo,
    SharedMoE,
    attend,
    dense_mlp,
    dense_mlp_schema,
    embed,
    kv_caches,
    linear,
    logits,
    params_schema,
    rms_norm,
    rms_norm_zero_centred,
    shared_moe_mlp,
    shared_moe_schema,
)
from dynaexq_jax.model.rope import config_table, rope

CHUNK_SIZE = 64   # the reference's chunk length for the chunked delta rule

# Where a config.json omits a key, transformers falls back to Qwen3NextConfig's defaults, which
# differ from config.py's generic ones (e.g. head_dim, norm_topk_prob).
HF_DEFAULTS = dict(head_dim=256, num_key_value_heads=2, intermediate_size=5632, moe_intermediate_size=512,
                   shared_expert_intermediate_size=512, num_experts=512, num_experts_per_tok=10,
                   norm_topk_prob=True, linear_conv_kernel_dim=4, linear_key_head_dim=128,
                   linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
                   full_attention_interval=4, partial_rotary_factor=0.25)
MIXERS = (FULL_ATTENTION, LINEAR_ATTENTION)
# The multi-token-prediction head (`mtp.*`, in the released checkpoints) is not used for ordinary
# decoding; the skipped names land in the converted checkpoint's metadata.
SKIPPED = qwen3_moe.SKIPPED + ((re.compile(r"mtp\..+"), "multi-token-prediction (MTP) head: not used for decoding"),)


@struct.dataclass
class GatedDeltaNet:
    in_qkvz: jax.Array   # [H, 2*nK*dk + 2*nV*dv]; per key head: [q dk | k dk | v r*dv | z r*dv], r = nV/nK
    in_ba: jax.Array     # [H, 2*nV]; per key head: [b r | a r]
    conv: jax.Array      # [K, 2*nK*dk + nV*dv] depthwise causal conv taps over channels [q | k | v]
    dt_bias: jax.Array   # [nV]
    A_log: jax.Array     # [nV]
    norm: jax.Array      # [dv] gated RMSNorm weight (plain, not zero-centred)
    out: jax.Array       # [nV*dv, H]


@struct.dataclass
class Layer:
    """Exactly one of attn / linear_attn is set (cfg.layer_types[i])."""
    input_norm: jax.Array                # [H] zero-centred
    attn: Attention | None               # Attention.q is [H, nH*2*hd]: per head [query hd | gate hd]
    linear_attn: GatedDeltaNet | None
    post_norm: jax.Array                 # [H] zero-centred
    mlp: DenseMLP | SharedMoE


@struct.dataclass
class HybridCache:
    """k [B*nKV, hd, S] / v [B*nKV, S, hd]: one pair per full-attention layer (in
    cfg.attention_layers order; layers.kv_caches);
    conv: one [B, K-1, conv_dim] per linear layer (the last K-1 conv inputs); state: one f32
    [B, nV, dk, dv] per linear layer (the delta-rule memory); lengths int32 [B]."""
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    conv: tuple[jax.Array, ...]
    state: tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


def conv_dim(cfg: ModelConfig) -> int:
    """Channels of the conv (and of its state): q and k of every key head, v of every value head."""
    return (2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
            + cfg.linear_num_value_heads * cfg.linear_value_head_dim)


def _gated_delta_net_schema(cfg: ModelConfig, prefix: str) -> GatedDeltaNet:
    """Projections are only transposed to input-major: the fused in_proj_qkvz / in_proj_ba keep the
    reference's per-key-head grouping, which gated_delta_net splits."""
    H, nK, nV = cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    return GatedDeltaNet(
        in_qkvz=Tensor((H, 2 * nK * dk + 2 * nV * dv), prefix + "in_proj_qkvz.weight", LINEAR),
        in_ba=Tensor((H, 2 * nV), prefix + "in_proj_ba.weight", LINEAR),
        conv=Tensor((cfg.linear_conv_kernel_dim, conv_dim(cfg)), prefix + "conv1d.weight", CONV),
        dt_bias=Tensor((nV,), prefix + "dt_bias", init="ones"),
        A_log=Tensor((nV,), prefix + "A_log", init="log_decay"),
        norm=Tensor((dv,), prefix + "norm.weight", init="norm"),
        out=Tensor((nV * dv, H), prefix + "out_proj.weight", LINEAR, "residual"))


def abstract(cfg: ModelConfig) -> Params:
    """The parameter tree with schema leaves (see schema.py)."""
    H = cfg.hidden_size
    bias = ("q", "k", "v", "o") if cfg.attention_bias else ()
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        linear_layer = i in cfg.linear_layers
        mlp = shared_moe_schema(cfg, p + "mlp.") if cfg.is_moe_layer(i) else dense_mlp_schema(p + "mlp.", H,
                                                                                              cfg.intermediate_size)
        layers.append(Layer(
            input_norm=Tensor((H,), p + "input_layernorm.weight", init="norm_zc"),
            attn=None if linear_layer else attention_schema(cfg, p + "self_attn.", bias=bias, qk_norm="head",
                                                             q_width=2, norm_init="norm_zc"),
            linear_attn=_gated_delta_net_schema(cfg, p + "linear_attn.") if linear_layer else None,
            post_norm=Tensor((H,), p + "post_attention_layernorm.weight", init="norm_zc"), mlp=mlp))
    return params_schema(cfg, tuple(layers), norm_init="norm_zc")


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> HybridCache:
    conv = (batch, cfg.linear_conv_kernel_dim - 1, conv_dim(cfg))
    # The recurrent state stays f32 whatever the model dtype (the reference computes it in f32).
    state = (batch, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
    n_attn, n_lin = len(cfg.attention_layers), len(cfg.linear_layers)
    k, v = kv_caches(n_attn, batch, cfg.num_kv_heads, max_len, cfg.head_dim, dtype)
    return HybridCache(k, v,
                       tuple(jnp.zeros(conv, dtype) for _ in range(n_lin)),
                       tuple(jnp.zeros(state, jnp.float32) for _ in range(n_lin)),
                       jnp.zeros((batch,), jnp.int32))


def gated_rms_norm(x, z, w, eps):
    """Qwen3NextRMSNormGated: plain RMSNorm (w * x_hat) times SiLU(z) in f32, cast back."""
    return (rms_norm(x, w, eps).astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))).astype(x.dtype)


def l2norm(x, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def gated_attention(p: Attention, cfg: ModelConfig, x, positions, k_cache, v_cache, start):
    """x: [B, T, H] -> (out [B, T, H], caches). q_proj yields a query and an output gate per head;
    the attention output is multiplied by sigmoid(gate) before o_proj."""
    B, T, _ = x.shape
    nH, nKV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qg = linear(x, p.q, p.q_bias).reshape(B, T, nH, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:].reshape(B, T, nH * hd)
    k = linear(x, p.k, p.k_bias).reshape(B, T, nKV, hd)
    v = linear(x, p.v, p.v_bias).reshape(B, T, nKV, hd)
    q = rope(rms_norm_zero_centred(q, p.q_norm, cfg.rms_norm_eps), positions, config_table(cfg))
    k = rope(rms_norm_zero_centred(k, p.k_norm, cfg.rms_norm_eps), positions, config_table(cfg))
    out, k_cache, v_cache = attend(q, k, v, positions, k_cache, v_cache, start)
    return linear(out * jax.nn.sigmoid(gate), p.o, p.o_bias), k_cache, v_cache


def causal_conv(x, w, conv_state, n_valid):
    """Depthwise causal conv1d + SiLU continuing from conv_state.
    x: [B, T, C]; w: [K, C]; conv_state: [B, K-1, C] (the K-1 inputs before x); n_valid int32 [B]:
    how many of x's tokens are real. Returns (out [B, T, C], new state [B, K-1, C]): the K-1 inputs
    ending at the last REAL token, so right padding never enters the carried state."""
    K, T = w.shape[0], x.shape[1]
    xs = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)           # [B, K-1+T, C]
    wf = w.astype(jnp.float32)
    out = sum(xs[:, j:j + T].astype(jnp.float32) * wf[j] for j in range(K))
    new_state = jax.vmap(lambda a, n: jax.lax.dynamic_slice_in_dim(a, n, K - 1, axis=0))(xs, n_valid)
    return jax.nn.silu(out).astype(x.dtype), new_state.astype(conv_state.dtype)


def recurrent_gated_delta_rule(q, k, v, g, beta, state):
    """The gated delta rule one token at a time (the reference's decode path), all f32.
    q, k: [B, T, h, dk] (l2-normalised, q scaled by dk^-0.5); v: [B, T, h, dv]; g, beta: [B, T, h];
    state: [B, h, dk, dv]. Returns (out [B, T, h, dv], final state)."""
    def step(S, inputs):
        q_t, k_t, v_t, g_t, b_t = inputs
        S = S * jnp.exp(g_t)[..., None, None]                                 # decay
        kv_mem = jnp.einsum("bhkv,bhk->bhv", S, k_t)                          # what S predicts for k_t
        S = S + k_t[..., :, None] * ((v_t - kv_mem) * b_t[..., None])[..., None, :]
        return S, jnp.einsum("bhkv,bhk->bhv", S, q_t)
    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta))
    state, out = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(out, 0, 1), state


def _forward_substitution(a, b):
    """x_i = b_i - sum_{j<i} a_ij x_j, one row at a time (rows not yet solved are still zero)."""
    def row(i, x):
        return x.at[..., i, :].set(b[..., i, :] - jnp.einsum("...j,...jd->...d", a[..., i, :], x))
    return jax.lax.fori_loop(0, a.shape[-1], row, jnp.zeros_like(b))


def _triangular_solve(a, b):
    return jax.lax.linalg.triangular_solve(a, b, left_side=True, lower=True, unit_diagonal=True)


def solve_unit_lower(a, b):
    """x with a x = b; a: [..., C, C] unit lower triangular, b: [..., C, d]. XLA:CPU expands a
    batched triangular_solve larger than 16 x 16 into a slow loop (about 300 ms for 32 systems
    of 64 x 64, against 0.5 ms for C vector steps of forward substitution), so the CPU does the
    substitution and other platforms (GPU: batched trsm) the library solve."""
    return jax.lax.platform_dependent(a, b, cpu=_forward_substitution, default=_triangular_solve)


def chunk_gated_delta_rule(q, k, v, g, beta, state, chunk_size: int = CHUNK_SIZE):
    """The gated delta rule over chunks of C = chunk_size tokens (WY/UT form, as the reference's
    torch_chunk_gated_delta_rule): within a chunk the sequential updates collapse into one unit
    lower-triangular solve; a lax.scan carries the state from chunk to chunk. The largest pairwise
    tensor is one [C, C] block per chunk and head. Same arguments and result as the recurrent rule.
    Tokens with g = 0 and beta = 0 leave the state unchanged (how padding is masked)."""
    B, T, h, dk = k.shape
    dv = v.shape[-1]
    C = chunk_size
    pad = -T % C
    N = (T + pad) // C

    def chunks(a):  # [B, T, h, ...] -> [B, h, N, C, ...], zero padded at the end
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        a = jnp.moveaxis(a, 2, 1)
        return a.reshape(B, h, N, C, *a.shape[3:])
    q, k, v, g, beta = map(chunks, (q, k, v, g, beta))
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    cum = jnp.cumsum(g, axis=-1)                                             # [B, h, N, C] log decay from chunk start
    lower = jnp.tril(jnp.ones((C, C), bool))
    # decay[i, j] = exp(cum_i - cum_j) for j <= i, else 0 (masked before exp: no overflow).
    decay = jnp.where(lower, jnp.exp(jnp.where(lower, cum[..., :, None] - cum[..., None, :], 0.0)), 0.0)
    strict = jnp.tril(jnp.ones((C, C), bool), -1)
    # (I + L) with L the strictly lower part of (k_beta k^T) * decay: the UT system.
    ut = jnp.where(strict, (k_beta @ jnp.swapaxes(k, -1, -2)) * decay, 0.0) + jnp.eye(C, dtype=k.dtype)
    u = solve_unit_lower(ut, v_beta)                                         # [B, h, N, C, dv] new values
    w = solve_unit_lower(ut, k_beta * jnp.exp(cum)[..., None])               # [B, h, N, C, dk] decayed keys read from S
    attn = (q @ jnp.swapaxes(k, -1, -2)) * decay                             # [B, h, N, C, C] intra-chunk
    q_dec = q * jnp.exp(cum)[..., None]
    k_dec = k * jnp.exp(cum[..., -1:] - cum)[..., None]
    chunk_decay = jnp.exp(cum[..., -1])[..., None, None]                     # [B, h, N, 1, 1]

    def step(S, c):                                                          # S: [B, h, dk, dv]
        u_c, w_c, q_c, k_c, a_c, d_c = c
        v_new = u_c - w_c @ S
        out = q_c @ S + a_c @ v_new
        return S * d_c + jnp.swapaxes(k_c, -1, -2) @ v_new, out
    xs = tuple(jnp.moveaxis(a, 2, 0) for a in (u, w, q_dec, k_dec, attn, chunk_decay))
    state, out = jax.lax.scan(step, state, xs)                               # out: [N, B, h, C, dv]
    out = jnp.moveaxis(out, 0, 2).reshape(B, h, N * C, dv)[:, :, :T]
    return jnp.moveaxis(out, 1, 2), state


def gated_delta_net(p: GatedDeltaNet, cfg: ModelConfig, x, conv_state, state, n_valid, real):
    """x: [B, T, H]; conv_state [B, K-1, conv_dim]; state f32 [B, nV, dk, dv]; n_valid int32 [B];
    real bool [B, T] (position < n_valid). Returns (out [B, T, H], conv_state, state)."""
    B, T, _ = x.shape
    nK, nV = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, r = cfg.linear_key_head_dim, cfg.linear_value_head_dim, nV // nK
    # The fused projections are grouped by key head (fix_query_key_value_ordering).
    qkvz = linear(x, p.in_qkvz).reshape(B, T, nK, 2 * dk + 2 * r * dv)
    q, k = qkvz[..., :dk], qkvz[..., dk:2 * dk]
    v = qkvz[..., 2 * dk:2 * dk + r * dv].reshape(B, T, nV * dv)
    z = qkvz[..., 2 * dk + r * dv:].reshape(B, T, nV, dv)
    ba = linear(x, p.in_ba).reshape(B, T, nK, 2 * r)
    b, a = ba[..., :r].reshape(B, T, nV), ba[..., r:].reshape(B, T, nV)

    mixed = jnp.concatenate([q.reshape(B, T, nK * dk), k.reshape(B, T, nK * dk), v], axis=-1)
    mixed, conv_state = causal_conv(mixed, p.conv, conv_state, n_valid)
    q = mixed[..., :nK * dk].reshape(B, T, nK, dk)
    k = mixed[..., nK * dk:2 * nK * dk].reshape(B, T, nK, dk)
    v = mixed[..., 2 * nK * dk:].reshape(B, T, nV, dv)

    beta = jax.nn.sigmoid(b).astype(jnp.float32)
    g = -jnp.exp(p.A_log.astype(jnp.float32)) * jax.nn.softplus(a.astype(jnp.float32) + p.dt_bias.astype(jnp.float32))
    # Padding: no decay (g = 0) and no write (beta = 0) keep the state exactly as after the real tokens.
    beta = jnp.where(real[..., None], beta, 0.0)
    g = jnp.where(real[..., None], g, 0.0)
    # Each key head serves r consecutive value heads.
    q = jnp.repeat(l2norm(q.astype(jnp.float32)), r, axis=2) * dk ** -0.5
    k = jnp.repeat(l2norm(k.astype(jnp.float32)), r, axis=2)
    v = v.astype(jnp.float32)
    if T == 1:
        core, state = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    else:
        core, state = chunk_gated_delta_rule(q, k, v, g, beta, state, min(CHUNK_SIZE, T))
    core = gated_rms_norm(core.astype(x.dtype), z, p.norm, cfg.rms_norm_eps)   # [B, T, nV, dv]
    return linear(core.reshape(B, T, nV * dv), p.out), conv_state, state


def forward(params: Params, cfg: ModelConfig, tokens, cache: HybridCache, *, backend: str = "xla",
            logits_at: jax.Array | None = None, valid: jax.Array | None = None):
    """Run tokens [B, T] that continue each sequence at position cache.lengths[b]; the same contract
    as qwen3_moe.forward. valid int32 [B] (default T): real tokens per row (right padding). Padded
    tokens write KV slots that no real query sees and are masked out of the conv and recurrent
    states, so the cache after a padded prefill equals the cache after exactly the real tokens."""
    B, T = tokens.shape
    start = cache.lengths
    n_valid = jnp.full((B,), T, jnp.int32) if valid is None else valid.astype(jnp.int32)
    real = jnp.arange(T)[None, :] < n_valid[:, None]                       # [B, T]
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    eps = cfg.rms_norm_eps
    x = embed(params, tokens, backend)
    ks, vs, convs, states, r_ids, r_probs = [], [], [], [], [], []
    for layer in params.layers:
        h = rms_norm_zero_centred(x, layer.input_norm, eps)
        if layer.linear_attn is not None:
            j = len(convs)
            a, conv, state = gated_delta_net(layer.linear_attn, cfg, h, cache.conv[j], cache.state[j], n_valid, real)
            convs.append(conv)
            states.append(state)
        else:
            j = len(ks)
            a, kc, vc = gated_attention(layer.attn, cfg, h, positions, cache.k[j], cache.v[j], start)
            ks.append(kc)
            vs.append(vc)
        x = x + a
        h = rms_norm_zero_centred(x, layer.post_norm, eps)
        if isinstance(layer.mlp, SharedMoE):
            m, ids, probs = shared_moe_mlp(layer.mlp, cfg, h, backend)
            r_ids.append(ids)
            r_probs.append(probs)
        else:
            m = dense_mlp(layer.mlp, h)
        x = x + m
    new_cache = HybridCache(tuple(ks), tuple(vs), tuple(convs), tuple(states), start + n_valid)
    out = logits(params, x, functools.partial(rms_norm_zero_centred, eps=eps), logits_at)
    return out, new_cache, RouterInfo(tuple(r_ids), tuple(r_probs))

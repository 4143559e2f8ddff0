"""gpt-oss (HF model_type `gpt_oss`, GptOssForCausalLM) as pure functions over flax.struct pytrees.

A Llama-style stack with gpt-oss's own pieces:
* attention with biases on q/k/v/o, a learned per-head sink logit that joins each softmax's
  denominator (layers.attend(sinks=...)), and layer_types alternating sliding-window
  (`sliding_attention`, cfg.sliding_window positions) and full attention; YaRN RoPE (rope.py);
* every MLP routed: the router has a bias, picks the top-k LOGITS and softmaxes over those k;
* experts with biases (gate/up [I], down [H], held in the tier pools beside the weights, so a swap
  moves them with the expert) and a clamped SwiGLU: g = min(g, limit), u = clip(u, -limit, limit),
  g * sigmoid(alpha * g) * (u + 1) (the MoE op's static activation, on every backend).
HF stores the experts fused and input-major with gate and up interleaved on the last axis, either
in float (what transformers saves) or in MXFP4 (the released checkpoints): GptOssExperts
reads both (GptOssExperts); MXFP4 is dequantized exactly at conversion and the tiers are the project's formats.
The decoder is decoder.py's. Weights are input-major.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dynaexq_jax.errors import ConfigError, TensorShapeError
from dynaexq_jax.model.config import FULL_ATTENTION, ModelConfig
from dynaexq_jax.model.families import decoder, qwen3_moe
from dynaexq_jax.model.families.decoder import SLIDING_ATTENTION, KVCache, attention_schema, layer_schema
from dynaexq_jax.model.families.schema import LINEAR, Experts, Tensor
from dynaexq_jax.model.layers import MoE, Params, linear, params_schema
from dynaexq_jax.model.moe import moe_experts
from pallas_kernels.grouped_matmul import Activation, clamped_swiglu

MIXERS = (FULL_ATTENTION, SLIDING_ATTENTION)
# GptOssConfig's defaults where config.py's generic ones differ (or it has none); its rope default
# (YaRN) and layer_types default depend on other keys: config_fields fills them in.
HF_DEFAULTS = dict(num_hidden_layers=36, num_local_experts=128, vocab_size=201088, hidden_size=2880,
                   intermediate_size=2880, head_dim=64, num_attention_heads=64, num_key_value_heads=8,
                   sliding_window=128, max_position_embeddings=131072, rms_norm_eps=1e-5, num_experts_per_tok=4,
                   swiglu_alpha=1.702, swiglu_limit=7.0, attention_bias=True, rope_theta=150000.0)
DEFAULT_ROPE = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                    original_max_position_embeddings=4096)
SKIPPED = qwen3_moe.SKIPPED
# Pre-quantized weights the converter reads (config.json's quantization_config.quant_method): the
# released checkpoints' MXFP4 experts, dequantized exactly (GptOssExperts).
SOURCE_QUANTIZATION = ("mxfp4",)
init_cache = decoder.init_cache


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 (the OCP microscaling format gpt-oss ships its experts in, as transformers'
    integrations/mxfp4.py reads it) -> f32. blocks uint8 [..., G, 16]: 32 e2m1 values per block of
    a row, two per byte, the low nibble first; scales uint8 [..., G]: e8m0 exponents (2**(s - 127)).
    Returns [..., G * 32]; every value is exact in f32 (and in bf16)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match "
                         "(blocks [..., G, 16], scales [..., G])")
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    values = FP4_VALUES[codes]
    return np.ldexp(values, scales.astype(np.int32)[..., None] - 127).reshape(*scales.shape[:-1], -1)


# The 16 e2m1 values of an fp4 code (sign bit 3, then two exponent bits and one mantissa bit).
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)


@dataclasses.dataclass(frozen=True)
class GptOssExperts(Experts):
    """gpt-oss's routed experts: biases beside the weights, and HF tensors (under `prefix`,
    "model.layers.3.mlp.experts.") fused and already input-major, gate and up INTERLEAVED on the
    last axis (gate = [..., 0::2], up = [..., 1::2]):
      "fused" (what transformers saves): gate_up_proj [E, H, 2I], down_proj [E, I, H];
      "mxfp4" (the released checkpoints): gate_up_proj_blocks uint8 [E, 2I, H/32, 16] and
              gate_up_proj_scales uint8 [E, 2I, H/32], down_proj_blocks [E, H, I/32, 16] and
              down_proj_scales [E, H, I/32] (dequantize_mxfp4, then transposed to input-major);
    both with gate_up_proj_bias [E, 2I] (interleaved too) and down_proj_bias [E, H]."""
    LAYOUTS = ("fused", "mxfp4")
    has_bias = True

    def layout(self, names) -> str:
        return "mxfp4" if self.prefix + "gate_up_proj_blocks" in names else "fused"

    def hf_shapes(self, layout: str) -> dict[str, tuple[int, ...]]:
        E, H, I, p = self.num_experts, self.hidden, self.inter, self.prefix
        biases = {p + "gate_up_proj_bias": (E, 2 * I), p + "down_proj_bias": (E, H)}
        if layout == "fused":
            return {p + "gate_up_proj": (E, H, 2 * I), p + "down_proj": (E, I, H), **biases}
        if layout == "mxfp4":
            if H % 32 or I % 32:
                raise TensorShapeError(f"{p}gate_up_proj_blocks: MXFP4 experts need hidden ({H}) and intermediate "
                                       f"({I}) sizes divisible by its 32-value blocks")
            return {p + "gate_up_proj_blocks": (E, 2 * I, H // 32, 16), p + "gate_up_proj_scales": (E, 2 * I, H // 32),
                    p + "down_proj_blocks": (E, H, I // 32, 16), p + "down_proj_scales": (E, H, I // 32), **biases}
        raise ValueError(f"gpt-oss experts have no layout '{layout}' (they have {', '.join(self.LAYOUTS)})")

    def hf_dtypes(self, layout: str) -> dict[str, str]:
        return {n: "U8" for n in self.hf_shapes(layout) if n.endswith(("_blocks", "_scales"))}

    def from_hf(self, layout: str, read: Callable[[str], np.ndarray], experts: range | None = None
                ) -> dict[str, np.ndarray]:
        """Our weight stacks (PROJECTIONS) and bias stacks (BIASES) of every expert or of the range `experts`."""
        rows, p = slice(None) if experts is None else slice(experts.start, experts.stop), self.prefix
        if layout not in self.LAYOUTS:
            raise ValueError(f"gpt-oss experts have no layout '{layout}' (they have {', '.join(self.LAYOUTS)})")
        if layout == "mxfp4":
            def weight(name):      # [e, N, K] rows of the stored (output-major) blocks -> ours [e, K, N]
                return dequantize_mxfp4(np.asarray(read(p + name + "_blocks")[rows]),
                                        np.asarray(read(p + name + "_scales")[rows])).transpose(0, 2, 1)
            gate_up, down = weight("gate_up_proj"), weight("down_proj")
        else:
            gate_up, down = read(p + "gate_up_proj")[rows], read(p + "down_proj")[rows]
        bias = read(p + "gate_up_proj_bias")[rows]
        return {"gate": gate_up[..., 0::2], "up": gate_up[..., 1::2], "down": down,
                "gate_bias": bias[:, 0::2], "up_bias": bias[:, 1::2], "down_bias": read(p + "down_proj_bias")[rows]}

    def to_hf(self, stacks: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
        """Our stacks -> the "fused" layout; the biases only where `stacks` holds them (an export of
        weights alone leaves transformers' own bias init: zeros)."""
        def interleave(g, u):
            out = np.empty(g.shape[:-1] + (2 * g.shape[-1],), np.result_type(g, u))
            out[..., 0::2], out[..., 1::2] = g, u
            return out
        p = self.prefix
        yield p + "gate_up_proj", interleave(np.asarray(stacks["gate"]), np.asarray(stacks["up"]))
        yield p + "down_proj", np.ascontiguousarray(np.asarray(stacks["down"]))
        if "gate_bias" in stacks:
            yield p + "gate_up_proj_bias", interleave(np.asarray(stacks["gate_bias"]), np.asarray(stacks["up_bias"]))
            yield p + "down_proj_bias", np.ascontiguousarray(np.asarray(stacks["down_bias"]))


@dataclasses.dataclass(frozen=True)
class Config(ModelConfig):
    swiglu_alpha: float = 1.702    # the experts' sigmoid gain
    swiglu_limit: float = 7.0      # their clamp


def config_fields(d: dict) -> dict:
    """gpt-oss's options. Its experts are `intermediate_size` wide, and GptOssConfig's computed
    defaults (alternating layer_types, sliding first; YaRN RoPE) are set in d, which the generic
    parser reads after this hook."""
    d["moe_intermediate_size"] = d["intermediate_size"]
    if d.get("layer_types") is None:
        d["layer_types"] = [SLIDING_ATTENTION if (i + 1) % 2 else FULL_ATTENTION
                            for i in range(int(d["num_hidden_layers"]))]
    if d.get("rope_parameters") is None and d.get("rope_scaling") is None:
        d["rope_parameters"] = dict(DEFAULT_ROPE, rope_theta=d["rope_theta"])
    window = d.get("sliding_window")
    return dict(swiglu_alpha=float(d["swiglu_alpha"]), swiglu_limit=float(d["swiglu_limit"]),
                sliding_window=None if window is None else int(window))


def validate(cfg: Config) -> None:
    if cfg.dense_layers:
        raise ConfigError(f"num_local_experts={cfg.num_experts}: every gpt-oss layer routes experts")
    if SLIDING_ATTENTION in cfg.layer_types and not (cfg.sliding_window or 0) >= 1:
        raise ConfigError(f"sliding_window={cfg.sliding_window}: sliding_attention layers need a window >= 1")
    if not cfg.swiglu_limit > 0:
        raise ConfigError(f"swiglu_limit={cfg.swiglu_limit} must be positive")


def activation(cfg: Config) -> Activation:
    """The experts' clamped SwiGLU (static: part of the compiled MoE op)."""
    return clamped_swiglu(cfg.swiglu_alpha, cfg.swiglu_limit)


@struct.dataclass
class GptOssMoE(MoE):
    """The router (weight [H, E] and bias [E]) and the routed experts (pools with their biases)."""
    router_bias: jax.Array


def abstract(cfg: Config) -> Params:
    """The parameter tree with schema leaves (see schema.py)."""
    H, E = cfg.hidden_size, cfg.num_experts
    bias = ("q", "k", "v", "o") if cfg.attention_bias else ()
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        mlp = GptOssMoE(router=Tensor((H, E), p + "mlp.router.weight", LINEAR),
                        experts=GptOssExperts(E, H, cfg.moe_intermediate_size, p + "mlp.experts."),
                        router_bias=Tensor((E,), p + "mlp.router.bias", init="bias"))
        layers.append(layer_schema(cfg, p, attention_schema(cfg, p + "self_attn.", bias=bias, sinks=True), mlp))
    return params_schema(cfg, tuple(layers))


def route(p: GptOssMoE, cfg: Config, x):
    """GptOssTopKRouter: logits = x @ W + b, the top-k logits, softmax over those k (in f32).
    x: [N, H] -> (ids int32 [N, k], weights [N, k] in x.dtype, the same weights f32 [N, k]: the
    router's scores of the selected experts, what hotness is measured from)."""
    logits = linear(x, p.router.astype(x.dtype), p.router_bias.astype(x.dtype))
    top, ids = jax.lax.top_k(logits, cfg.num_experts_per_tok)
    w = jax.nn.softmax(top.astype(jnp.float32), axis=-1)
    return ids.astype(jnp.int32), w.astype(x.dtype), w


def moe(p: GptOssMoE, cfg: Config, x, backend: str):
    """x: [B, T, H] -> (out [B, T, H], ids [B, T, k], probs [B, T, k])."""
    B, T, H = x.shape
    flat = x.reshape(B * T, H)
    ids, weights, probs = route(p, cfg, flat)
    out = moe_experts(flat, ids, weights, p.experts, backend, activation=activation(cfg))
    k = cfg.num_experts_per_tok
    return out.reshape(B, T, H), ids.reshape(B, T, k), probs.reshape(B, T, k)


def forward(params: Params, cfg: Config, tokens, cache: KVCache, *, backend: str = "xla", logits_at=None,
            valid=None):
    """decoder.decode's contract: (logits, new cache, RouterInfo)."""
    return decoder.decode(params, cfg, tokens, cache, backend=backend, logits_at=logits_at, valid=valid, mlp=moe)

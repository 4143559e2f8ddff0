"""Reading a converted checkpoint (written by checkpoints_convert).

Layout: metadata.json (format_version, config, hf_config, tiers, dtype, sources, skipped, ...),
config.json and tokenizer files, and orbax checkpoints of numpy trees: dense/, layers/NNN/,
experts/NNN/ ({"hi"|"lo": {gate|up|down: {data, scales}}}, scales only for integer formats).

Everything is returned as host numpy arrays: dense params as model.families.qwen3_moe.Params (for
qwen3_next: with model.families.qwen3_next layers) with every MoE layer's experts=None, experts as
TierPools per layer and tier. The runtime decides what goes to the device (jax.device_put) and
builds the ExpertPools it serves from; attach_experts puts them into the params.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from dynaexq_jax.model.config import ModelConfig
from dynaexq_jax.errors import (CheckpointNotFoundError, ConfigError, CorruptCheckpointError,
                                UnsupportedArchitectureError)
from dynaexq_jax.model.families import qwen3_next
from dynaexq_jax.model.families.qwen3_moe import MoE, Attention, DenseMLP, Layer, Params
from dynaexq_jax.model.moe import ExpertPools, TierPool
from dynaexq_jax.model.quant import SCALE_DTYPE, Format, QTensor, parse_format

FORMAT_VERSION = 1
TIERS = ("hi", "lo")


@dataclasses.dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    hf_config: dict[str, Any]
    params: Params                                # experts=None in every MoE layer
    experts: dict[int, dict[str, TierPool]]       # layer -> {"hi": TierPool, "lo": TierPool}
    tiers: dict[str, Format]                      # {"hi": Format, "lo": Format}
    metadata: dict[str, Any]


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path}: converted checkpoint directory not found")
    meta = _read_metadata(path)
    if meta.get("model_type") not in _PARAM_READERS:
        raise UnsupportedArchitectureError(f"{path}: model_type '{meta.get('model_type')}' is not supported")
    try:
        cfg = ModelConfig.from_dict(meta["config"])
        tiers = {t: parse_format(meta["tiers"][t]) for t in TIERS}
        dtype = parse_format(meta["dtype"]).storage_dtype
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path / 'metadata.json'}: bad or missing field ({type(e).__name__}: {e})") from None
    with ocp.StandardCheckpointer() as ckpt:
        reader = _TreeReader(path, ckpt, dtype)
        params = _PARAM_READERS[cfg.model_type](cfg, reader)
        experts = {i: _layer_experts(reader, i, tiers, cfg) for i in cfg.moe_layers}
    return Checkpoint(path, cfg, meta.get("hf_config", {}), params, experts, tiers, meta)


def attach_experts(params: Params, pools_by_layer: dict[int, ExpertPools]) -> Params:
    """Params with the experts of the given MoE layers replaced by pools_by_layer[layer]."""
    layers = list(params.layers)
    for i, pools in pools_by_layer.items():
        if not (0 <= i < len(layers)) or not isinstance(layers[i].mlp, MoE):
            raise ConfigError(f"attach_experts: layer {i} is not an MoE layer")
        n_experts = layers[i].mlp.router.shape[-1]
        if pools.num_experts != n_experts:
            raise ConfigError(f"attach_experts: layer {i} has {n_experts} experts, its pools assign {pools.num_experts}")
        layers[i] = layers[i].replace(mlp=layers[i].mlp.replace(experts=pools))
    return params.replace(layers=tuple(layers))


def _read_metadata(path: Path) -> dict:
    f = path / "metadata.json"
    if not f.is_file():
        raise CheckpointNotFoundError(f"{f}: not found (not a converted checkpoint?)")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CorruptCheckpointError(f"{f}: format_version {version!r}, this reader reads {FORMAT_VERSION}")
    return meta


class _TreeReader:
    """Restores one sub-checkpoint and hands out its arrays with shape and dtype checks."""

    def __init__(self, root: Path, ckpt: ocp.StandardCheckpointer, dtype):
        self.root, self._ckpt, self.dtype = root.absolute(), ckpt, np.dtype(dtype)

    def restore(self, rel: str) -> dict:
        d = self.root / rel
        if not d.is_dir():
            raise CorruptCheckpointError(f"{d}: missing from the converted checkpoint")
        try:
            return self._ckpt.restore(d)
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise CorruptCheckpointError(f"{d}: cannot be restored ({type(e).__name__}: {e})") from None

    def get(self, tree: dict, key: str, shape: tuple[int, ...], rel: str, dtype=None) -> np.ndarray:
        node = tree
        for k in key.split("."):
            if not isinstance(node, dict) or k not in node:
                raise CorruptCheckpointError(f"{self.root / rel}: no '{key}'")
            node = node[k]
        a = np.asarray(node)
        want = np.dtype(dtype) if dtype is not None else self.dtype
        if a.shape != tuple(shape) or a.dtype != want:
            raise CorruptCheckpointError(f"{self.root / rel}: '{key}' is {a.dtype}{list(a.shape)}, "
                                         f"expected {want}{list(shape)}")
        return a


def _qwen3_moe_params(cfg: ModelConfig, r: _TreeReader) -> Params:
    V, H = cfg.vocab_size, cfg.hidden_size
    dense = r.restore("dense")
    embed = r.get(dense, "embed", (V, H), "dense")
    final_norm = r.get(dense, "final_norm", (H,), "dense")
    lm_head = None if cfg.tie_word_embeddings else r.get(dense, "lm_head", (H, V), "dense")
    layers = []
    for i in range(cfg.num_layers):
        rel = f"layers/{i:03d}"
        t = r.restore(rel)
        g = lambda key, shape: r.get(t, key, shape, rel)  # noqa: E731
        attn = _attention(cfg, g, cfg.num_heads * cfg.head_dim)
        if cfg.is_moe_layer(i):
            mlp = MoE(router=g("mlp.router", (H, cfg.num_experts)), experts=None)
        else:
            mlp = _dense_mlp(g, "mlp", H, cfg.intermediate_size)
        layers.append(Layer(input_norm=g("input_norm", (H,)), attn=attn, post_norm=g("post_norm", (H,)), mlp=mlp))
    return Params(embed=embed, layers=tuple(layers), final_norm=final_norm, lm_head=lm_head)


def _attention(cfg: ModelConfig, g, q_out: int) -> Attention:
    """The attention tree of one layer; q_out is q's output width (doubled for gated attention)."""
    H, hd = cfg.hidden_size, cfg.head_dim
    o_in, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    bias = (lambda name, n: g(f"attn.{name}_bias", (n,))) if cfg.attention_bias else (lambda name, n: None)
    return Attention(q=g("attn.q", (H, q_out)), k=g("attn.k", (H, kv_out)), v=g("attn.v", (H, kv_out)),
                     o=g("attn.o", (o_in, H)), q_norm=g("attn.q_norm", (hd,)), k_norm=g("attn.k_norm", (hd,)),
                     q_bias=bias("q", q_out), k_bias=bias("k", kv_out), v_bias=bias("v", kv_out), o_bias=bias("o", H))


def _dense_mlp(g, prefix: str, H: int, I: int) -> DenseMLP:
    return DenseMLP(gate=g(f"{prefix}.gate", (H, I)), up=g(f"{prefix}.up", (H, I)), down=g(f"{prefix}.down", (I, H)))


def _qwen3_next_params(cfg: ModelConfig, r: _TreeReader) -> Params:
    V, H = cfg.vocab_size, cfg.hidden_size
    nK, nV = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    dense = r.restore("dense")
    layers = []
    for i in range(cfg.num_layers):
        rel = f"layers/{i:03d}"
        t = r.restore(rel)
        g = lambda key, shape: r.get(t, key, shape, rel)  # noqa: E731
        if i in cfg.linear_layers:
            mixer = qwen3_next.GatedDeltaNet(
                in_qkvz=g("linear_attn.in_qkvz", (H, 2 * nK * dk + 2 * nV * dv)),
                in_ba=g("linear_attn.in_ba", (H, 2 * nV)),
                conv=g("linear_attn.conv", (cfg.linear_conv_kernel_dim, qwen3_next.conv_dim(cfg))),
                dt_bias=g("linear_attn.dt_bias", (nV,)), A_log=g("linear_attn.A_log", (nV,)),
                norm=g("linear_attn.norm", (dv,)), out=g("linear_attn.out", (nV * dv, H)))
        else:
            mixer = _attention(cfg, g, 2 * cfg.num_heads * cfg.head_dim)
        if cfg.is_moe_layer(i):
            mlp = qwen3_next.SharedMoE(router=g("mlp.router", (H, cfg.num_experts)), experts=None,
                                       shared=_dense_mlp(g, "mlp.shared", H, cfg.shared_expert_intermediate_size),
                                       shared_gate=g("mlp.shared_gate", (H, 1)))
        else:
            mlp = _dense_mlp(g, "mlp", H, cfg.intermediate_size)
        layers.append(qwen3_next.Layer(input_norm=g("input_norm", (H,)), mixer=mixer, post_norm=g("post_norm", (H,)),
                                       mlp=mlp))
    return Params(embed=r.get(dense, "embed", (V, H), "dense"), layers=tuple(layers),
                  final_norm=r.get(dense, "final_norm", (H,), "dense"),
                  lm_head=None if cfg.tie_word_embeddings else r.get(dense, "lm_head", (H, V), "dense"))


_PARAM_READERS = {"qwen3_moe": _qwen3_moe_params, "qwen3_next": _qwen3_next_params}


def _layer_experts(r: _TreeReader, layer: int, tiers: dict[str, Format], cfg: ModelConfig) -> dict[str, TierPool]:
    rel = f"experts/{layer:03d}"
    tree = r.restore(rel)
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size

    def q(key: str, fmt: Format, k: int, n: int) -> QTensor:
        data = r.get(tree, f"{key}.data", (E, k // fmt.per_byte, n), rel, fmt.storage_dtype)
        scales = r.get(tree, f"{key}.scales", (E, k // fmt.group_for(k), n), rel, SCALE_DTYPE) if fmt.is_int else None
        return QTensor(data, scales, fmt)
    return {t: TierPool(q(f"{t}.gate", fmt, H, I), q(f"{t}.up", fmt, H, I), q(f"{t}.down", fmt, I, H))
            for t, fmt in tiers.items()}

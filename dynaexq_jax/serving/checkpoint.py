"""Reading a converted checkpoint (written by checkpoints_convert).

Layout: metadata.json (format_version, config, hf_config, tiers, dtype, sources, skipped, ...),
config.json and tokenizer files, and orbax checkpoints of numpy trees: dense/, layers/NNN/,
experts/NNN/ ({"hi"|"lo": {gate|up|down: {data, scales}}}, scales only for integer formats).

The dense trees hold the family's parameter tree (model/families/schema.py): a leaf at tree path
`layers[i].attn.q` is key `attn.q` of layers/00i, one at `embed` is key `embed` of dense/; the
schema gives every shape that is checked on restore.

Everything is returned as host numpy arrays: dense params as the family's Params with every MoE
layer's experts=None, experts as TierPools per layer and tier. The runtime decides what goes to
the device (jax.device_put) and builds the ExpertPools it serves from; attach_experts puts them
into the params.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dynaexq_jax.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    UnsupportedArchitectureError,
)
from dynaexq_jax.model.config import ModelConfig
from dynaexq_jax.model.families import family, schema
from dynaexq_jax.model.layers import MoE, Params
from dynaexq_jax.model.moe import ExpertPools, TierPool
from dynaexq_jax.model.quant import SCALE_DTYPE, Format, QTensor, parse_format

FORMAT_VERSION = 1       # what checkpoints_convert writes and this reader reads
TIERS = ("hi", "lo")
DENSE_DIR = "dense"      # the parameters outside the layers


def layer_dir(layer: int) -> str:
    return f"layers/{layer:03d}"


def experts_dir(layer: int) -> str:
    return f"experts/{layer:03d}"


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
    if path.is_file():
        raise CheckpointNotFoundError(
            f"{path}: is a file, not a converted checkpoint directory (see `dynaexq convert`)")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path}: converted checkpoint directory not found")
    meta = _read_metadata(path)
    try:
        fam = family(meta.get("model_type"))
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"{path}: {e}") from None
    try:
        cfg = ModelConfig.from_dict(meta["config"])
        tiers = {t: parse_format(meta["tiers"][t]) for t in TIERS}
        dtype = parse_format(meta["dtype"]).storage_dtype
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(
            f"{path / 'metadata.json'}: bad or missing field ({type(e).__name__}: {e})") from None
    with ocp.StandardCheckpointer() as ckpt:
        reader = _TreeReader(path, ckpt, dtype)
        params, experts = _restore(fam.abstract(cfg), reader, tiers)
    return Checkpoint(path, cfg, meta.get("hf_config", {}), params, experts, tiers, meta)


def attach_experts(params: Params, pools_by_layer: dict[int, ExpertPools]) -> Params:
    """Params with the experts of the given MoE layers replaced by pools_by_layer[layer]."""
    layers = list(params.layers)
    for i, pools in pools_by_layer.items():
        if not (0 <= i < len(layers)) or not isinstance(layers[i].mlp, MoE):
            raise ConfigError(f"attach_experts: layer {i} is not an MoE layer")
        n_experts = layers[i].mlp.router.shape[-1]
        if pools.num_experts != n_experts:
            raise ConfigError(
                f"attach_experts: layer {i} has {n_experts} experts, its pools assign {pools.num_experts}")
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


def _restore(tree: Params, r: _TreeReader, tiers: dict[str, Format]) -> tuple[Params, dict[int, dict[str, TierPool]]]:
    """The abstract tree's arrays from disk: (params with experts=None, {layer: {tier: TierPool}})."""
    trees, values, experts = {}, [], {}
    for layer, key, spec in schema.leaves(tree):
        if isinstance(spec, schema.Experts):
            experts[layer] = _layer_experts(r, layer, tiers, spec)
            values.append(None)
            continue
        rel = DENSE_DIR if layer is None else layer_dir(layer)
        if rel not in trees:
            trees[rel] = r.restore(rel)
        values.append(r.get(trees[rel], key, spec.shape, rel))
    return jax.tree.unflatten(jax.tree.structure(tree), values), experts


def _layer_experts(r: _TreeReader, layer: int, tiers: dict[str, Format], spec: schema.Experts) -> dict[str, TierPool]:
    rel = experts_dir(layer)
    tree = r.restore(rel)
    E, H, I = spec.num_experts, spec.hidden, spec.inter

    def q(key: str, fmt: Format, k: int, n: int) -> QTensor:
        data = r.get(tree, f"{key}.data", (E, k // fmt.per_byte, n), rel, fmt.storage_dtype)
        scales = r.get(tree, f"{key}.scales", (E, k // fmt.group_for(k), n), rel, SCALE_DTYPE) if fmt.is_int else None
        return QTensor(data, scales, fmt)
    return {t: TierPool(q(f"{t}.gate", fmt, H, I), q(f"{t}.up", fmt, H, I), q(f"{t}.down", fmt, I, H))
            for t, fmt in tiers.items()}

"""Reading a converted checkpoint (written by checkpoints_convert).

Layout (format version 2):
  metadata.json          format_version, config, hf_config, tiers, dtype, sources, skipped, ... and
                         files: {relative path: {bytes, sha256}} of every other file written
  config.json and tokenizer files
  dense/, layers/NNN/    orbax checkpoints of the dense parameter trees (numpy arrays)
  experts/NNN.hi.safetensors, experts/NNN.lo.safetensors
                         one MoE layer's routed experts in one tier: {gate|up|down}.data and, for
                         integer formats, {gate|up|down}.scales (and .zeros for asymmetric ones:
                         Format.has_zeros), and for experts with biases
                         (gpt-oss) {gate|up|down}.bias in f32, each [E, ...] expert-major, so that
                         one expert is one contiguous slice of each tensor (tier_tensors)
  experts/calibration.safetensors
                         written by a conversion with calibration text, each f32 [L_moe, E]:
                         lo_costs, what each expert's LO copy costs, and routed_mass, the routing
                         weight it got on the calibration tokens (checkpoints_convert/calibration.py);
                         read by the sensitivity policy (CheckpointInfo.lo_costs, .routed_mass)

The dense trees hold the family's parameter tree (model/families/schema.py): a leaf at tree path
`layers[i].attn.q` is key `attn.q` of layers/00i, one at `embed` is key `embed` of dense/; the
schema gives every shape that is checked on restore.

read_info reads the metadata alone (and checks every file is there with the size it was written
with, from the directory entries): what `info` and `budget` need, in milliseconds at any size.
load_checkpoint restores the dense params into host numpy arrays (the family's Params with every
MoE layer's experts=None) and memory-maps the expert tiers: experts are TierPools per layer and
tier whose arrays are read-only views of the maps, so nothing of them is read until used and the
OS page cache, not a copy in this process, holds what is hot. The runtime decides what goes to
the device and builds the ExpertPools it serves from; attach_experts puts them into the params.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dynaexq_jax.errors import (
    CheckpointNotFoundError,
    CheckpointVersionError,
    ConfigError,
    CorruptCheckpointError,
    UnsupportedArchitectureError,
    read_json_object,
)
from dynaexq_jax.model.config import ModelConfig
from dynaexq_jax.model.families import family, schema
from dynaexq_jax.model.layers import MoE, Params
from dynaexq_jax.model.moe import ExpertPools, TierPool
from dynaexq_jax.model.quant import (
    BIAS_DTYPE,
    SCALE_DTYPE,
    Format,
    QTensor,
    TierFormat,
    parse_format,
    parse_tier_format,
)
from dynaexq_jax.serving.conversion import sha256_file
from dynaexq_jax.serving.safetensors_io import MappedFile

FORMAT_VERSION = 2       # what checkpoints_convert writes and this reader reads
TIERS = ("hi", "lo")
DENSE_DIR = "dense"      # the parameters outside the layers
METADATA_FILE = "metadata.json"
CALIBRATION_FILE = "experts/calibration.safetensors"


def layer_dir(layer: int) -> str:
    return f"layers/{layer:03d}"


def expert_file(layer: int, tier: str) -> str:
    return f"experts/{layer:03d}.{tier}.safetensors"


def tier_tensors(tier: TierFormat, spec: schema.Experts) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of the tensors of one layer's tier file, in file order."""
    E, H, I = spec.num_experts, spec.hidden, spec.inter
    out = {}
    for proj, (k, n) in zip(schema.PROJECTIONS, ((H, I), (H, I), (I, H))):
        fmt = tier.of(proj)
        out[f"{proj}.data"] = ((E, fmt.packed_rows(k), n), np.dtype(fmt.storage_dtype))
        per_group = ((E, k // fmt.group_for(k), n), np.dtype(SCALE_DTYPE))
        if fmt.is_int:
            out[f"{proj}.scales"] = per_group
        if fmt.has_zeros:
            out[f"{proj}.zeros"] = per_group
    for name, shape in spec.bias_shapes.items():          # the same float biases in every tier
        out[bias_tensor(name)] = (shape, np.dtype(BIAS_DTYPE))
    return out


def bias_tensor(bias: str) -> str:
    """A bias stack's name (schema.BIASES: "gate_bias") -> its tensor in a tier file ("gate.bias")."""
    return bias.replace("_bias", ".bias")


@dataclasses.dataclass
class CheckpointInfo:
    """What the metadata says about a converted checkpoint; no tensor is read."""
    path: Path
    config: ModelConfig
    hf_config: dict[str, Any]
    tiers: dict[str, TierFormat]                  # {"hi": TierFormat, "lo": TierFormat}
    dense_format: Format                          # the dense parameters' dtype
    metadata: dict[str, Any]

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the dense parameters (everything but the routed experts), from the schema."""
        item = np.dtype(self.dense_format.storage_dtype).itemsize
        tree = family(self.config.model_type).abstract(self.config)
        return sum(math.prod(spec.shape) * item for _, _, spec in schema.leaves(tree)
                   if isinstance(spec, schema.Tensor))

    @property
    def lo_costs(self) -> np.ndarray | None:
        """f64 [L_moe, E]: what each expert's LO copy costs, as measured at conversion on the
        calibration text (metadata calibration.measured says how); None if converted without one."""
        return self._measured.get("lo_costs")

    @property
    def routed_mass(self) -> np.ndarray | None:
        """f64 [L_moe, E]: each expert's routing weight summed over the calibration tokens (its
        traffic there); None if converted without calibration text."""
        return self._measured.get("routed_mass")

    @functools.cached_property
    def _measured(self) -> dict[str, np.ndarray]:
        """The calibration file's arrays the metadata names, read and checked once, read-only; {}
        for a checkpoint converted without calibration text."""
        names = (self.metadata.get("calibration") or {}).get("measured") or {}
        if not names:
            return {}
        mapped = MappedFile(self.path / CALIBRATION_FILE)
        want = (len(self.config.moe_layers), self.config.num_experts)
        out = {}
        for name in names:
            a = mapped.arrays.get(name)
            if a is None or a.shape != want or not np.all(np.isfinite(a)) or (a < 0).any():
                raise CorruptCheckpointError(f"{mapped.path}: expected {name}, finite and non-negative, {list(want)}")
            out[name] = a.astype(np.float64)
            out[name].setflags(write=False)
        return out


@dataclasses.dataclass
class Checkpoint(CheckpointInfo):
    params: Params                                # experts=None in every MoE layer
    experts: dict[int, dict[str, TierPool]]       # layer -> {"hi": TierPool, "lo": TierPool}, memory-mapped


def read_info(path: str | Path) -> CheckpointInfo:
    """The metadata of the converted checkpoint at path, checked: a known format version and
    family, and every file the converter wrote present with the size it was written with."""
    path = Path(path)
    if path.is_file():
        raise CheckpointNotFoundError(
            f"{path}: is a file, not a converted checkpoint directory (see `dynaexq convert`)")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path}: converted checkpoint directory not found")
    meta = _read_metadata(path)
    try:
        family(meta.get("model_type"))
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"{path}: {e}") from None
    try:
        cfg = ModelConfig.from_dict(meta["config"])
        tiers = {t: parse_tier_format(meta["tiers"][t]) for t in TIERS}
        dense_format = parse_format(meta["dtype"])
        files = {str(rel): (int(rec["bytes"]), str(rec["sha256"])) for rel, rec in meta["files"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptCheckpointError(
            f"{path / METADATA_FILE}: bad or missing field ({type(e).__name__}: {e})") from None
    for rel, (size, _) in files.items():
        f = path / rel
        if not f.is_file():
            raise CorruptCheckpointError(f"{f}: missing from the converted checkpoint")
        if f.stat().st_size != size:
            raise CorruptCheckpointError(f"{f}: {f.stat().st_size} bytes, but {size} were written (truncated or "
                                         "damaged; reconvert, or check every file with `dynaexq info --verify`)")
    return CheckpointInfo(path, cfg, meta.get("hf_config", {}), tiers, dense_format, meta)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The dense params (restored) and the expert tiers (memory-mapped) of a converted checkpoint."""
    info = read_info(path)
    tree = family(info.config.model_type).abstract(info.config)
    experts = {layer: _map_experts(info, layer, spec) for layer, _, spec in schema.leaves(tree)
               if isinstance(spec, schema.Experts)}
    return Checkpoint(**{f.name: getattr(info, f.name) for f in dataclasses.fields(CheckpointInfo)},
                      params=load_dense(info), experts=experts)


def load_dense(info: CheckpointInfo) -> Params:
    """The dense params of info's checkpoint restored into host numpy arrays, every MoE layer's
    experts=None (the converter's calibration pass reads them before the metadata is written)."""
    with ocp.StandardCheckpointer() as ckpt:
        return _restore_dense(family(info.config.model_type).abstract(info.config), _TreeReader(info, ckpt))


def verify_checkpoint(path: str | Path | CheckpointInfo) -> tuple[int, int]:
    """Recompute the sha256 of every file the converter wrote and compare it with the metadata's,
    on every core, loading nothing. Returns (files, bytes) checked; raises CorruptCheckpointError
    naming the damaged files."""
    info = path if isinstance(path, CheckpointInfo) else read_info(path)
    files = info.metadata["files"]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:      # hashlib releases the GIL
        digests = dict(zip(files, pool.map(lambda rel: sha256_file(info.path / rel), files)))
    bad = [rel for rel, rec in files.items() if digests[rel] != rec["sha256"]]
    if bad:
        more = f" (and {len(bad) - 1} more: {', '.join(bad[1:4])}{'...' if len(bad) > 4 else ''})" if bad[1:] else ""
        raise CorruptCheckpointError(f"{info.path / bad[0]}: sha256 differs from the one written at conversion: "
                                     f"the file is damaged{more}; reconvert")
    return len(files), sum(rec["bytes"] for rec in files.values())


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
    f = path / METADATA_FILE
    if not f.is_file():
        raise CheckpointNotFoundError(f"{f}: not found (not a converted checkpoint?)")
    meta = read_json_object(f, CorruptCheckpointError)
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CorruptCheckpointError(f"{f}: format_version {version!r} is not a format version")
    if version != FORMAT_VERSION:
        why = ("an older converter wrote it" if version < FORMAT_VERSION else
               "a newer converter wrote it (or upgrade dynaexq-jax)")
        raise CheckpointVersionError(
            f"{f}: format_version {version}, this reader reads {FORMAT_VERSION}: {why}; reconvert the Hugging "
            f"Face checkpoint: dynaexq convert HF_DIR {path} --overwrite")
    return meta


class _TreeReader:
    """Restores one sub-checkpoint and hands out its arrays with shape and dtype checks."""

    def __init__(self, info: CheckpointInfo, ckpt: ocp.StandardCheckpointer):
        self.root, self._ckpt = info.path.absolute(), ckpt
        self.dtype = np.dtype(info.dense_format.storage_dtype)
        self._files = info.metadata["files"]

    def restore(self, rel: str) -> dict:
        d = self.root / rel
        if not d.is_dir():
            raise CorruptCheckpointError(f"{d}: missing from the converted checkpoint")
        try:
            return self._ckpt.restore(d)
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            why = f"{type(e).__name__}: {e}"
        # Only now, on failure, are its files' checksums worth computing: they name the damaged one.
        bad = [f for f, rec in self._files.items()
               if f.startswith(rel + "/") and sha256_file(self.root / f) != rec["sha256"]]
        if bad:
            raise CorruptCheckpointError(f"{self.root / bad[0]}: damaged (its sha256 differs from the one written "
                                         f"at conversion), so {rel} cannot be restored ({why})")
        raise CorruptCheckpointError(f"{d}: cannot be restored ({why})")

    def get(self, tree: dict, key: str, shape: tuple[int, ...], rel: str) -> np.ndarray:
        node = tree
        for k in key.split("."):
            if not isinstance(node, dict) or k not in node:
                raise CorruptCheckpointError(f"{self.root / rel}: no '{key}'")
            node = node[k]
        a = np.asarray(node)
        if a.shape != tuple(shape) or a.dtype != self.dtype:
            raise CorruptCheckpointError(f"{self.root / rel}: '{key}' is {a.dtype}{list(a.shape)}, "
                                         f"expected {self.dtype}{list(shape)}")
        return a


def _restore_dense(tree: Params, r: _TreeReader) -> Params:
    """The abstract tree's dense arrays from disk (experts=None)."""
    trees, values = {}, []
    for layer, key, spec in schema.leaves(tree):
        if isinstance(spec, schema.Experts):
            values.append(None)
            continue
        rel = DENSE_DIR if layer is None else layer_dir(layer)
        if rel not in trees:
            trees[rel] = r.restore(rel)
        values.append(r.get(trees[rel], key, spec.shape, rel))
    return jax.tree.unflatten(jax.tree.structure(tree), values)


def _map_experts(info: CheckpointInfo, layer: int, spec: schema.Experts) -> dict[str, TierPool]:
    """One MoE layer's tiers as TierPools of read-only views of their memory-mapped files."""
    out = {}
    for tier, fmt in info.tiers.items():
        mapped = MappedFile(info.path / expert_file(layer, tier))
        want = tier_tensors(fmt, spec)
        for name, (shape, dtype) in want.items():
            t = mapped.tensors.get(name)
            if t is None:
                raise CorruptCheckpointError(f"{mapped.path}: no tensor '{name}'")
            if t.shape != shape or t.np_dtype != dtype:
                raise CorruptCheckpointError(f"{mapped.path}: tensor '{name}' is {t.np_dtype}{list(t.shape)}, "
                                             f"expected {dtype}{list(shape)} ({fmt.name})")
        extra = sorted(set(mapped.tensors) - set(want))
        if extra:
            raise CorruptCheckpointError(f"{mapped.path}: unexpected tensor '{extra[0]}'")
        a = mapped.arrays
        out[tier] = TierPool(*(QTensor(a[f"{p}.data"], a.get(f"{p}.scales"), fmt.of(p), a.get(f"{p}.zeros"))
                               for p in schema.PROJECTIONS),
                             **{b: a[bias_tensor(b)] for b in spec.bias_shapes})
    return out

"""Streaming Hugging Face -> converted checkpoint conversion.

Everything that can be checked from config.json and the safetensors headers (architecture, every
tensor present, known, of the right shape and a float dtype, the tier formats' group sizes) is
checked before anything is written. Then one group at a time (the dense group, then each layer):
read its tensors, build its tree, quantize its experts into both tiers, write, drop. Peak memory
is therefore about one layer (plus quantization temporaries of a bounded chunk of experts), not
the model.

What is converted, from which HF tensors and how, is the model family's schema
(model/families/schema.py, through plan.build_plan); the layout is dynaexq_jax.serving.checkpoint's.
Output (all trees are orbax checkpoints of numpy arrays):
  OUT/metadata.json, OUT/config.json, tokenizer files
  OUT/dense/           {embed, final_norm, lm_head (untied only)}
  OUT/layers/NNN/      {input_norm, post_norm, attn: {...}, mlp: {router} | {gate, up, down}} (Qwen3-MoE)
  OUT/experts/NNN/     {"hi"|"lo": {gate|up|down: {data, scales (integer formats only)}}}
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from checkpoints_convert.plan import Plan, build_plan, nest
from checkpoints_convert.safetensors_reader import FLOAT_DTYPES, SafetensorsCheckpoint
from checkpoints_convert.writer import TreeWriter, check_output, staging_dir
from dynaexq_jax.errors import (
    CheckpointNotFoundError,
    ConfigError,
    MissingTensorError,
    OutputExistsError,
    QuantFormatError,
    TensorShapeError,
    UnexpectedTensorError,
    UnsupportedArchitectureError,
)
from dynaexq_jax.model.config import ModelConfig, parse_hf_config
from dynaexq_jax.model.quant import SCALE_DTYPE, Format, parse_format, quantize
from dynaexq_jax.serving.checkpoint import FORMAT_VERSION, TIERS, experts_dir
from dynaexq_jax.serving.conversion import sha256_files

CONVERTER_VERSION = "1.0"
COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "generation_config.json", "vocab.json", "merges.txt", "training.json")
# Source dtype -> the float format "source" means (there is no f64 format: f64 becomes f32).
_SOURCE_FORMAT = {"F64": "f32", "F32": "f32", "F16": "fp16", "BF16": "bf16"}
# Quantize at most this many weight elements at once (4 MiB per f32 temporary): quantize()
# makes several f32/int32 temporaries of its input, which for a whole layer of a large model
# would be gigabytes.
_QUANT_CHUNK_ELEMS = 1 << 20


def convert(hf_dir, out_dir, *, hi: str = "source", lo: str = "int4", dtype: str = "source",
            overwrite: bool = False, progress: bool = True) -> Path:
    """Convert the HF checkpoint in hf_dir into out_dir (created atomically) and return out_dir.

    hi/lo: expert tier formats (quant.parse_format specs, or "source" for the source float
    format); an integer format without ':gN' uses its default group, or the largest smaller
    group that divides the expert dimensions (metadata "tiers" names the group used, and
    "tier_notes" says why); dtype: dense parameter dtype ("source", "f32", "bf16", "fp16")."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if out.resolve() == hf_dir.resolve() or out.resolve() in hf_dir.resolve().parents:
        raise OutputExistsError(f"{out}: the output would replace the source checkpoint {hf_dir}")
    check_output(out.absolute(), overwrite)
    hf_config = _read_config(hf_dir)
    try:
        cfg = parse_hf_config(hf_config)
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"{hf_dir / 'config.json'}: {e}") from None
    src = SafetensorsCheckpoint(hf_dir)
    plan = build_plan(cfg, src.tensors.keys())
    _check_plan(plan, src)
    source_fmt = _source_format(plan, src)
    tiers, notes = {}, {}
    for tier, spec in zip(TIERS, (hi, lo)):
        tiers[tier], note = _tier_format(spec, source_fmt, cfg)
        if note:
            notes[tier] = note
            if progress:
                print(f"{tier.upper()} tier {note}", file=sys.stderr)
    dense_fmt = _dense_format(dtype, source_fmt)

    files = [hf_dir / "config.json"] + src.files
    stop = threading.Event()
    with staging_dir(out, overwrite) as tmp, ThreadPoolExecutor(1) as pool:
        # Hash the sources on a second thread while converting (hashlib releases the GIL).
        hashes = pool.submit(sha256_files, files, stop)
        try:
            _write_groups(plan, src, tiers, dense_fmt, tmp, progress)
            for name in COPIED_FILES:
                if (hf_dir / name).is_file():
                    shutil.copy2(hf_dir / name, tmp / name)
            metadata = {
                "format_version": FORMAT_VERSION,
                "converter_version": CONVERTER_VERSION,
                "model_type": cfg.model_type,
                "config": cfg.to_dict(),
                "hf_config": hf_config,
                "tiers": {k: f.name for k, f in tiers.items()},
                "tier_notes": notes,
                "dtype": dense_fmt.name,
                "source_dtype": source_fmt.name,
                "expert_layout": plan.info.get("expert_layout"),
                "sources": hashes.result(),
                "skipped": [{"name": n, "reason": r} for n, r in plan.skipped],
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            }
            (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        finally:
            stop.set()
    return out


def _read_config(hf_dir: Path) -> dict:
    if not hf_dir.is_dir():
        raise CheckpointNotFoundError(f"{hf_dir}: checkpoint directory not found")
    f = hf_dir / "config.json"
    if not f.is_file():
        raise CheckpointNotFoundError(f"{f}: not found (a Hugging Face checkpoint directory needs a config.json)")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{f}: not a JSON object")
    return d


def _check_plan(plan: Plan, src: SafetensorsCheckpoint) -> None:
    """Every needed tensor present with the right shape and a float dtype; nothing unaccounted for."""
    for g in plan.groups:
        for e in g.all_entries:
            missing = [s for s in e.sources if s not in src]
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise MissingTensorError(f"{src.dir}: tensor '{missing[0]}'{more} not found "
                                         f"(needed for {g.name}: {e.target})")
            for s, shape in zip(e.sources, e.shapes):
                info = src.tensors[s]
                if info.shape != shape:
                    raise TensorShapeError(f"{info.file}: tensor '{s}' has shape {list(info.shape)}, "
                                           f"expected {list(shape)} from config.json")
                if info.dtype not in FLOAT_DTYPES:
                    raise TensorShapeError(f"{info.file}: tensor '{s}' has dtype {info.dtype}, expected a "
                                           f"floating dtype ({', '.join(FLOAT_DTYPES)})")
    known = plan.used_names() | {n for n, _ in plan.skipped}
    unknown = sorted(set(src.tensors) - known)
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise UnexpectedTensorError(f"{src.tensors[unknown[0]].file}: unexpected tensor '{unknown[0]}'{more} "
                                    "(not part of this architecture with this config.json)")


def _source_format(plan: Plan, src: SafetensorsCheckpoint) -> Format:
    """The float format holding most of the model's bytes (in practice the experts' dtype)."""
    by_dtype: dict[str, int] = {}
    for name in plan.used_names():
        info = src.tensors[name]
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    return parse_format(_SOURCE_FORMAT[max(by_dtype, key=by_dtype.get)])


def _tier_format(spec, source_fmt: Format, cfg: ModelConfig) -> tuple[Format, str | None]:
    """The format of one expert tier, checked against the expert input dimensions (gate/up reduce
    over H, down over I), and a note when a default group had to shrink. A default group (no
    ':gN' in spec) that does not divide them becomes the largest smaller group that does (and
    holds whole bytes); an explicit one stays an error."""
    if str(spec).strip().lower() == "source":
        return source_fmt, None
    fmt = parse_format(spec)
    dims = (cfg.hidden_size, cfg.moe_intermediate_size) if cfg.moe_layers else ()
    note = None
    if fmt.is_int and fmt.group and isinstance(spec, str) and ":" not in spec and any(d % fmt.group for d in dims):
        fits = [g for g in range(fmt.group, 0, -1) if g % fmt.per_byte == 0 and all(d % g == 0 for d in dims)]
        if fits:
            note = (f"{fmt.kind}: the default group {fmt.group} does not divide the expert dimensions "
                    f"{' and '.join(map(str, dims))}; group {fits[0]} used")
            fmt = dataclasses.replace(fmt, group=fits[0])
    for d in dims:
        fmt.check(d)
    return fmt, note


def _dense_format(spec, source_fmt: Format) -> Format:
    fmt = source_fmt if str(spec).strip().lower() == "source" else parse_format(spec)
    if fmt.is_int:
        raise QuantFormatError(f"dtype '{spec}': dense parameters need a float dtype (source, f32, bf16, fp16)")
    return fmt


def _write_groups(plan: Plan, src: SafetensorsCheckpoint, tiers: dict[str, Format], dense_fmt: Format,
                  root: Path, progress: bool) -> None:
    total = sum(src.tensors[s].nbytes for s in plan.used_names())
    with TreeWriter(root) as writer, tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr,
                                          disable=not progress, desc="convert") as bar:
        def reader(entry):
            def read(name: str) -> np.ndarray:
                if name not in entry.sources:  # only what _check_plan validated may be read
                    raise AssertionError(f"map bug: {entry.target} reads undeclared tensor '{name}'")
                a = src.read(name)
                bar.update(a.nbytes)
                return a
            return read

        for g in plan.groups:
            bar.set_description(g.name)
            flat = {e.target: np.ascontiguousarray(e.build(reader(e)), dense_fmt.storage_dtype) for e in g.entries}
            writer.write(g.name, nest(flat))
            del flat
            if g.experts is not None:
                stacks = g.experts.build(reader(g.experts))
                writer.write(experts_dir(g.layer), {t: _quantize_stacks(stacks, fmt) for t, fmt in tiers.items()})
                del stacks


def _quantize_stacks(stacks: dict[str, np.ndarray], fmt: Format) -> dict:
    """{gate, up, down} float stacks [E, K, N] -> {gate, up, down: {data, scales?}} in fmt,
    quantized a few experts at a time into preallocated outputs (experts are independent, so the
    result is identical to quantizing the whole stack at once)."""
    out = {}
    for name, w in stacks.items():
        E, K, N = w.shape
        t = {"data": np.empty((E, K // fmt.per_byte, N), fmt.storage_dtype)}
        if fmt.is_int:
            t["scales"] = np.empty((E, K // fmt.group_for(K), N), SCALE_DTYPE)
        step = max(1, _QUANT_CHUNK_ELEMS // (K * N))
        for i in range(0, E, step):
            q = quantize(w[i:i + step], fmt)
            t["data"][i:i + step] = q.data
            if fmt.is_int:
                t["scales"][i:i + step] = q.scales
        out[name] = t
    return out

"""Streaming Hugging Face -> converted checkpoint conversion, on every core.

Everything that can be checked from config.json and the safetensors headers (architecture, every
tensor present, known, of the right shape and a float dtype, the tier formats' group sizes) is
checked before anything is written. Then the work overlaps:
  * each MoE layer's experts are cut into chunks of a few experts, and a pool of threads (one per
    core: numpy, file reads and writes and hashlib release the GIL) reads a chunk's tensors,
    quantizes it into both tiers and writes it in place into the layer's two tier files;
  * meanwhile the main thread reads each group's dense tensors and saves them (orbax);
  * every file is hashed (sha256) as soon as it is complete: a source once all its tensors were
    read (so from the page cache, not read from disk twice), an output once written.
At most two chunks per thread are queued and a chunk allocates only when it runs, so peak memory
is a few chunks plus one group's dense tensors, not a layer or the model. The progress bar counts
the source bytes whose work is done (quantized and written, or saved), not the bytes read.

What is converted, from which HF tensors and how, is the model family's schema
(model/families/schema.py, through plan.build_plan); the layout is dynaexq_jax.serving.checkpoint's:
  OUT/metadata.json, OUT/config.json, tokenizer files
  OUT/dense/           orbax: {embed, final_norm, lm_head (untied only)}
  OUT/layers/NNN/      orbax: {input_norm, post_norm, attn: {...}, mlp: {router} | {gate, up, down}} (Qwen3-MoE)
  OUT/experts/NNN.hi.safetensors, NNN.lo.safetensors   {gate|up|down}.{data, scales[, zeros][, bias]},
                       [E, ...] expert-major

Expert biases (gpt-oss) are copied as f32 into both tiers; MXFP4 experts (gpt-oss's released
checkpoints) are dequantized exactly (gpt_oss.dequantize_mxfp4) and then quantized into both tiers
like float ones: the tiers stay the project's formats, and "source" is then the dense tensors'
float format (bf16 holds every MXFP4 value exactly).
With calibration tokens (needed by a tier with a gptq projection) the dense parameters are
written first, then calibration.py's pass runs the tokens through the model and writes every
tier, and what each expert's LO copy costs and its traffic there (OUT/experts/calibration.safetensors,
for the sensitivity policy); metadata "calibration" says what it saw.
The metadata lists every other file with its size and sha256 (`dynaexq info --verify`).
"""
from __future__ import annotations

import collections
import datetime
import json
import os
import shutil
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from checkpoints_convert import calibration as calib
from checkpoints_convert.plan import Entry, Group, Plan, build_plan, nest
from checkpoints_convert.safetensors_reader import FLOAT_DTYPES, SafetensorsCheckpoint, TensorInfo
from checkpoints_convert.writer import TreeWriter, check_output, staging_dir
from dynaexq_jax.errors import (
    CalibrationError,
    CheckpointNotFoundError,
    ConfigError,
    MissingTensorError,
    OutputExistsError,
    TensorShapeError,
    UnexpectedTensorError,
    UnsupportedArchitectureError,
    read_json_object,
)
from dynaexq_jax.model.config import ModelConfig, parse_hf_config
from dynaexq_jax.model.families import family
from dynaexq_jax.model.families.schema import BIASES
from dynaexq_jax.model.moe.api import experts_computed_by
from dynaexq_jax.model.quant import (
    BIAS_DTYPE,
    Format,
    QTensor,
    TierFormat,
    fit_tier_format,
    parse_dense_format,
    parse_format,
    quantize,
)
from dynaexq_jax.serving.checkpoint import (
    CALIBRATION_FILE,
    FORMAT_VERSION,
    METADATA_FILE,
    TIERS,
    CheckpointInfo,
    bias_tensor,
    expert_file,
    load_dense,
    tier_tensors,
)
from dynaexq_jax.serving.conversion import sha256_file
from dynaexq_jax.serving.safetensors_io import FileWriter

CONVERTER_VERSION = "2.0"
COPIED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "generation_config.json", "vocab.json", "merges.txt", "training.json")
# Source dtype -> the float format "source" means (there is no f64 format: f64 becomes f32).
_SOURCE_FORMAT = {"F64": "f32", "F32": "f32", "F16": "fp16", "BF16": "bf16"}
# A chunk of experts holds about this many source elements (at least one expert). quantize()
# makes several f32/int32 temporaries of each projection's stack, here about 1.4 MiB each: they
# stay in the caches, which made the whole conversion ~1.5x faster per CPU-second than 4x larger
# chunks (benchmarks/convert.py model: 170 -> 244 MB per CPU-second).
_CHUNK_ELEMS = 1 << 20


def convert(hf_dir, out_dir, *, hi: str = "source", lo: str = "int4", dtype: str = "source",
            calibration=None, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert the HF checkpoint in hf_dir into out_dir (created atomically) and return out_dir.

    hi/lo: expert tier formats (quant.parse_tier_format specs: one format, or gate/up's and
    down's as 'int2:g64:hqq+down=int4:g64'; "source" is the source float format); an integer
    format without ':gN' uses its default group, or the largest smaller group that divides the
    expert dimensions it reduces over (metadata "tiers" names the group used, and "tier_notes"
    says why); dtype: dense parameter dtype ("source", "f32", "bf16", "fp16"); calibration: token
    ids [rows, tokens] (serving.conversion.calibration_rows cuts a text's): needed by a tier with a
    gptq projection, and where given the LO costs are measured on them and stored.
    Temp dirs that killed conversions of out_dir left behind are removed first (said on stderr)."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if out.resolve() == hf_dir.resolve() or out.resolve() in hf_dir.resolve().parents:
        raise OutputExistsError(f"{out}: the output would replace the source checkpoint {hf_dir}")
    check_output(out.absolute(), overwrite)
    hf_config = _read_config(hf_dir)
    try:
        cfg = parse_hf_config(hf_config)
        _check_source_quantization(hf_config)
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"{hf_dir / 'config.json'}: {e}") from None
    with SafetensorsCheckpoint(hf_dir) as src:
        plan = build_plan(cfg, src.tensors.keys())
        _check_plan(plan, src)
        source_fmt = _source_format(plan, src)
        tiers, notes = {}, {}
        for tier, spec in zip(TIERS, (hi, lo)):
            tiers[tier], note = fit_tier_format(spec, cfg.hidden_size, cfg.moe_intermediate_size, source_fmt)
            if note:
                notes[tier] = note
                if progress:
                    print(f"{tier.upper()} tier {note}", file=sys.stderr)
        dense_fmt = parse_dense_format(dtype, source_fmt)
        tokens = _check_calibration(calibration, tiers, cfg)

        with staging_dir(out, overwrite, on_stale=_say_removed) as tmp:
            job = _Job(plan, cfg, src, [hf_dir / "config.json"] + src.files, tiers, dense_fmt, tmp, progress, tokens)
            sources = job.run()
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
                "sources": sources,
                "skipped": [{"name": n, "reason": r} for n, r in plan.skipped],
                **({"calibration": calib.metadata(tokens, [t for t, f in tiers.items() if f.needs_calibration])}
                   if tokens is not None else {}),
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "files": job.output_files(),
            }
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return out


def _check_calibration(tokens, tiers: dict[str, TierFormat], cfg: ModelConfig) -> np.ndarray | None:
    """The calibration tokens, checked; None if none were given (an error if a tier needs them)."""
    needing = [t for t, f in tiers.items() if f.needs_calibration]
    if tokens is None:
        if needing:
            raise CalibrationError(f"{needing[0].upper()} tier {tiers[needing[0]].name}: gptq quantizes with the "
                                   f"Hessians of calibration inputs: give calibration text (dynaexq convert "
                                   f"--calibration FILE), or use a quantizer that needs none (hqq, mse, rtn)")
        return None
    return calib.check_tokens(tokens, cfg.vocab_size)


def _say_removed(path: Path, nbytes: int) -> None:
    print(f"removed {path} ({nbytes / 1e9:.2f} GB), left by an interrupted conversion", file=sys.stderr)


def _check_source_quantization(hf_config: dict) -> None:
    """Weights shipped pre-quantized (config.json's quantization_config) are read only in the
    methods the family names in its SOURCE_QUANTIZATION (gpt-oss: mxfp4); any other (e.g.
    DeepSeek-V3's released FP8 blocks) is an error here, not a wrong conversion. Budget planning
    from such a config works: it needs no weights."""
    q = hf_config.get("quantization_config")
    if not q:
        return
    readable = getattr(family(hf_config["model_type"]), "SOURCE_QUANTIZATION", ())
    method = q.get("quant_method") if isinstance(q, dict) else q
    if method not in readable:
        block = f", weight_block_size {q.get('weight_block_size')}" if isinstance(q, dict) and \
            q.get("weight_block_size") else ""
        raise UnsupportedArchitectureError(
            f"quantization_config (quant_method {method!r}{block}): weights pre-quantized this way are not read"
            + (f" (this family reads: {', '.join(readable)})" if readable else "")
            + "; convert from float (e.g. BF16) weights")


def _read_config(hf_dir: Path) -> dict:
    if not hf_dir.is_dir():
        raise CheckpointNotFoundError(f"{hf_dir}: checkpoint directory not found")
    f = hf_dir / "config.json"
    if not f.is_file():
        raise CheckpointNotFoundError(f"{f}: not found (a Hugging Face checkpoint directory needs a config.json)")
    return read_json_object(f, ConfigError)


def _check_plan(plan: Plan, src: SafetensorsCheckpoint) -> None:
    """Every needed tensor present with the right shape and a float dtype; nothing unaccounted for."""
    for g in plan.groups:
        for e in g.all_entries:
            missing = [s for s in e.sources if s not in src]
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise MissingTensorError(f"{src.dir}: tensor '{missing[0]}'{more} not found "
                                         f"(needed for {g.name}: {e.target})")
            for i, (s, shape) in enumerate(zip(e.sources, e.shapes)):
                info, dtype = src.tensors[s], e.dtypes[i] if i < len(e.dtypes) else None
                if info.shape != shape:
                    raise TensorShapeError(f"{info.file}: tensor '{s}' has shape {list(info.shape)}, "
                                           f"expected {list(shape)} from config.json")
                if dtype is not None:
                    if info.dtype != dtype:
                        raise TensorShapeError(f"{info.file}: tensor '{s}' has dtype {info.dtype}, expected {dtype}")
                elif info.dtype not in FLOAT_DTYPES:
                    raise TensorShapeError(f"{info.file}: tensor '{s}' has dtype {info.dtype}, expected a "
                                           f"floating dtype ({', '.join(FLOAT_DTYPES)})")
    known = plan.used_names() | {n for n, _ in plan.skipped}
    unknown = sorted(set(src.tensors) - known)
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise UnexpectedTensorError(f"{src.tensors[unknown[0]].file}: unexpected tensor '{unknown[0]}'{more} "
                                    "(not part of this architecture with this config.json)")


def _source_format(plan: Plan, src: SafetensorsCheckpoint) -> Format:
    """The float format holding most of the model's float bytes (in practice the experts' dtype;
    the dense tensors' for MXFP4 experts)."""
    by_dtype: dict[str, int] = {}
    for name in plan.used_names():
        info = src.tensors[name]
        if info.dtype in FLOAT_DTYPES:
            by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    return parse_format(_SOURCE_FORMAT[max(by_dtype, key=by_dtype.get)])


class _Countdown:
    """Counts finished pieces of work down from n; finish() is True for exactly one caller, the last."""

    def __init__(self, n: int):
        self._left, self._lock = n, threading.Lock()

    def finish(self) -> bool:
        with self._lock:
            self._left -= 1
            return self._left == 0


class _Job:
    """One conversion's work into `root`: run() writes every tree and tier file and returns the
    sources' digests; output_files() then lists what was written with sizes and digests."""

    def __init__(self, plan: Plan, cfg: ModelConfig, src: SafetensorsCheckpoint, sources: list[Path],
                 tiers: dict[str, TierFormat], dense_fmt: Format, root: Path, progress: bool,
                 calibration: np.ndarray | None = None):
        self.plan, self.cfg, self.src, self.sources, self.tiers, self.dense_fmt, self.root = \
            plan, cfg, src, sources, tiers, dense_fmt, root
        self.progress, self.calibration = progress, calibration
        # The tiers the first pass writes: all of them, or none where the calibration pass does.
        self.first_pass = tiers if calibration is None else {}
        self.measured: dict[str, dict[int, np.ndarray]] = {n: {} for n in calib.MEASURED}   # name -> layer -> [E]
        self.workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self._lock = threading.Lock()
        self._stop = threading.Event()          # set on failure: hashing stops early
        self._digests: dict[Path, Future] = {}  # every file hashed, or being hashed
        self._open_files: list[FileWriter] = []
        self._unread: dict[Path, int] = collections.Counter()   # source file -> bytes still to read
        for name in plan.used_names():              # each read once, by one of the two passes
            info = src.tensors[name]
            self._unread[info.file] += info.nbytes
        # The bar counts the first pass's work: the experts too, unless the calibration pass does them.
        expert_bytes = sum(src.tensors[s].nbytes for g in plan.groups if g.experts for s in g.experts.sources)
        self._bar = tqdm(total=sum(self._unread.values()) - (0 if self.first_pass else expert_bytes), unit="B",
                         unit_scale=True, file=sys.stderr, disable=not progress, desc="convert")

    def run(self) -> dict[str, str]:
        # The dense group last: the main thread's dense work then overlaps the last layers' chunks.
        groups = [g for g in self.plan.groups if g.layer is not None] + [g for g in self.plan.groups if g.layer is None]
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="convert") as pool:
                self._pool, queued = pool, collections.deque()
                try:
                    with TreeWriter(self.root) as writer, self._bar:
                        for g in groups:
                            self._bar.set_description(g.name)
                            if g.experts is not None and self.first_pass:
                                for chunk in self._expert_chunks(g):
                                    while len(queued) >= 2 * self.workers:
                                        queued.popleft().result()
                                    queued.append(pool.submit(*chunk))
                            self._write_dense(g, writer)
                        while queued:
                            queued.popleft().result()
                    if self.calibration is not None:
                        self._calibrate()
                    for f in self.sources:         # the index, config.json, any shard of skipped tensors only
                        self._hash(f)
                    return {f.name: self._digests[f].result() for f in self.sources}
                except BaseException:
                    self._stop.set()
                    pool.shutdown(cancel_futures=True)
                    raise
        finally:       # after the pool's threads are done: a failure leaves files of unfinished layers open
            for f in self._open_files:
                f.close()

    def output_files(self) -> dict[str, dict]:
        """{relative path: {bytes, sha256}} of every file under root but the metadata."""
        out = {}
        for f in sorted(p for p in self.root.rglob("*") if p.is_file()):
            rel = f.relative_to(self.root).as_posix()
            if rel != METADATA_FILE:
                digest = self._digests[f].result() if f in self._digests else sha256_file(f)
                out[rel] = {"bytes": f.stat().st_size, "sha256": digest}
        return out

    # ---- reading ------------------------------------------------------------------------------
    def _hash(self, f: Path) -> None:
        with self._lock:
            if f not in self._digests:
                self._digests[f] = self._pool.submit(sha256_file, f, self._stop)

    def _read_done(self, info: TensorInfo, nbytes: int) -> None:
        """Count a read; a source file all of whose tensors were read is hashed now, while cached."""
        with self._lock:
            self._unread[info.file] -= nbytes
            done = self._unread[info.file] == 0
        if done:
            self._hash(info.file)

    def _reader(self, entry: Entry, lazy: bool):
        """Tensors of `entry` by name; reads count towards hashing the sources while cached."""
        def read(name: str):
            if name not in entry.sources:  # only what _check_plan validated may be read
                raise AssertionError(f"map bug: {entry.target} reads undeclared tensor '{name}'")
            if lazy:
                return self.src.ref(name, on_read=self._read_done)
            a = self.src.read(name)
            self._read_done(self.src.tensors[name], a.nbytes)
            return a
        return read

    def _progress(self, nbytes: int) -> None:
        with self._lock:
            self._bar.update(nbytes)

    # ---- dense --------------------------------------------------------------------------------
    def _write_dense(self, g: Group, writer: TreeWriter) -> None:
        dtype = self.dense_fmt.storage_dtype
        flat = {e.target: np.ascontiguousarray(e.build(self._reader(e, lazy=False)), dtype) for e in g.entries}
        writer.write(g.name, nest(flat))
        del flat
        for f in (self.root / g.name).rglob("*"):
            if f.is_file():
                self._hash(f)
        self._progress(sum(self.src.tensors[s].nbytes for e in g.entries for s in e.sources))

    # ---- experts ------------------------------------------------------------------------------
    def _tier_files(self, g: Group, tiers: dict[str, TierFormat]) -> dict[str, FileWriter]:
        """Layer g's files of `tiers`, created (closed on failure by run())."""
        files = {}
        for tier, fmt in tiers.items():
            path = self.root / expert_file(g.layer, tier)
            path.parent.mkdir(exist_ok=True)
            files[tier] = FileWriter(path, tier_tensors(fmt, g.experts.spec),
                                     {"format": fmt.name, "layer": str(g.layer)})
            self._open_files.append(files[tier])
        return files

    @staticmethod
    def _chunks(spec) -> list[range]:
        step = max(1, _CHUNK_ELEMS // (3 * spec.hidden * spec.inter))
        return [range(a, min(a + step, spec.num_experts)) for a in range(0, spec.num_experts, step)]

    def _close(self, files: dict[str, FileWriter]) -> None:
        for f in files.values():
            f.close()
            self._hash(f.path)

    def _expert_chunks(self, g: Group):
        """(function, args) of each chunk of layer g's experts, after creating its first-pass tier files."""
        files = self._tier_files(g, self.first_pass)
        chunks = self._chunks(g.experts.spec)
        done = _Countdown(len(chunks))
        for rng in chunks:
            yield self._convert_chunk, g.experts, rng, files, done

    def _read_chunk(self, entry: Entry, rng: range, files: dict[str, FileWriter]):
        """Experts `rng`'s float stacks {proj: [e, K, N]} (source dtype) and their biases (gate, up,
        down; None without), the biases written into every file of `files` (float in every tier)."""
        stacks = entry.build(self._reader(entry, lazy=True), rng)
        biases = [np.ascontiguousarray(stacks.pop(name), BIAS_DTYPE) for name in BIASES if name in stacks]
        for name, b in zip(BIASES, biases):
            for f in files.values():
                f.write(bias_tensor(name), rng.start, b)
        return stacks, tuple(biases) or None

    @staticmethod
    def _write(f: FileWriter, proj: str, start: int, q: QTensor) -> None:
        f.write(f"{proj}.data", start, q.data)
        if q.scales is not None:
            f.write(f"{proj}.scales", start, q.scales)
        if q.zeros is not None:
            f.write(f"{proj}.zeros", start, q.zeros)

    def _convert_chunk(self, entry: Entry, rng: range, files: dict[str, FileWriter], done: _Countdown) -> None:
        """Read experts `rng` of one layer, quantize them into the first-pass tiers, write them in
        place; the last chunk of the layer closes and hashes its files."""
        stacks, _ = self._read_chunk(entry, rng, files)
        for proj, w in stacks.items():
            w = np.ascontiguousarray(w)                                 # one transpose, shared by both tiers
            for tier, tier_fmt in self.first_pass.items():
                self._write(files[tier], proj, rng.start, quantize(w, tier_fmt.of(proj)))
        self._progress(sum(w.nbytes for w in stacks.values()))
        if done.finish():
            self._close(files)

    # ---- calibration --------------------------------------------------------------------------
    def _calibrate(self) -> None:
        """The calibration pass (calibration.py): the calibration tokens through the family's
        forward on the dense parameters just written, each MoE layer's experts computed (and its
        tiers written) by _calibrate_layer; then what it measured of every layer, in one file."""
        cfg, tokens = self.cfg, self.calibration
        info = CheckpointInfo(self.root, cfg, {}, self.tiers, self.dense_fmt, {"files": {}})
        params = jax.device_put(load_dense(info))
        layers = collections.deque(sorted((g for g in self.plan.groups if g.experts), key=lambda g: g.layer))
        n_layers = len(layers)
        bar = tqdm(total=n_layers, unit="layer", file=sys.stderr, disable=not self.progress,
                   desc=f"calibrate ({tokens.size} tokens)")

        def experts(x, ids, weights, activation):
            if isinstance(x, jax.core.Tracer) or not layers:
                raise AssertionError("calibration: the family's forward must call each MoE layer once, eagerly")
            g = layers.popleft()
            out = self._calibrate_layer(g, np.asarray(x, np.float32), np.asarray(ids), np.asarray(weights), activation)
            bar.update(1)
            return jnp.asarray(out, x.dtype)
        fam = family(cfg.model_type)
        B, T = tokens.shape
        with bar, experts_computed_by(experts):
            fam.forward(params, cfg, jnp.asarray(tokens), fam.init_cache(cfg, B, T, self.dense_fmt.storage_dtype),
                        backend="xla", logits_at=jnp.zeros(B, jnp.int32))
        if layers:
            raise AssertionError(f"calibration: the forward ran {n_layers - len(layers)} of {n_layers} MoE layers")
        arrays = {name: np.stack([per_layer[i] for i in sorted(per_layer)]).astype(np.float32)
                  for name, per_layer in self.measured.items()}
        f = FileWriter(self.root / CALIBRATION_FILE, {n: (a.shape, a.dtype) for n, a in arrays.items()},
                       {"layers": ",".join(map(str, sorted(self.measured["lo_costs"]))), **calib.MEASURED})
        for name, a in arrays.items():
            f.write(name, 0, a)
        f.close()
        self._hash(f.path)

    def _calibrate_layer(self, g: Group, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, activation) -> np.ndarray:
        """Layer g's tiers, written chunk by chunk on every core, and its LO costs and routed masses
        (self.measured); returns its experts' output f32 [T, H] in the source precision."""
        files = self._tier_files(g, self.tiers)
        costs, mass = np.zeros(g.experts.spec.num_experts), np.zeros(g.experts.spec.num_experts)

        def chunk(rng: range) -> np.ndarray:
            stacks, biases = self._read_chunk(g.experts, rng, files)
            out, quantized, costs[rng.start:rng.stop], mass[rng.start:rng.stop] = calib.expert_chunk(
                stacks, biases, rng, g.experts.spec.num_experts, x, ids, weights, self.tiers, activation)
            for tier, projs in quantized.items():
                for proj, q in projs.items():
                    self._write(files[tier], proj, rng.start, q)
            return out
        out = sum(f.result() for f in [self._pool.submit(chunk, rng) for rng in self._chunks(g.experts.spec)])
        self._close(files)
        self.measured["lo_costs"][g.layer], self.measured["routed_mass"][g.layer] = costs, mass
        return out

"""The embedded default model: the project's own small Qwen3-MoE (dynaexq_jax.experiments.training), trained
once on the standard library's code and prose and shipped as a Hugging Face directory, and the
step that turns a Hugging Face directory into a converted checkpoint (both tiers) on demand."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from dynaexq_jax.errors import CalibrationError, CheckpointNotFoundError, DynaexqError
from dynaexq_jax.model.quant import parse_tier_format
from dynaexq_jax.serving.checkpoint import FORMAT_VERSION
from dynaexq_jax.serving.conversion import calibration_digest, calibration_rows, hf_converter, sha256_files

HF_DIR = Path(__file__).parent.parent / "assets" / "tiny-moe"
# The tier pair used on this model, the paper's Qwen3-Next pair: bf16 -> int4 costs it only 0.1-0.4%
# perplexity (no measurable gap), int2 costs 34-44%, and int4 is within 0.4% of bf16 (README).
HI, LO = "int4:g64", "int2:g64"
CALIBRATION_TOKENS = 8192       # this model's calibration: half from each domain's calibration split


def calibration_tokens(tokens: int = CALIBRATION_TOKENS):
    """The embedded model's calibration (gptq tiers, LO costs), int32 [rows, 512]: the first tokens / 2 of
    each domain's calibration split of its corpus (experiments/corpus.py: never trained or
    validated on), the prose rows first."""
    from dynaexq_jax.experiments.compare import domain_streams
    from dynaexq_jax.serving.tokenizer import TextCodec
    streams = domain_streams(TextCodec(HF_DIR), "calibration")
    return np.concatenate([calibration_rows(s, tokens // 2) for s in streams.values()])


def converted_model(model: str | Path | None, conv_dir: Path, *, hi: str = HI, lo: str | None = None,
                    progress: bool = True) -> Path:
    """A converted checkpoint for `model`: returned as is when it already is one; a Hugging Face
    directory (default: the embedded model) is converted into conv_dir with tiers hi/lo, reusing
    an earlier conversion of the same source files with the same tiers in this format version.
    The embedded model calibrates on calibration_tokens() (its gptq tiers, the LO costs the
    sensitivity policy reads); another model's gptq tier needs `dynaexq convert --calibration` first."""
    src = Path(model) if model is not None else HF_DIR
    if (src / "metadata.json").is_file():
        return src
    if not (src / "config.json").is_file():
        raise CheckpointNotFoundError(f"{src}: neither a converted checkpoint (metadata.json) nor a Hugging Face "
                                      "directory (config.json)")
    lo = lo or LO
    calibration = None
    if src.resolve() == HF_DIR.resolve():
        calibration = calibration_tokens()
    elif any(parse_tier_format(f).needs_calibration for f in (hi, lo) if f != "source"):
        raise CalibrationError(f"{src}: a gptq tier needs calibration text: convert it first (dynaexq convert "
                               f"{src} OUT --hi {hi} --lo {lo} --calibration FILE) and pass OUT")
    meta_file = conv_dir / "metadata.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        mine = sha256_files([src / "config.json"] + sorted(src.glob("*.safetensors")))
        same = all(meta.get("sources", {}).get(name) == h for name, h in mine.items())
        want = {t: meta.get("source_dtype") if f == "source" else parse_tier_format(f).name
                for t, f in (("hi", hi), ("lo", lo))}
        cal = meta.get("calibration") or {}
        calibrated = cal.get("sha256") == (None if calibration is None else calibration_digest(calibration)) and \
            (calibration is None or "measured" in cal)
        if same and calibrated and meta.get("tiers") == want and meta.get("format_version") == FORMAT_VERSION:
            return conv_dir
    # Dense params in f32: exact for bf16 sources, and what CPUs compute fastest.
    return hf_converter()(src, conv_dir, hi=hi, lo=lo, dtype="f32", calibration=calibration, overwrite=True,
                          progress=progress)


def cached_conversion(model: str | Path | None, hi: str | None, lo: str | None, error: type[DynaexqError]) -> Path:
    """A converted checkpoint for `model` (None: the embedded model), converting a Hugging Face
    directory once into the project's cache (reused while its files and tiers are the same), with
    tiers hi/lo (default: HI/LO for the embedded model, the source dtype / int4 otherwise). hi/lo
    given for an already converted checkpoint raise `error`."""
    from dynaexq_jax.model.moe.cpu_kernel import cache_dir
    src = Path(model) if model is not None else HF_DIR
    if (src / "metadata.json").is_file():
        if hi is not None or lo is not None:
            raise error(f"hi/lo apply only to a Hugging Face directory; {src} is already converted (its tiers are "
                        f"fixed)")
        return src
    embedded = src.resolve() == HF_DIR.resolve()
    hi = hi or (HI if embedded else "source")
    lo = lo or (LO if embedded else "int4")
    key = hashlib.sha256(f"{src.resolve()}|{hi}|{lo}".encode()).hexdigest()[:12]
    return converted_model(src, cache_dir() / "converted" / f"{src.name}-{key}", hi=hi, lo=lo)

"""Bad input: every failure is a typed error naming the problem, and nothing is left behind."""
from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import safetensors.numpy as stn

from checkpoints_convert import convert
from checkpoints_convert.writer import TreeWriter
from dynaexq_jax.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointVersionError,
    CorruptCheckpointError,
    MissingTensorError,
    OutputExistsError,
    QuantFormatError,
    TensorShapeError,
    UnexpectedTensorError,
    UnsupportedArchitectureError,
)
from dynaexq_jax.serving.checkpoint import load_checkpoint
from dynaexq_jax.serving.safetensors_io import FileWriter, read_header
from tests.hf_models import make_tiny_qwen3_moe

LO = "int4:g32"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return make_tiny_qwen3_moe(tmp_path_factory.mktemp("single"), seed=11, norm_topk_prob=True)[0]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return make_tiny_qwen3_moe(tmp_path_factory.mktemp("sharded"), seed=12, norm_topk_prob=False,
                               max_shard_size="40KB")[0]


@pytest.fixture
def work(tmp_path):
    """A scratch dir: copy a source checkpoint into it, damage it, convert into work/"out"."""
    def copy(src):
        return shutil.copytree(src, tmp_path / "hf")
    return tmp_path, copy


def expect_failure(tmp_path, hf_dir, error, match, **kwargs):
    """convert must raise `error` matching `match` and leave tmp_path exactly as it was."""
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error, match=match):
        convert(hf_dir, tmp_path / "out", **{"lo": LO, "progress": False, **kwargs})
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def edit_tensors(f, edit):
    tensors = stn.load_file(f)
    edit(tensors)
    stn.save_file(tensors, f, metadata={"format": "pt"})


def test_missing_safetensors_file(work, single):
    tmp, copy = work
    hf = copy(single)
    (hf / "model.safetensors").unlink()
    expect_failure(tmp, hf, CheckpointNotFoundError, "neither model.safetensors nor model.safetensors.index.json")


def test_missing_directory_and_config(work, single):
    tmp, copy = work
    expect_failure(tmp, tmp / "nope", CheckpointNotFoundError, "nope: checkpoint directory not found")
    hf = copy(single)
    (hf / "config.json").unlink()
    expect_failure(tmp, hf, CheckpointNotFoundError, r"config\.json: not found")


def test_truncated_file(work, single):
    tmp, copy = work
    hf = copy(single)
    f = hf / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-1000])
    expect_failure(tmp, hf, CorruptCheckpointError, r"model\.safetensors: tensor '.*' ends at .* truncated")


def test_garbage_header_json(work, single):
    tmp, copy = work
    hf = copy(single)
    f = hf / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8:8 + n] = b"{garbage" + b" " * (n - 8)
    f.write_bytes(bytes(data))
    expect_failure(tmp, hf, CorruptCheckpointError, r"model\.safetensors: header is not valid JSON")


def test_absurd_header_length(work, single):
    tmp, copy = work
    hf = copy(single)
    f = hf / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])
    expect_failure(tmp, hf, CorruptCheckpointError, r"model\.safetensors: header length \d+ is impossible")


def test_missing_tensor(work, single):
    tmp, copy = work
    hf = copy(single)
    edit_tensors(hf / "model.safetensors", lambda t: t.pop("model.layers.2.self_attn.k_norm.weight"))
    expect_failure(tmp, hf, MissingTensorError, r"'model\.layers\.2\.self_attn\.k_norm\.weight' not found")


def test_missing_expert(work, single):
    tmp, copy = work
    hf = copy(single)
    edit_tensors(hf / "model.safetensors", lambda t: t.pop("model.layers.3.mlp.experts.5.up_proj.weight"))
    expect_failure(tmp, hf, MissingTensorError, r"experts\.5\.up_proj\.weight' not found \(needed for layers/003")


def test_unknown_tensor(work, single):
    tmp, copy = work
    hf = copy(single)
    edit_tensors(hf / "model.safetensors",
                 lambda t: t.update({"model.layers.0.mlp.shared_expert.gate_proj.weight": np.zeros((4, 64),
                                                                                                   np.float32)}))
    expect_failure(tmp, hf, UnexpectedTensorError, r"unexpected tensor 'model\.layers\.0\.mlp\.shared_expert")


def test_wrong_shape(work, single):
    tmp, copy = work
    hf = copy(single)
    edit_tensors(hf / "model.safetensors",
                 lambda t: t.update({"model.layers.1.self_attn.q_proj.weight": np.zeros((48, 64), np.float32)}))
    expect_failure(tmp, hf, TensorShapeError,
                   r"'model\.layers\.1\.self_attn\.q_proj\.weight' has shape \[48, 64\], expected \[64, 64\]")


def test_integer_dtype(work, single):
    tmp, copy = work
    hf = copy(single)
    edit_tensors(hf / "model.safetensors", lambda t: t.update({"model.norm.weight": np.ones(64, np.int64)}))
    expect_failure(tmp, hf, TensorShapeError, r"'model\.norm\.weight' has dtype I64, expected a floating dtype")


def test_unsupported_model_type(work, single):
    tmp, copy = work
    hf = copy(single)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["model_type"] = "llama"
    (hf / "config.json").write_text(json.dumps(cfg))
    expect_failure(tmp, hf, UnsupportedArchitectureError, "model_type 'llama' is not supported")


def test_missing_shard(work, sharded):
    tmp, copy = work
    hf = copy(sharded)
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    shard.unlink()
    expect_failure(tmp, hf, CheckpointNotFoundError,
                   f"{shard.name}: shard listed in model.safetensors.index.json not found")


def test_index_lists_absent_tensor(work, sharded):
    tmp, copy = work
    hf = copy(sharded)
    index = hf / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    shard = d["weight_map"]["model.norm.weight"]
    edit_tensors(hf / shard, lambda t: t.pop("model.norm.weight"))
    expect_failure(tmp, hf, MissingTensorError, r"lists tensor 'model\.norm\.weight' in .* but no shard holds it")


def test_output_exists(work, single):
    tmp, copy = work
    hf = copy(single)
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("precious")
    expect_failure(tmp, hf, OutputExistsError, "output already exists")
    assert (tmp / "out" / "keep.txt").read_text() == "precious"


def test_output_is_the_source(work, single):
    tmp, copy = work
    hf = copy(single)
    for target in (hf, tmp):
        with pytest.raises(OutputExistsError, match="would replace the source checkpoint"):
            convert(hf, target, lo=LO, overwrite=True, progress=False)
    assert (hf / "model.safetensors").exists()


def test_bad_formats_fail_before_writing(work, single):
    tmp, copy = work
    hf = copy(single)
    # An explicit group that does not divide the tiny model's H=64 / I=32 stays an error (a default
    # group shrinks to fit: test_families.py).
    expect_failure(tmp, hf, QuantFormatError, "group size 128 does not divide the input dimension 64", lo="int4:g128")
    expect_failure(tmp, hf, QuantFormatError, "group size 64 does not divide the input dimension 32", hi="int8:g64")
    expect_failure(tmp, hf, QuantFormatError, "unknown format 'int5'", hi="int5")
    expect_failure(tmp, hf, QuantFormatError, r"only '\+down=FORMAT'", lo="int4+up=int8")
    expect_failure(tmp, hf, QuantFormatError, "dense parameters need a float dtype", dtype="int8")


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("writer", [TreeWriter, FileWriter])
def test_failure_mid_write_leaves_nothing(work, single, monkeypatch, overwrite, writer):
    """An error after some files were written, in the main thread (a dense tree) or in a worker
    (an expert chunk), removes the temp dir (and any parents it made); with overwrite, the
    existing output is untouched."""
    tmp, copy = work
    hf = copy(single)
    calls = []
    real_write = writer.write

    def failing_write(self, *args):
        calls.append(args[0])
        if len(calls) == 4:
            raise OSError("disk full (simulated)")
        real_write(self, *args)
    monkeypatch.setattr(writer, "write", failing_write)
    if overwrite:
        (tmp / "out").mkdir()
        (tmp / "out" / "keep.txt").write_text("precious")
    before = sorted(p.name for p in tmp.iterdir())
    target = tmp / "out" if overwrite else tmp / "new" / "deeper" / "out"
    with pytest.raises(OSError, match="disk full"):
        convert(hf, target, lo=LO, progress=False, overwrite=overwrite)
    assert len(calls) >= 4
    assert sorted(p.name for p in tmp.iterdir()) == before
    if overwrite:
        assert [p.name for p in (tmp / "out").iterdir()] == ["keep.txt"]


def crafted(tmp_path, header: dict, data: bytes = b"", raw_header: bytes | None = None):
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return f


@pytest.mark.parametrize("header,data,match", [
    ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 12,
     r"span 12 bytes but F32\[2, 2\] needs 16"),
    ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, "unknown dtype 'Q7'"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "bad shape"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "needs dtype, shape and data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlapping or non-contiguous"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12,
     "data section is 12 bytes but its tensors cover 8"),
    ([1, 2], b"", "not a JSON object"),
])
def test_reader_rejects_bad_headers(tmp_path, header, data, match):
    with pytest.raises(CorruptCheckpointError, match=match):
        read_header(crafted(tmp_path, header, data))


def test_reader_short_file(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\x01\x02")
    with pytest.raises(CorruptCheckpointError, match="too short"):
        read_header(f)


def test_load_checkpoint_errors(tmp_path, single):
    with pytest.raises(CheckpointNotFoundError, match="converted checkpoint directory not found"):
        load_checkpoint(tmp_path / "missing")
    out = convert(single, tmp_path / "out", lo=LO, progress=False)
    load_checkpoint(out)
    pristine = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}

    def restore():
        shutil.rmtree(out)
        for f, data in pristine.items():
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)

    shutil.rmtree(out / "layers" / "002")
    with pytest.raises(CorruptCheckpointError, match=r"layers/002/.*: missing from the converted checkpoint"):
        load_checkpoint(out)
    restore()

    # Truncated files are found from their sizes before anything reads them.
    for rel in ("experts/001.lo.safetensors", "dense/_METADATA"):
        f = out / rel
        f.write_bytes(pristine[f][:-10])
        n = len(pristine[f])
        with pytest.raises(CorruptCheckpointError, match=rf"{rel}: {n - 10} bytes, but {n} were written"):
            load_checkpoint(out)
        f.write_bytes(pristine[f])

    # A tier file, listed in the metadata with its size, that holds the wrong tensors.
    f = out / "experts" / "001.hi.safetensors"
    tensors, _ = read_header(f)
    swapped = {n: (t.shape[:1] + t.shape[1:][::-1], t.np_dtype) for n, t in tensors.items()}
    FileWriter(f, swapped).close()
    meta = json.loads((out / "metadata.json").read_text())
    meta["files"]["experts/001.hi.safetensors"]["bytes"] = f.stat().st_size
    (out / "metadata.json").write_text(json.dumps(meta))
    wrong = r"001\.hi\.safetensors: tensor 'gate\.data' is float32\[8, 32, 64\], expected float32\[8, 64, 32\] \(f32\)"
    with pytest.raises(CorruptCheckpointError, match=wrong):
        load_checkpoint(out)
    restore()

    meta = json.loads((out / "metadata.json").read_text())
    older = ("format_version 1, this reader reads 2: an older converter wrote it; reconvert the Hugging Face "
             "checkpoint: dynaexq convert HF_DIR .*out --overwrite")
    for version, error, match in [(1, CheckpointVersionError, older),
                                  (99, CheckpointVersionError, "format_version 99, .* a newer converter wrote it"),
                                  ("2", CorruptCheckpointError, "format_version '2' is not a format version")]:
        (out / "metadata.json").write_text(json.dumps({**meta, "format_version": version}))
        with pytest.raises(error, match=match):
            load_checkpoint(out)
    (out / "metadata.json").write_text(json.dumps({**meta, "files": None}))
    with pytest.raises(CorruptCheckpointError, match=r"metadata\.json: bad or missing field"):
        load_checkpoint(out)
    (out / "metadata.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="metadata.json: not valid JSON"):
        load_checkpoint(out)
    (out / "metadata.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="metadata.json: not found"):
        load_checkpoint(out)

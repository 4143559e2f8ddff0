"""Faults: a conversion killed mid-way, a damaged converted checkpoint, checksums."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints_convert import convert
from checkpoints_convert.writer import lock_path
from dynaexq_jax.errors import CorruptCheckpointError, OutputExistsError
from dynaexq_jax.experiments.synthetic import write_random_qwen3_moe
from dynaexq_jax.serving.checkpoint import load_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(num_hidden_layers=4, hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            vocab_size=256, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16)

# A real conversion that stops (sleeps) after its second dense tree is written, so that the test
# can kill it mid-way at a known point.
_STALLED_CONVERSION = """
import sys, time
from checkpoints_convert import convert
from checkpoints_convert.writer import TreeWriter
real, calls = TreeWriter.write, []
def write(self, rel, tree):
    real(self, rel, tree)
    calls.append(rel)
    if len(calls) == 2:
        print("stalled", flush=True)
        time.sleep(600)
TreeWriter.write = write
convert(sys.argv[1], sys.argv[2], lo="int4:g32", progress=False)
"""


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return write_random_qwen3_moe(tmp_path_factory.mktemp("faults") / "hf", seed=3, **TINY)


def test_a_killed_conversion_is_cleaned_up_by_the_next(hf, tmp_path, capsys):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", _STALLED_CONVERSION, str(hf), str(out)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "stalled"
        [tmp] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        assert (tmp / "layers" / "001").is_dir()
        # While it lives, its output is its own: a second conversion refuses, and removes nothing.
        with pytest.raises(OutputExistsError, match=rf"another conversion \(pid {child.pid}\) is writing it"):
            convert(hf, out, lo="int4:g32", progress=False)
        assert tmp.is_dir()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert tmp.is_dir() and lock_path(out).exists() and not out.exists()     # what SIGKILL leaves

    convert(hf, out, lo="int4:g32", progress=False)
    err = capsys.readouterr().err
    assert f"removed {tmp} (" in err and "left by an interrupted conversion" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    load_checkpoint(out)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dynaexq_jax.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def largest(d: Path) -> Path:
    return max((f for f in d.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


@pytest.fixture(scope="module")
def conv(hf, tmp_path_factory):
    return convert(hf, tmp_path_factory.mktemp("conv") / "conv", lo="int4:g32", progress=False)


@pytest.mark.parametrize("damage", ["truncated dense file", "truncated tier file", "orbax metadata garbage",
                                    "metadata not json"])
def test_a_damaged_checkpoint_is_one_line_on_stderr(conv, tmp_path, damage):
    """The message names the file and nothing else is printed (orbax used to print "RuntimeError:
    Event loop is closed" tracebacks after it: a failed restore closed its event loop with reads
    still in flight. A file's size is now checked before orbax opens it)."""
    ck = Path(shutil.copytree(conv, tmp_path / "ck"))
    if damage == "truncated dense file":
        f = largest(ck / "dense")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "truncated tier file":
        f = ck / "experts" / "002.hi.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "orbax metadata garbage":       # same size: found by restoring it
        f = ck / "layers" / "001" / "_METADATA"
        f.write_bytes(b"#" * f.stat().st_size)
    else:
        f = ck / "metadata.json"
        f.write_text("{")
    rel = f.relative_to(ck).as_posix()
    commands = [("generate", ck, "--prompt", "hello", "--max-new-tokens", "2")]
    if damage != "orbax metadata garbage":         # info reads metadata only: that damage is not its business
        commands.append(("info", ck))
    for cmd in commands:
        res = run_cli(*cmd)
        assert res.returncode == 2, (cmd, res.stderr)
        assert len(res.stderr.splitlines()) == 1, res.stderr
        assert res.stderr.startswith(f"dynaexq {cmd[0]}: error: ") and rel in res.stderr, res.stderr


def test_checksums_find_content_damage(conv, tmp_path):
    n, size = verify_checkpoint(conv)
    meta = json.loads((conv / "metadata.json").read_text())
    assert n == len(meta["files"]) > 0 and size == sum(r["bytes"] for r in meta["files"].values())
    written = sorted(f.relative_to(conv).as_posix() for f in conv.rglob("*") if f.is_file())
    assert sorted(meta["files"]) == [f for f in written if f != "metadata.json"]

    ck = Path(shutil.copytree(conv, tmp_path / "ck"))
    f = largest(ck / "layers" / "002")              # raw array data: orbax would restore it silently
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    load_checkpoint(ck)                             # the damage is invisible without the checksums
    with pytest.raises(CorruptCheckpointError, match=rf"{f.relative_to(ck)}: sha256 differs .* damaged"):
        verify_checkpoint(ck)
    os.truncate(ck / "experts" / "000.lo.safetensors", 10)
    with pytest.raises(CorruptCheckpointError, match=r"experts/000\.lo\.safetensors: 10 bytes, but \d+ were written"):
        verify_checkpoint(ck)

"""Peak memory and throughput of the streaming HF -> converted checkpoint converter (CPU).

Writes random bf16 Qwen3-MoE checkpoints (numpy + safetensors, sharded, real config.json) with a
growing number of layers, converts each in a fresh subprocess (hi=source=bf16, lo=int4:g128),
and reports the child's peak RSS against the checkpoint size. A streaming converter's peak stays
flat as layers are added; one that loads the model grows with it. A child that only imports the
converter gives the baseline (Python + jax + orbax).
Peak RSS is the child's ru_maxrss (from wait4), cross-checked with its own VmHWM. Linux carries
the parent's high-water mark into a child's ru_maxrss across fork+exec, so this parent stays
small: it imports nothing heavy and writes the checkpoints from a subprocess too.
Sources are freshly written, so they are read from the page cache: MB/s of those rows is the
CPU-side rate. For the largest checkpoint the benchmark then evicts its files from the page
cache (fsync + posix_fadvise DONTNEED: only these files, not the machine's whole cache), times
a plain sequential read of them (the disk read rate) and converts once more from the cold cache.
Writes benchmarks/results/convert.json."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_result  # benchmarks/common.py

ROOT = Path(__file__).resolve().parents[1]

# ~52 MB of bf16 experts per layer; the dense part (embeddings, head) is ~8 MB.
MODEL = dict(vocab_size=4096, hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             num_experts=64, num_experts_per_tok=8, moe_intermediate_size=256, intermediate_size=1024)

_HWM = "int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))) * 1024"
CHILD_WRITE = """
import json, sys
from pathlib import Path
from dynaexq_jax.experiments.synthetic import write_random_qwen3_moe
write_random_qwen3_moe(Path(sys.argv[1]), dtype="bfloat16", shard_bytes=100_000_000, tokenizer=False,
                       **json.loads(sys.argv[2]))
"""
CHILD_CONVERT = f"""
import json, sys, time
from checkpoints_convert import convert
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], hi="source", lo="int4", progress=False)
print(json.dumps({{"seconds": time.perf_counter() - t, "vm_hwm": {_HWM}}}))
"""
CHILD_BASELINE = f"""
import json
import checkpoints_convert, dynaexq_jax.serving.checkpoint
print(json.dumps({{"vm_hwm": {_HWM}}}))
"""


def run_child(code: str, *args: str) -> tuple[dict, int]:
    """Run `python -c code args` -> (its JSON stdout or {}, its peak RSS in bytes)."""
    p = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"child failed with exit code {p.returncode}")
    return (json.loads(out) if out.strip() else {}), usage.ru_maxrss * 1024  # Linux: KiB


def dir_bytes(d: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in d.rglob(pattern) if f.is_file())


def evict(d: Path) -> None:
    """Drop d's files from the page cache (written back first: dirty pages cannot be dropped)."""
    for f in (p for p in d.rglob("*") if p.is_file()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_rate(d: Path) -> float:
    """Bytes per second of a sequential read of d's safetensors files (8 MiB reads)."""
    t, total = time.perf_counter(), 0
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(1 << 23):
                total += len(chunk)
    return total / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="4,8,16", help="comma-separated layer counts")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert.json"))
    ap.add_argument("--tmp", default=None, help="where the checkpoints are written (default: the system's temp dir; "
                                                "it must be a disk-backed filesystem for the cold-cache row)")
    a = ap.parse_args()
    MB = 1e6
    _, baseline = run_child(CHILD_BASELINE)
    rows = []
    layers = [int(x) for x in a.layers.split(",")]
    with tempfile.TemporaryDirectory(prefix="dynaexq-bench-convert-", dir=a.tmp) as tmp:
        for n in layers:
            hf = Path(tmp) / f"hf{n}"
            run_child(CHILD_WRITE, str(hf), json.dumps({**MODEL, "num_hidden_layers": n}))
            size = dir_bytes(hf, "*.safetensors")
            runs = ["warm"] + (["cold"] if n == max(layers) else [])
            for cache in runs:
                out = Path(tmp) / f"out{n}"
                disk = None
                if cache == "cold":
                    evict(hf)
                    disk = read_rate(hf)
                    evict(hf)
                child, peak = run_child(CHILD_CONVERT, str(hf), str(out))
                rows.append(dict(layers=n, cache=cache, checkpoint_mb=size / MB,
                                 shards=len(list(hf.glob("*.safetensors"))), layer_mb=(size / n) / MB,
                                 output_mb=dir_bytes(out) / MB, peak_rss_mb=peak / MB, vm_hwm_mb=child["vm_hwm"] / MB,
                                 above_baseline_mb=(peak - baseline) / MB, seconds=child["seconds"],
                                 mb_per_s=size / MB / child["seconds"],
                                 disk_read_mb_per_s=None if disk is None else disk / MB))
                subprocess.run(["rm", "-rf", str(out)], check=True)
            subprocess.run(["rm", "-rf", str(hf)], check=True)

    print(f"baseline RSS (python + jax + orbax imported): {baseline / MB:.0f} MB")
    head = ("layers", "cache", "ckpt MB", "shards", "MB/layer", "out MB", "peak RSS MB", "VmHWM MB", "above base MB",
            "s", "MB/s", "disk MB/s")
    print(" | ".join(f"{h:>13}" for h in head))
    for r in rows:
        vals = (r["layers"], r["cache"], r["checkpoint_mb"], r["shards"], r["layer_mb"], r["output_mb"],
                r["peak_rss_mb"], r["vm_hwm_mb"], r["above_baseline_mb"], r["seconds"], r["mb_per_s"],
                r["disk_read_mb_per_s"] or "")
        print(" | ".join(f"{v:>13.1f}" if isinstance(v, float) else f"{v:>13}" for v in vals))
    write_result(a.out, benchmark="convert", model=MODEL, dtype="bf16",
                 tiers={"hi": "source (bf16)", "lo": "int4:g128"}, baseline_rss_mb=baseline / MB, rows=rows)


if __name__ == "__main__":
    main()

"""Expert parallelism on a forced CPU mesh (model.moe.sharded): decode step time and prefill time
against the device count, and the bytes each step moves between devices, on the bench config
(random weights) with every expert in one tier. Writes benchmarks/results/expert_parallel.json.

On one CPU the "devices" share the same cores and memory, so this measures the partitioning's
overhead (a psum per MoE layer, per-device kernel calls), not a speed-up: on a GPU node each
device streams only its share of the experts (1/N of the expert bytes per step) while the psum
moves T x H x 4 bytes per MoE layer, 2 (N - 1) / N of it over each device's links (a ring
all-reduce). The script re-runs itself once per device count (JAX fixes the count at start)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def measure(devices: int, model: str, batch: int, new_tokens: int, repeats: int) -> dict:
    import jax

    import dynaexq_jax
    m = dynaexq_jax.load(model, devices=None if devices == 1 else devices)
    cfg = m.config
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (batch, 64)).tolist()
    m.generate(prompts, max_new_tokens=new_tokens, stop_tokens=())          # compiles
    best = None
    for _ in range(repeats):
        res = m.generate(prompts, max_new_tokens=new_tokens, stop_tokens=())
        if best is None or res.stats.decode_s < best.stats.decode_s:
            best = res
    psum = len(cfg.moe_layers) * batch * cfg.hidden_size * 4         # one [T, H] f32 all-reduce per MoE layer
    experts = sum(a.nbytes for layer in m.params.layers if hasattr(layer.mlp, "experts")
                  for a in jax.tree.leaves(layer.mlp.experts))
    return dict(devices=devices, batch=batch, decode_tok_s=best.stats.decode_tokens_per_s,
                decode_step_ms=1e3 * best.stats.decode_s / max(1, best.stats.decode_tokens // batch),
                ttft_ms=1e3 * best.stats.time_to_first_token_s, psum_bytes_per_step=psum,
                ring_bytes_per_device_per_step=int(psum * 2 * (devices - 1) / devices),
                expert_bytes_per_device=experts // devices, tokens=best.tokens[0][:8])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="1,2,4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "expert_parallel.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)     # a converted model: measure on this process's devices
    a = ap.parse_args()
    if a.child:
        n = int(os.environ["DYNAEXQ_BENCH_DEVICES"])
        print("RESULT " + json.dumps([measure(n, a.child, int(b), a.new_tokens, a.repeats)
                                      for b in a.batches.split(",")]))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import write_result

    from checkpoints_convert import convert
    from dynaexq_jax.experiments.synthetic import BENCH_CONFIG, write_random_qwen3_moe
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf = write_random_qwen3_moe(Path(tmp) / "hf", seed=0, tokenizer=False, **BENCH_CONFIG)
        model = convert(hf, Path(tmp) / "conv", lo="int4", progress=False)
        for n in (int(x) for x in a.devices.split(",")):
            env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
                   "DYNAEXQ_BENCH_DEVICES": str(n)}
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", str(model), "--batches", a.batches,
                                   "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats)],
                                  env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            rows += json.loads(line[len("RESULT "):])
            print(f"{n} device(s) measured in {time.perf_counter() - t0:.0f}s", flush=True)
    same = all(len({json.dumps(r["tokens"]) for r in rows if r["batch"] == b}) == 1 for b in {r["batch"] for r in rows})
    print("| devices | batch | decode tok/s | step ms | TTFT ms | psum bytes / step | ring bytes / device / step "
          "| expert bytes / device |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['devices']} | {r['batch']} | {r['decode_tok_s']:.0f} | {r['decode_step_ms']:.2f} | "
              f"{r['ttft_ms']:.0f} | {r['psum_bytes_per_step']:,} | {r['ring_bytes_per_device_per_step']:,} | "
              f"{r['expert_bytes_per_device'] / 2**20:.1f} MiB |")
    print(f"same greedy tokens on every device count: {same}")
    write_result(a.out, config="bench (benchmarks/engine.py's BENCH_CONFIG), f32 HI tier, one tier",
                 rows=rows, same_tokens=same)


if __name__ == "__main__":
    main()

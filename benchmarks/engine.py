"""The DynaExq runtime on the CPU bench model: controller host time per segment as a share of
decode time, and dynaexq decode tokens/s as a share of the all-LO model's at the same batch,
measured side by side in one run. Writes benchmarks/results/engine_cpu.json.

Model: the foundation issue's bench config (hidden 512, 8 layers, 32 experts top-4,
moe_intermediate 256), random weights, HI tier f32 / LO tier int4:g128, ~20% HI slots."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import write_result  # benchmarks/common.py

from checkpoints_convert import convert
from dynaexq_jax.experiments.synthetic import BENCH_CONFIG, write_random_qwen3_moe
from dynaexq_jax.runtime.budget import budget_for_fraction
from dynaexq_jax.runtime.config import EngineConfig
from dynaexq_jax.runtime.engine import Engine
from dynaexq_jax.serving.checkpoint import load_checkpoint

PROMPT, NEW, MAX_LEN = 64, 128, 256


def run(engine, prompts, repeats):
    engine.generate(prompts, max_new_tokens=NEW, stop_tokens=())          # warm-up (compiles)
    best = None
    for _ in range(repeats):
        res = engine.generate(prompts, max_new_tokens=NEW, stop_tokens=())
        if best is None or res.stats.decode_s < best.stats.decode_s:
            best = res
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--segment", type=int, default=16)
    ap.add_argument("--period", type=int, default=32, help="T_u, decode steps between policy updates")
    ap.add_argument("--hi-fraction", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_cpu.json"))
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf = write_random_qwen3_moe(Path(tmp) / "hf", seed=0, tokenizer=False, **BENCH_CONFIG)
        ckpt = load_checkpoint(convert(hf, Path(tmp) / "conv", lo="int4", progress=False))
        rng = np.random.default_rng(0)
        for b in [int(x) for x in a.batches.split(",")]:
            prompts = rng.integers(1, BENCH_CONFIG["vocab_size"], (b, PROMPT)).tolist()
            settings = EngineConfig(batch=b, max_len=MAX_LEN, segment_len=a.segment, update_period=a.period)
            budget = budget_for_fraction(ckpt, a.hi_fraction, settings)
            results = {}
            for policy in ("all-lo", "dynaexq"):
                eng = Engine(ckpt, budget_bytes=budget if policy == "dynaexq" else 10**12,
                             settings=settings.replace(policy=policy))
                res = run(eng, prompts, a.repeats)
                # Host time in the hooks: controller work, and waits for the device (the dispatched
                # segment before a publish, copies), as the CLI reports them (Engine._summary).
                ctl, work, wait = (res.runtime[k] for k in ("controller_s", "controller_work_s", "device_wait_s"))
                results[policy] = dict(tok_s=res.stats.decode_tokens_per_s, decode_s=res.stats.decode_s,
                                       controller_s=ctl, controller_share=ctl / res.stats.decode_s,
                                       wait_s=wait, controller_work_share=work / res.stats.decode_s,
                                       n_hi=eng.n_hi, hit_rate=res.runtime["hi_hit_rate"],
                                       swaps=res.runtime["counters"]["promotions"],
                                       stalls=res.runtime["counters"]["device_stalls"])
            d, lo = results["dynaexq"], results["all-lo"]
            rows.append(dict(batch=b, budget=budget,
                             **{f"{k}_{p}": v for p, r in results.items() for k, v in r.items()},
                             share_of_all_lo=d["tok_s"] / lo["tok_s"]))
            print(f"batch {b:2d}: all-LO {lo['tok_s']:7.1f} tok/s | dynaexq {d['tok_s']:7.1f} tok/s "
                  f"({100 * d['tok_s'] / lo['tok_s']:.0f}% of all-LO; "
                  f"HI slots {d['n_hi'][0]}/{BENCH_CONFIG['num_experts']} per layer, hit rate {d['hit_rate']:.2f}, "
                  f"{d['swaps']} swaps, {d['stalls']} stalls) | "
                  f"controller {100 * d['controller_share']:.2f}% of decode time at T={a.segment} "
                  f"({100 * d['controller_work_share']:.2f}% without waiting for the device and copies)", flush=True)
    write_result(a.out, benchmark="engine", config=BENCH_CONFIG, prompt=PROMPT, new_tokens=NEW,
                 segment=a.segment, period=a.period, rows=rows)


if __name__ == "__main__":
    main()

"""Where a CPU decode step's time goes: XLA's own trace of the decode segments, per operation.

Runs `generate` on a converted model (the default model or the bench config of
benchmarks/vs_llamacpp.py, one expert format) under jax.profiler.trace and reads the XLA CPU
runtime's per-operation events ("thunks") inside the decode segments: how many operations one
step runs and how long each kind takes, the CPU kernels told apart by their custom-call target
(read from the compiled program). The tracer adds a little to every operation, so the totals run
above the untraced step time (printed beside them); the split is what this measures.
Writes benchmarks/results/decode_profile.json. Not part of CI.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from common import write_result  # benchmarks/common.py

PROMPT, SEGMENT, SEGMENTS = 64, 16, 2


def kernel_targets(model, batch: int, max_len: int) -> dict[str, str]:
    """Custom-call instruction name -> its target, from the compiled decode segment."""
    import jax
    import jax.numpy as jnp

    from dynaexq_jax.model.families import family
    from dynaexq_jax.serving import generate as G
    from dynaexq_jax.serving.sampling import Sampling
    cfg = model.config
    cache = family(cfg.model_type).init_cache(cfg, batch, max_len, model._cache_dtype)
    scores = jnp.zeros((len(cfg.moe_layers), cfg.num_experts), jnp.float32)
    text = G.decode_segment.lower(model.params, cfg, cache, jnp.zeros((batch,), jnp.int32),
                                  jnp.zeros((batch,), bool), jnp.int32(1), jax.random.PRNGKey(0),
                                  jnp.zeros((0,), jnp.int32), scores, steps=SEGMENT, sampling=Sampling(),
                                  alpha=0.1).compile().as_text()
    return dict(re.findall(r"%([\w.\-]+) = [^\n]*custom_call_target=\"([\w.\-]+)\"", text))


def kind_of(name: str, targets: dict[str, str]) -> str:
    """An operation's kind: the CPU kernels by target, XLA's dots (YNNPACK fusions), the rest."""
    target = targets.get(name)
    if target == "dynaexq_moe_tier":
        return "CPU kernel: routed experts"
    if target == "dynaexq_matmul":
        return "CPU kernel: dense matmul"
    if target is not None:
        return f"custom call {target}"
    if name.startswith("ynn_fusion"):
        return "XLA: YNNPACK fusions (attention dots, router)"
    return "XLA: other operations"


def profile(model, batch: int, trace_dir: Path) -> dict:
    import jax
    new = 1 + SEGMENT * SEGMENTS
    max_len = PROMPT + new + SEGMENT
    prompts = np.random.default_rng(0).integers(1, model.config.vocab_size, (batch, PROMPT)).tolist()

    def run():
        return model.generate(prompts, max_new_tokens=new, stop_tokens=(), segment_len=SEGMENT, max_len=max_len)
    run(), run()                                    # compiled and warm
    untraced = min(run().stats.decode_s for _ in range(3)) / (new - 1)
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        run()
    path = sorted(trace_dir.rglob("*.trace.json.gz"))[-1]
    events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
    # The prefill has finished when the first segment is dispatched (its token was read); what
    # runs after that is the segments (dispatched asynchronously, so their spans say nothing).
    t0 = min(e["ts"] for e in events if "decode_segment" in e.get("name", ""))
    targets = kernel_targets(model, batch, max_len)
    # Operation events: named after HLO instructions (the runtime's own bookkeeping aside).
    skip = ("end:", "$", "Thunk", "Threadpool", "Pjrt", "Common", "PjitF", "Parse", "Handle", "Alloc", "Wait",
            "Python", "DevicePut", "while")
    ops = [e for e in events if e["ts"] >= t0 and not e["name"].startswith(skip)]
    steps = SEGMENT * SEGMENTS
    time_by, count_by = collections.Counter(), collections.Counter()
    for e in ops:
        kind = kind_of(e["name"], targets)
        time_by[kind] += e["dur"] / steps
        count_by[kind] += 1 / steps
    return dict(batch=batch, untraced_step_us=untraced * 1e6, traced_step_us=sum(time_by.values()),
                operations_per_step=len(ops) / steps,
                kinds={k: dict(us_per_step=time_by[k], per_step=count_by[k]) for k in sorted(time_by, key=time_by.get,
                                                                                                reverse=True)})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", choices=("default", "bench"))
    ap.add_argument("--format", default="int4:g32", help="every expert in this format (dense: --dense)")
    ap.add_argument("--dense", default="f32", help="dense dtype")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_profile.json"))
    a = ap.parse_args()
    import dynaexq_jax
    from checkpoints_convert import convert
    from dynaexq_jax.experiments import default_model
    from dynaexq_jax.experiments.synthetic import BENCH_CONFIG, write_random_qwen3_moe
    from dynaexq_jax.model.moe import cpu_kernel
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = default_model.HF_DIR if a.model == "default" else write_random_qwen3_moe(
            tmp / "hf", seed=0, tokenizer=False, **BENCH_CONFIG)
        model = dynaexq_jax.load(convert(hf, tmp / "conv", hi=a.format, dtype=a.dense, progress=False))
        for b in [int(x) for x in a.batches.split(",")]:
            t = time.perf_counter()
            row = profile(model, b, tmp / f"trace{b}")
            rows.append(row)
            print(f"\n{a.model} model, experts {a.format}, dense {a.dense}, batch {b}: "
                  f"{row['operations_per_step']:.0f} operations per step; {row['untraced_step_us']:.0f} us per step "
                  f"untraced, {row['traced_step_us']:.0f} us traced ({time.perf_counter() - t:.0f} s)")
            for kind, v in row["kinds"].items():
                print(f"  {v['us_per_step']:8.1f} us  {v['per_step']:6.1f} ops  {kind}")
    write_result(a.out, benchmark="decode_profile", model=a.model, format=a.format, dense=a.dense,
                 cpu_kernel_isa=cpu_kernel.isa() if cpu_kernel.available() else None, prompt=PROMPT,
                 segment=SEGMENT, rows=rows)


if __name__ == "__main__":
    main()

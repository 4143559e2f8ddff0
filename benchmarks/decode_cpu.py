"""Decode tokens/s of dynaexq-jax vs transformers eager on the same converted checkpoint (CPU).

Config (foundation issue): hidden 512, 8 layers, 8 heads / 2 kv heads, head_dim 64, 32 experts,
top-4, moe_intermediate 256, vocab 4096; a 64-token prompt then 64 new tokens, batch 1 and 8.
Decode time is measured the same way for both: time(64 new tokens) - time(1 new token), so
prefill and (for us) compilation are excluded. Writes benchmarks/results/decode_cpu.json."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

import dynaexq_jax
from checkpoints_convert import convert
from common import best_of  # benchmarks/common.py
from dynaexq_jax.synthetic import BENCH_CONFIG, write_random_qwen3_moe

PROMPT, NEW = 64, 64


def bench_ours(model, prompts, repeats):
    # stop_tokens=() so every run makes exactly the requested number of tokens.
    run = lambda n: model.generate(prompts, max_new_tokens=n, stop_tokens=(), segment_len=16, max_len=256)
    run(1), run(NEW)  # compile
    return best_of(lambda: run(NEW), repeats) - best_of(lambda: run(1), repeats)


def bench_hf(hf, prompts, repeats):
    ids = torch.tensor(prompts)
    def run(n):
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)
    run(2)
    return best_of(lambda: run(NEW), repeats) - best_of(lambda: run(1), repeats)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_cpu.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_random_qwen3_moe(Path(tmp) / "hf", seed=0, tokenizer=False, **BENCH_CONFIG)
        conv = convert(hf_dir, Path(tmp) / "conv", progress=False)
        ours = dynaexq_jax.load(conv)
        hf = transformers.Qwen3MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
        rng = np.random.default_rng(0)
        for b in [int(x) for x in a.batches.split(",")]:
            prompts = rng.integers(1, BENCH_CONFIG["vocab_size"], (b, PROMPT)).tolist()
            t_ours = bench_ours(ours, prompts, a.repeats)
            t_hf = bench_hf(hf, prompts, a.repeats)
            n = b * (NEW - 1)
            rows.append(dict(batch=b, ours_tok_s=n / t_ours, hf_tok_s=n / t_hf, speedup=t_hf / t_ours))
            r = rows[-1]
            print(f"batch {b:2d}: dynaexq-jax {r['ours_tok_s']:8.1f} tok/s | transformers eager "
                  f"{r['hf_tok_s']:8.1f} tok/s | ratio {r['speedup']:.2f}x", flush=True)
    result = dict(date=datetime.date.today().isoformat(), machine=platform.processor() or platform.machine(),
                  cpus=len(__import__("os").sched_getaffinity(0)), jax=jax.__version__, torch=torch.__version__,
                  transformers=transformers.__version__, config=BENCH_CONFIG, prompt=PROMPT, new_tokens=NEW, rows=rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

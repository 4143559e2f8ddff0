"""Prefill and decode tokens/s of a small Qwen3-Next (hybrid Gated DeltaNet / gated attention, routed
+ shared experts) on CPU: dynaexq-jax vs transformers eager (its torch fallbacks for the linear
layers) on the same random checkpoint.

Config: hidden 256, 8 layers (every 4th full attention), 8 heads / 2 kv heads of 64, linear
attention 4 key / 8 value heads of 32, conv 4, 32 experts top-4 of 128 + a shared expert of 256,
vocab 4096. A 256-token prompt (ours: 4 chunks of 64), then 64 new tokens, batch 1 and 4.
Prefill: ours is generate's time to first token, the reference's one forward that fills a cache.
Decode: ours is generate's own decode time (its jitted segments after prefill), the reference's a
greedy loop of single-token forwards on its cache (generate without its per-step bookkeeping).
Best of --repeats runs after a warm-up (so no compilation). Writes
benchmarks/results/qwen3_next_cpu.json."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from common import best_of, write_result  # benchmarks/common.py

import dynaexq_jax
from checkpoints_convert import convert

CONFIG = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=8, full_attention_interval=4,
              num_attention_heads=8, num_key_value_heads=2, head_dim=64, linear_num_key_heads=4,
              linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4,
              num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128, shared_expert_intermediate_size=256,
              intermediate_size=512, max_position_embeddings=4096, eos_token_id=None)
PROMPT, NEW = 256, 64


def bench_ours(model, prompts, repeats):
    """-> (prefill s, decode s for NEW - 1 tokens per sequence)."""
    # stop_tokens=() so every run makes exactly the requested number of tokens.
    def run():
        return model.generate(prompts, max_new_tokens=NEW, stop_tokens=(), segment_len=16, max_len=512).stats
    run()  # compile
    stats = [run() for _ in range(repeats)]
    return min(s.time_to_first_token_s for s in stats), min(s.decode_s for s in stats)


def bench_hf(hf, prompts, repeats):
    ids = torch.tensor(prompts)

    def decode():
        out = hf(ids, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(NEW - 1):
            out = hf(tok, cache=out.cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - t
    with torch.no_grad():
        decode()  # warm-up
        return best_of(lambda: hf(ids, use_cache=True), repeats), min(decode() for _ in range(repeats))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "qwen3_next_cpu.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        hf = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**CONFIG)).float().eval()
        hf.save_pretrained(Path(tmp) / "hf")
        ours = dynaexq_jax.load(convert(Path(tmp) / "hf", Path(tmp) / "conv", progress=False))
        rng = np.random.default_rng(0)
        print(f"{'batch':>5} | {'prefill tok/s ours':>18} {'transformers':>12} | {'decode tok/s ours':>17} "
              f"{'transformers':>12}", flush=True)
        for b in [int(x) for x in a.batches.split(",")]:
            prompts = rng.integers(1, CONFIG["vocab_size"], (b, PROMPT)).tolist()
            p_ours, d_ours = bench_ours(ours, prompts, a.repeats)
            p_hf, d_hf = bench_hf(hf, prompts, a.repeats)
            n = b * (NEW - 1)
            rows.append(dict(batch=b, prefill_tok_s_ours=b * PROMPT / p_ours, prefill_tok_s_hf=b * PROMPT / p_hf,
                             decode_tok_s_ours=n / d_ours, decode_tok_s_hf=n / d_hf))
            r = rows[-1]
            print(f"{b:5d} | {r['prefill_tok_s_ours']:18.1f} {r['prefill_tok_s_hf']:12.1f} | "
                  f"{r['decode_tok_s_ours']:17.1f} {r['decode_tok_s_hf']:12.1f}", flush=True)
    write_result(a.out, benchmark="qwen3_next_cpu", torch=torch.__version__, transformers=transformers.__version__,
                 config=CONFIG, prompt=PROMPT, new_tokens=NEW, rows=rows)


if __name__ == "__main__":
    main()

"""Decode tokens/s of dynaexq-jax vs transformers eager on the same converted checkpoint (CPU).

Config (foundation issue): hidden 512, 8 layers, 8 heads / 2 kv heads, head_dim 64, 32 experts,
top-4, moe_intermediate 256, vocab 4096, f32; a 64-token prompt then 64 new tokens, batch 1 and 8.
Engines: ours with the default backend ("xla": the CPU kernel streams the routed experts) and
with plain XLA ("xla-only"), and transformers eager (attention "eager", its default experts
implementation). Decode time is time(64 new tokens) - time(1 new token) for every engine, so
prefill and compilation are excluded; the engines alternate round by round and each keeps its
best time, so a slow spell of this shared machine hits them alike.

The memory floor: a decode step must read every dense weight once and every expert the batch
routes to once (counted from our run's router traffic). That many bytes at the machine's read
bandwidth (measured here: the best of a 2-thread GEMV over a 400 MB matrix) bounds any
implementation's step time from below. Writes benchmarks/results/decode_cpu.json."""
from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from common import best_of, timed, write_result  # benchmarks/common.py

import dynaexq_jax
from checkpoints_convert import convert
from dynaexq_jax.experiments.synthetic import BENCH_CONFIG, write_random_qwen3_moe
from dynaexq_jax.serving.generate import Controller, generate

PROMPT, NEW = 64, 64
OURS = {"dynaexq-jax (xla + CPU kernel)": "xla", "dynaexq-jax (xla-only)": "xla-only"}
HF = "transformers eager"


def ours_runner(model):
    return lambda prompts, n: model.generate(prompts, max_new_tokens=n, stop_tokens=(), segment_len=16,
                                             max_len=256)


def hf_runner(hf):
    def run(prompts, n):
        ids = torch.tensor(prompts)
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)
    return run


class Traffic(Controller):
    """Records which experts each decode step routes to (router mass > 0)."""
    def __init__(self):
        self.hit = []

    def after_segment(self, step, mass, scores, in_flight):
        self.hit.append(mass > 0)          # [steps, L, E]


def read_bandwidth(repeats: int = 20) -> float:
    """Bytes/s of the best 2-thread GEMV over a 400 MB f32 matrix (too big for the caches)."""
    w = jnp.ones((8192, 12800), jnp.float32)
    x = jnp.ones((1, 8192), jnp.float32)
    f = jax.jit(lambda x, w: x @ w)
    f(x, w).block_until_ready()
    return w.nbytes / best_of(lambda: f(x, w).block_until_ready(), repeats)


def floor_bytes(model, prompts) -> tuple[float, float]:
    """(bytes a decode step must read at least, mean experts routed per layer per step)."""
    cfg, params = model.config, model.params
    traffic = Traffic()
    generate(params, cfg, prompts, max_new_tokens=NEW, stop_tokens=(), segment_len=16, max_len=256,
             controller=traffic)
    hit = np.concatenate(traffic.hit)                           # [steps, L, E]
    layer0 = params.layers[0].mlp.experts.pools[0]
    expert_bytes = layer0.nbytes / layer0.size
    dense = sum(a.nbytes for a in jax.tree.leaves(params) if a.ndim >= 2) - \
        sum(l.mlp.experts.pools[0].nbytes for l in params.layers) - params.embed.nbytes
    dense += params.embed.nbytes if params.lm_head is None else 0      # a tied head is read whole
    # Embedding rows, and the keys and values of the positions actually filled (on average).
    filled = len(prompts) * (PROMPT + NEW / 2)
    dense += filled * 2 * cfg.num_kv_heads * cfg.head_dim * 4 * cfg.num_layers + len(prompts) * cfg.hidden_size * 4
    per_step = hit.sum(axis=(1, 2)).mean() * expert_bytes + dense
    return float(per_step), float(hit.sum(axis=2).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_cpu.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    bandwidth = read_bandwidth()
    print(f"read bandwidth (2-thread GEMV, 400 MB): {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_random_qwen3_moe(Path(tmp) / "hf", seed=0, tokenizer=False, **BENCH_CONFIG)
        conv = convert(hf_dir, Path(tmp) / "conv", progress=False)
        models = {name: dynaexq_jax.load(conv, backend=b) for name, b in OURS.items()}
        runners = {name: ours_runner(m) for name, m in models.items()}
        hf = transformers.Qwen3MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
        runners[HF] = hf_runner(hf)
        rng = np.random.default_rng(0)
        for b in [int(x) for x in a.batches.split(",")]:
            prompts = rng.integers(1, BENCH_CONFIG["vocab_size"], (b, PROMPT)).tolist()
            for run in runners.values():   # warm-up: compilation, allocator
                run(prompts, 2), run(prompts, NEW)
            best = {name: {1: np.inf, NEW: np.inf} for name in runners}
            for _ in range(a.rounds):
                for name, run in runners.items():
                    for n in (NEW, 1):
                        best[name][n] = min(best[name][n], timed(functools.partial(run, prompts, n)))
            n_tok = b * (NEW - 1)
            tok_s = {name: n_tok / (t[NEW] - t[1]) for name, t in best.items()}
            step_bytes, experts = floor_bytes(next(iter(models.values())), prompts)
            floor_tok_s = b / (step_bytes / bandwidth)
            row = dict(batch=b, tok_s=tok_s, speedup={n: tok_s[n] / tok_s[HF] for n in OURS},
                       step_bytes=step_bytes, experts_per_layer_step=experts, floor_tok_s=floor_tok_s,
                       goal_tok_s=3 * tok_s[HF])
            rows.append(row)
            print(f"batch {b}: " + " | ".join(f"{n} {v:7.1f} tok/s" for n, v in tok_s.items()), flush=True)
            print("  ratios vs transformers: " + ", ".join(f"{n} {v:.2f}x" for n, v in row["speedup"].items()))
            print(f"  floor: {step_bytes / 2**20:.0f} MiB per step ({experts:.1f} experts per layer) at "
                  f"{bandwidth / 1e9:.1f} GB/s -> at most {floor_tok_s:.0f} tok/s; the 3x goal needs "
                  f"{row['goal_tok_s']:.0f} tok/s ({'within' if row['goal_tok_s'] <= floor_tok_s else 'ABOVE'}"
                  f" the floor)", flush=True)
    write_result(a.out, benchmark="decode_cpu", torch=torch.__version__, transformers=transformers.__version__,
                 config=BENCH_CONFIG, prompt=PROMPT, new_tokens=NEW,
                 hf_experts_implementation=hf.config._experts_implementation, rounds=a.rounds,
                 read_bandwidth_bytes_s=bandwidth, rows=rows)


if __name__ == "__main__":
    main()

"""CPU decode and prefill tokens/s of dynaexq-jax vs llama.cpp on the same weights (issue 14).

Models: the bench config (experiments.synthetic.BENCH_CONFIG: random weights, f32 source, a byte-level BPE
tokenizer) and the default model (dynaexq_jax/assets/tiny-moe, bf16 source). Formats, GGUF <->
project: F32 <-> f32, BF16 <-> bf16, and experts-only quantized GGUFs (llama-quantize --pure; attention,
embedding and output head kept in the dense dtype, --quant-dense, f32 by default) Q8_0 <-> int8:g32,
Q4_0 <-> int4:g32, Q2_K <-> int2:g32, and "mixed": a two-tier layer, HI int4:g32 for the even experts
and LO int2:g32 for the odd ones in every layer (fixed, no swaps), against the better of Q4_0 and Q2_K.

llama.cpp: built once (Release, -DGGML_NATIVE=ON) from the copy vendored in the llama-cpp-python sdist,
cached under cpu_kernel.cache_dir()/llamacpp (benchmarks/llamacpp_tools.py); its convert_hf_to_gguf.py
converts the HF weights. Before timing, with F32 weights: llama.cpp's logits (through the ctypes bindings
on the built libllama, KV cache f32) against ours on the same prompt tokens, greedy continuations (48
tokens) with the logits of each of llama.cpp's decode steps against ours on the same tokens, and the
tokenization of one text; a loud warning if they disagree.

Timing, after a 64-token context: llama.cpp `llama-bench -p 0 -n 64 -d 64 -r 3` at batch 1 and
`llama-batched-bench -npp 64 -ntg 64 -npl B` (S_TG) at batch B; ours `model.generate` with decode
tok/s = B * 63 / (time(64 new) - time(1 new)). Prefill: `llama-bench -p 256 -n 0` against 256 / time
of a 256-token prompt with max_new_tokens=1 (compiled beforehand). The two engines alternate round by
round (per format and batch, llama.cpp first), each keeps its best of --rounds, on the same --threads:
llama.cpp through -t, ours by limiting the process's CPU affinity to that many cores before jax is
imported (XLA sizes its CPU thread pool from the schedulable cores; llama.cpp's processes inherit the
same affinity). transformers (eager attention, its default experts implementation, torch on the
same threads) is timed the same way as ours in the float formats (f32, bf16), as a second reference.
Writes benchmarks/results/vs_llamacpp.json and prints a table per model and a README table. Not
part of CI: `python benchmarks/vs_llamacpp.py`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import timed, write_result  # benchmarks/common.py
from llamacpp_tools import (
    SDIST_VERSION,
    LlamaCppError,
    ToolsMissingError,
    batched_bench,
    convert_gguf,
    ensure_tools,
    gguf_tensor_types,
    llama_bench,
    quantize_experts,
    reference,
    say,
)

PROMPT, NEW, PREFILL, GREEDY, SEGMENT = 64, 64, 256, 48, 16
LOGIT_TOLERANCE = 0.01       # max |logit difference| for agreement on F32 weights
LLAMA_REPS = 3               # llama-bench -r: repetitions inside one llama-bench call
MODELS = ("bench", "default")
# format -> the GGUF(s) it is compared with (the best of several), our HI tier, our LO tier (None:
# one tier) and the dense dtype (None: --quant-dense). Q4_0/Q8_0 blocks are 32 wide, as g32.
FORMATS = {
    "f32": dict(gguf=("F32",), hi="f32", lo=None, dense="f32"),
    "bf16": dict(gguf=("BF16",), hi="bf16", lo=None, dense="bf16"),
    "int8": dict(gguf=("Q8_0",), hi="int8:g32", lo=None, dense=None),
    "int4": dict(gguf=("Q4_0",), hi="int4:g32", lo=None, dense=None),
    "int2": dict(gguf=("Q2_K",), hi="int2:g32", lo=None, dense=None),
    "mixed": dict(gguf=("Q4_0", "Q2_K"), hi="int4:g32", lo="int2:g32", dense=None),
}
AGREE_TEXT = ('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
              "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
              "The module provides functions for working with files and directories, such as reading "
              "a file, listing a directory and joining paths.")
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_bf16", "amx_int8")


def limit_threads(threads: int) -> tuple[list[int], list[int]]:
    """Pin this process (and the llama.cpp processes it starts) to `threads` of its cores. Must run
    before jax is imported: XLA's CPU thread pool is sized from the cores the process may use.
    Returns (the cores it had, the cores it keeps)."""
    if "jax" in sys.modules:
        raise RuntimeError("limit_threads must run before jax is imported")
    cores = sorted(os.sched_getaffinity(0))
    if threads > len(cores):
        raise SystemExit(f"--threads {threads}: this process may use only {len(cores)} cores ({cores})")
    os.sched_setaffinity(0, cores[:threads])
    return cores, cores[:threads]


def cpu_info() -> dict:
    """The CPU's model name and the feature flags that matter to the kernels of both engines."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    field = {l.split(":", 1)[0].strip(): l.split(":", 1)[1].strip() for l in reversed(lines) if ":" in l}
    flags = set(field.get("flags", "").split())
    return dict(model_name=field.get("model name"), flags={f: f in flags for f in CPU_FLAGS})


def busy(seconds: float = 0.5) -> float:
    """Cores kept busy by other work, measured while this process sleeps (/proc/stat), with a warning
    above a fifth of a core: llama.cpp's threads wait for each other spinning, so its tok/s collapse
    (10x and more) when a core it runs on is taken, and ours drop too; such numbers compare nothing."""
    def jiffies():
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(cpu), cpu[3] + cpu[4]                # total, idle + iowait
    try:
        t0, i0 = jiffies()
        time.sleep(seconds)
        t1, i1 = jiffies()
    except OSError:
        return float("nan")
    cores = (1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)
    if cores > 0.2:
        say(f"WARNING: other work keeps {cores:.1f} of {os.cpu_count()} cores busy: timings are unreliable "
            "(llama.cpp's above all)")
    return round(cores, 2)


# ---- weights on both sides ------------------------------------------------------------------------
def hf_source(name: str, tmp: Path) -> tuple[Path, dict]:
    """The HF directory of model `name` and its description."""
    from dynaexq_jax.experiments import default_model
    from dynaexq_jax.experiments.synthetic import BENCH_CONFIG, write_random_qwen3_moe
    if name == "bench":
        say("bench config: writing random HF weights (f32) and a BPE tokenizer")
        hf = write_random_qwen3_moe(tmp / "bench-hf", seed=0, tokenizer=True, **BENCH_CONFIG)
        return hf, dict(source="random, seed 0 (experiments.synthetic.BENCH_CONFIG)", config=BENCH_CONFIG)
    return default_model.HF_DIR, dict(source=str(default_model.HF_DIR))


def make_ggufs(tools, hf: Path, out: Path, ggufs: set[str], quant_dense: str, threads: int) -> dict[str, Path]:
    """The GGUFs named in ggufs (F32, BF16, Q8_0, Q4_0, Q2_K) of the HF weights, in out."""
    dense_src = quant_dense.upper()
    need_float = {g for g in ggufs if g in ("F32", "BF16")} | ({dense_src} if ggufs - {"F32", "BF16"} else set())
    paths = {}
    for g in sorted(need_float):
        say(f"  convert_hf_to_gguf.py -> {g}")
        paths[g] = convert_gguf(tools, hf, out / f"{g}.gguf", g.lower())
    for g in sorted(ggufs - {"F32", "BF16"}):
        say(f"  llama-quantize --pure {g} (attention, embedding, output: {quant_dense})")
        paths[g] = quantize_experts(tools, paths[dense_src], out / f"{g}.gguf", g, quant_dense, threads)
        kinds = {k: v for k, v in gguf_tensor_types(tools, paths[g]).items() if "_exps" in k and v != g}
        if kinds:       # K-quants need rows that are multiples of 256: llama-quantize falls back
            say(f"    note: not {g} but {', '.join(f'{k} {v}' for k, v in kinds.items())} (llama-quantize's fallback)")
    return paths


def project_model(hf: Path, out: Path, fmt: dict, dense: str, cache: dict):
    """Our model of format fmt: converted (one conversion per (hi, lo, dense), shared) and loaded
    with every expert in one tier, or, for a two-tier format, half the experts of every layer in each."""
    import dynaexq_jax
    from checkpoints_convert import convert
    hi, lo = fmt["hi"], fmt["lo"] or "int2:g32"
    key = (hi, lo, dense)
    if key not in cache:
        say(f"  dynaexq convert: hi {hi}, lo {lo}, dense {dense}")
        cache[key] = convert(hf, out / f"conv-{hi}-{lo}-{dense}".replace(":", ""), hi=hi, lo=lo, dtype=dense,
                             progress=False)
    model = dynaexq_jax.load(cache[key], tier="hi")
    if fmt["lo"] is not None:
        model.params = two_tier_params(model)
    return model


def two_tier_params(model):
    """model's params with every MoE layer's even experts served from its HI tier and the odd ones
    from its LO tier (pools of half the experts each, a fixed assignment)."""
    import jax
    import jax.numpy as jnp

    from dynaexq_jax.model.moe import ExpertPools
    from dynaexq_jax.model.moe.base import HI, LO
    from dynaexq_jax.serving.checkpoint import attach_experts
    pools = {}
    for layer, tiers in model.checkpoint.experts.items():
        e = tiers["hi"].size
        ids = {HI: np.arange(0, e, 2), LO: np.arange(1, e, 2)}
        tier, slot = np.zeros(e, np.int32), np.zeros(e, np.int32)
        for t, members in ids.items():
            tier[members], slot[members] = t, np.arange(len(members))
        take = {t: jax.tree.map(lambda a, m=members: jnp.asarray(a[m]), tiers[name])
                for (t, members), name in zip(ids.items(), ("hi", "lo"))}
        pools[layer] = ExpertPools((take[HI], take[LO]), jnp.asarray(tier), jnp.asarray(slot))
    return attach_experts(model.params, pools)


# ---- agreement -------------------------------------------------------------------------------------
def agreement(tools, gguf: Path, model, threads: int) -> dict:
    """llama.cpp vs ours with F32 weights: the tokenization of AGREE_TEXT; the logits of every
    position of its tokens (llama.cpp: one batch); GREEDY greedy tokens after them, and the logits
    of each of llama.cpp's one-token decode steps against ours at the same tokens (teacher-forced:
    our full forward over the prompt and llama.cpp's greedy tokens), so that one step that parts
    the continuations (a near-tie in the router or the logits, which random weights make common)
    shows as one step, not as every token after it."""
    prompt = model.codec.encode(AGREE_TEXT)
    ref = reference(tools, gguf, prompt, GREEDY, AGREE_TEXT, threads)
    theirs_prompt, theirs_steps = np.asarray(ref["logits"], np.float32), np.asarray(ref["greedy_logits"], np.float32)
    ours_all = model.logits(prompt + ref["greedy"][:-1])[0]              # positions of the prompt, then the steps
    prompt_diff = np.abs(theirs_prompt - ours_all[:len(prompt)])
    step_diff = np.abs(theirs_steps - ours_all[len(prompt) - 1:]).max(-1)     # [GREEDY]
    greedy = model.generate([prompt], max_new_tokens=GREEDY, stop_tokens=(), segment_len=SEGMENT).tokens[0]
    same = [a == b for a, b in zip(greedy, ref["greedy"])]
    first = same.index(False) if not all(same) else None
    out = dict(prompt_tokens=len(prompt), tokens_equal=ref["text_tokens"] == prompt,
               logits_max_abs_diff=float(prompt_diff.max()), logits_mean_abs_diff=float(prompt_diff.mean()),
               logits_max_abs=float(np.abs(ours_all).max()),
               decode_step_max_abs_diff=[round(float(d), 5) for d in step_diff],
               decode_steps_within_tolerance=int((step_diff < LOGIT_TOLERANCE).sum()),
               greedy_equal=int(sum(same)), greedy_total=GREEDY, greedy_first_difference=first,
               tolerance=LOGIT_TOLERANCE, llama_kv_cache="f32", llama_system_info=ref["system_info"])
    # One-off steps are allowed (an expert choice that flips on a near-tie); most must agree.
    ok = (out["tokens_equal"] and out["logits_max_abs_diff"] < LOGIT_TOLERANCE
          and out["decode_steps_within_tolerance"] >= 0.9 * GREEDY)
    part = "" if first is None else f"; the continuations part at token {first}, where the step logits differ " \
        f"by {step_diff[first]:.2e}"
    say(f"  agreement (F32): tokenization {'equal' if out['tokens_equal'] else 'DIFFERENT'}; prompt logits max "
        f"|diff| {out['logits_max_abs_diff']:.2e} (largest logit {out['logits_max_abs']:.1f}); decode steps within "
        f"{LOGIT_TOLERANCE}: {out['decode_steps_within_tolerance']}/{GREEDY} (median {np.median(step_diff):.1e}, "
        f"max {step_diff.max():.1e}); greedy tokens {out['greedy_equal']}/{GREEDY} equal{part}")
    if not ok:
        print("!" * 100 + "\nWARNING: llama.cpp and dynaexq-jax DISAGREE on the same F32 weights: the timings "
              "below may not compare the same model\n" + "!" * 100, flush=True)
    out["ok"] = ok
    return out


# ---- timing ----------------------------------------------------------------------------------------
def cache_len(prompt: int, new: int) -> int:
    from dynaexq_jax.serving.generate import cache_len as need
    return need(np.array([prompt]), prompt, new, SEGMENT, None)


class Ours:
    """Timings of one of our models: per batch the best time(NEW) and time(1) after PROMPT tokens,
    and the best prefill time of PREFILL tokens; random prompts, fixed per batch."""

    def __init__(self, model, batches: list[int], vocab: int):
        rng = np.random.default_rng(0)
        self.model, self.decode_len, self.prefill_len = model, cache_len(PROMPT, NEW), cache_len(PREFILL, 1)
        self.prompts = {b: rng.integers(1, vocab, (b, PROMPT)).tolist() for b in batches}
        self.prefill_prompt = rng.integers(1, vocab, (1, PREFILL)).tolist()
        self.best = {b: {1: np.inf, NEW: np.inf} for b in batches}
        self.best_prefill = np.inf

    def run(self, prompts, n: int, max_len: int):
        self.model.generate(prompts, max_new_tokens=n, stop_tokens=(), segment_len=SEGMENT, max_len=max_len)

    def warm_up(self):
        """Compile every shape timed (prefill, decode segments) before any timing."""
        for prompts in self.prompts.values():
            self.run(prompts, 1, self.decode_len)
            self.run(prompts, NEW, self.decode_len)
        self.run(self.prefill_prompt, 1, self.prefill_len)

    def time_decode(self, b: int) -> float:
        """One round at batch b: time(NEW) and time(1); returns this round's decode tok/s."""
        t = {n: timed(lambda n=n: self.run(self.prompts[b], n, self.decode_len)) for n in (NEW, 1)}
        for n, s in t.items():
            self.best[b][n] = min(self.best[b][n], s)
        return b * (NEW - 1) / (t[NEW] - t[1])

    def decode_tok_s(self, b: int) -> float:
        return b * (NEW - 1) / (self.best[b][NEW] - self.best[b][1])

    def time_prefill(self) -> float:
        t = timed(lambda: self.run(self.prefill_prompt, 1, self.prefill_len))
        self.best_prefill = min(self.best_prefill, t)
        return PREFILL / t


class Transformers(Ours):
    """The same timings of transformers' model of the same HF weights in a float dtype (generate with
    greedy decoding, exactly n new tokens)."""

    def __init__(self, hf: Path, dtype: str, batches: list[int], vocab: int, threads: int):
        import torch
        import transformers
        torch.set_num_threads(threads)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            hf, dtype={"f32": torch.float32, "bf16": torch.bfloat16}[dtype], attn_implementation="eager").eval()
        super().__init__(model, batches, vocab)
        self.version = transformers.__version__

    def run(self, prompts, n: int, max_len: int):
        import torch
        ids = torch.tensor(prompts)
        with torch.no_grad():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0)


def time_llama(tools, gguf: Path, batch: int | str, threads: int) -> tuple[float, dict]:
    """One llama.cpp measurement: (best tok/s of this call, its record). batch 'prefill': pp PREFILL."""
    if batch == "prefill":
        rec = llama_bench(tools, gguf, prompt=PREFILL, gen=0, depth=0, threads=threads, reps=LLAMA_REPS)
        return max(rec["samples_ts"]), rec
    if batch == 1:
        rec = llama_bench(tools, gguf, prompt=0, gen=NEW, depth=PROMPT, threads=threads, reps=LLAMA_REPS)
        return max(rec["samples_ts"]), rec
    rec = batched_bench(tools, gguf, prompt=PROMPT, gen=NEW, batch=batch, threads=threads)
    return rec["speed_tg"], rec


def bench_model(name: str, a, tools, tmp: Path) -> dict:
    """Convert, check and time one model in every requested format; returns its JSON record."""
    say(f"== model {name}")
    hf, desc = hf_source(name, tmp)
    out = tmp / name
    out.mkdir()
    formats = {f: dict(FORMATS[f], dense=FORMATS[f]["dense"] or a.quant_dense) for f in a.formats}
    ggufs = {g for f in formats.values() for g in f["gguf"]} | {"F32"}        # F32: the agreement check
    paths = make_ggufs(tools, hf, out, ggufs, a.quant_dense, a.threads)
    conversions: dict = {}
    say("  loading our models")
    models = {f: project_model(hf, out, fmt, fmt["dense"], conversions) for f, fmt in formats.items()}
    f32_model = models.get("f32") or project_model(hf, out, FORMATS["f32"], "f32", conversions)
    agree = agreement(tools, paths["F32"], f32_model, a.threads)
    vocab = f32_model.config.vocab_size
    del f32_model
    ours = {f: Ours(m, a.batches, vocab) for f, m in models.items()}
    say("  compiling our models (every timed shape)")
    for f, o in ours.items():
        t0 = time.perf_counter()
        o.warm_up()
        say(f"    {f}: {time.perf_counter() - t0:.1f} s")
    hf_models = {f: Transformers(hf, f, a.batches, vocab, a.threads) for f in formats if f in ("f32", "bf16")}
    for o in hf_models.values():
        o.warm_up()
    points = [*a.batches, "prefill"]
    llama = {(g, b): (0.0, None) for g in ggufs for b in points}    # best tok/s and the last record
    failed: dict = {}                                  # (gguf, point) -> why each failed llama.cpp run failed
    others = []                                        # cores busy with other work as each round starts
    for r in range(a.rounds):
        others.append(busy())
        done = set()                                   # each GGUF once per round (mixed shares int4's, int2's)
        for f, fmt in formats.items():
            for b in points:
                for g in fmt["gguf"]:
                    if (g, b) not in done:
                        done.add((g, b))
                        try:
                            tok_s, rec = time_llama(tools, paths[g], b, a.threads)
                        except LlamaCppError as e:       # this cell's round is lost, not the run
                            failed.setdefault((g, b), []).append(str(e)[-3000:])
                            say(f"  round {r + 1}/{a.rounds} {name} {f:5s} {b!s:>7}: llama.cpp {g:4s} FAILED: "
                                f"{str(e).splitlines()[0][-200:]}")
                            continue
                        llama[g, b] = (max(llama[g, b][0], tok_s), rec)
                        say(f"  round {r + 1}/{a.rounds} {name} {f:5s} {b!s:>7}: llama.cpp {g:4s} {tok_s:8.0f} tok/s")
                mine = ours[f].time_prefill() if b == "prefill" else ours[f].time_decode(b)
                say(f"  round {r + 1}/{a.rounds} {name} {f:5s} {b!s:>7}: dynaexq-jax    {mine:8.0f} tok/s")
                if f in hf_models:
                    hf_tok_s = hf_models[f].time_prefill() if b == "prefill" else hf_models[f].time_decode(b)
                    say(f"  round {r + 1}/{a.rounds} {name} {f:5s} {b!s:>7}: transformers   {hf_tok_s:8.0f} tok/s")
    rows = []
    for f, fmt in formats.items():
        for b in points:
            best_g = max(fmt["gguf"], key=lambda g, b=b: llama[g, b][0])
            theirs = llama[best_g, b][0] or None        # None: every round of every candidate failed
            mine = PREFILL / ours[f].best_prefill if b == "prefill" else ours[f].decode_tok_s(b)
            hf_tok_s = None
            if f in hf_models:
                hf_tok_s = PREFILL / hf_models[f].best_prefill if b == "prefill" else hf_models[f].decode_tok_s(b)
            project = dict(hi=fmt["hi"], lo=fmt["lo"], dense=fmt["dense"])
            rows.append(dict(format=f, batch=b, gguf=best_g, project=project,
                             llama_tok_s=theirs, ours_tok_s=mine, ratio=mine / theirs if theirs else None,
                             transformers_tok_s=hf_tok_s,
                             llama_candidates={g: llama[g, b][0] or None for g in fmt["gguf"]},
                             llama_failures={g: failed[g, b] for g in fmt["gguf"] if (g, b) in failed},
                             ours_best_s=(dict(prefill=ours[f].best_prefill) if b == "prefill" else
                                          {f"new_{n}": t for n, t in ours[f].best[b].items()}),
                             llama_last_record=llama[best_g, b][1]))
    return dict(desc, hf_dir=str(hf), transformers=next(iter(hf_models.values())).version if hf_models else None,
                ggufs={g: dict(bytes=paths[g].stat().st_size,
                                                     tensor_types=gguf_tensor_types(tools, paths[g]))
                                              for g in sorted(ggufs)},
                conversions={"/".join(k): str(v.name) for k, v in conversions.items()}, agreement=agree,
                rounds=a.rounds,
                other_work_cores_by_round=others, rows=rows)


# ---- output ----------------------------------------------------------------------------------------
def label(row: dict) -> str:
    """'Q4_0 <-> int4:g32, dense f32'; a format compared with the better of several GGUFs names them all."""
    p = row["project"]
    ours = p["hi"] if p["lo"] is None else f"{p['hi']} HI / {p['lo']} LO"
    theirs = row["gguf"] if len(row["llama_candidates"]) == 1 else f"better of {' / '.join(row['llama_candidates'])}"
    return f"{theirs} <-> {ours}, dense {p['dense']}"


def print_tables(results: dict, machine: str) -> None:
    """A plain table per model, then one markdown table for the README."""
    for name, m in results.items():
        print(f"\n{name}: tok/s ({'agreement ok' if m['agreement']['ok'] else 'AGREEMENT FAILED'})")
        print(f"{'format':<60} {'batch':>7} {'llama.cpp':>16} {'ours':>8} {'ours/llama':>10} {'transformers':>12}")
        for r in m["rows"]:
            hf = f"{r['transformers_tok_s']:12.0f}" if r["transformers_tok_s"] else f"{'':>12}"
            theirs, ratio = ((f"{r['llama_tok_s']:9.0f} ({r['gguf']:>4})", f"{r['ratio']:9.2f}x") if r["ratio"]
                             else (f"{'FAILED':>16}", f"{'':>10}"))
            print(f"{label(r):<60} {r['batch']!s:>7} {theirs} {r['ours_tok_s']:8.0f} {ratio} {hf}")
            for g, why in r["llama_failures"].items():
                print(f"    llama.cpp {g} failed in {len(why)} of {m['rounds']} rounds; the last: "
                      f"{why[-1].splitlines()[0][-300:]}")
    points = list(dict.fromkeys(r["batch"] for m in results.values() for r in m["rows"]))
    head = [f"batch {p}" if p != "prefill" else f"prefill {PREFILL}" for p in points]
    print(f"\nREADME ({machine}; decode tok/s after a {PROMPT}-token context, prefill tok/s of a {PREFILL}-token "
          "prompt at batch 1; dynaexq-jax / llama.cpp (ratio), then transformers in the float formats):\n")
    print("| model | format (GGUF <-> project) | " + " | ".join(head) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in head) + " |")
    for name, m in results.items():
        by_format: dict = {}
        for r in m["rows"]:
            by_format.setdefault(r["format"], {})[r["batch"]] = r
        for i, cells in enumerate(by_format.values()):
            first = next(iter(cells.values()))
            vals = [(f"{c['ours_tok_s']:.0f} / {c['llama_tok_s']:.0f} (**{c['ratio']:.2f}x**)" if c["ratio"]
                     else f"{c['ours_tok_s']:.0f} / llama.cpp failed")
                    + (f"; {c['transformers_tok_s']:.0f}" if c["transformers_tok_s"] else "") if (c := cells.get(p))
                    else "" for p in points]
            print(f"| {name if i == 0 else ''} | {label(first)} | " + " | ".join(vals) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="threads of both engines (cores this process keeps)")
    ap.add_argument("--quant-dense", default="f32", choices=("f32", "bf16"),
                    help="dense dtype beside quantized experts, on both sides (the GGUF quantized from)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vs_llamacpp.json"))
    a = ap.parse_args()
    a.models, a.formats = a.models.split(","), a.formats.split(",")
    a.batches = [int(b) for b in a.batches.split(",")]
    bad = [m for m in a.models if m not in MODELS] + [f for f in a.formats if f not in FORMATS]
    if bad:
        raise SystemExit(f"unknown model or format: {', '.join(bad)}")
    all_cores, cores = limit_threads(a.threads)
    say(f"threads: {a.threads} (this process and llama.cpp's pinned to cores {cores}; llama.cpp -t {a.threads})")
    busy()

    from dynaexq_jax.model.moe import cpu_kernel  # imports jax: after limit_threads
    t0 = time.time()
    try:
        tools = ensure_tools(cpu_kernel.cache_dir() / "llamacpp", cores=all_cores)      # the build uses them all
    except ToolsMissingError as e:
        raise SystemExit(f"vs_llamacpp: {e}") from None
    say(f"llama.cpp {tools.commit()} (llama-cpp-python {SDIST_VERSION} sdist); our CPU kernel: "
        f"{'available' if cpu_kernel.available() else 'NOT available (plain XLA)'}")
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="vs_llamacpp-") as tmp:     # GGUFs and conversions
            for name in a.models:
                results[name] = bench_model(name, a, tools, Path(tmp))
    except LlamaCppError as e:
        raise SystemExit(f"vs_llamacpp: {e}") from None
    cpu = cpu_info()
    print_tables(results, f"{cpu.get('model_name') or 'CPU'}, {a.threads} threads")

    import dynaexq_jax
    write_result(a.out, benchmark="vs_llamacpp", dynaexq_jax=dynaexq_jax.__version__, numpy=np.__version__,
                 llama_cpp=dict(sdist=f"llama-cpp-python=={SDIST_VERSION}", commit=tools.commit(),
                                build=tools.build_flags(), llama_bench_reps=LLAMA_REPS),
                 cpu=cpu, threads=a.threads, cores=cores,
                 thread_limit="os.sched_setaffinity before importing jax (XLA's pool follows it); llama.cpp -t",
                 our_cpu_kernel=cpu_kernel.available(), rounds=a.rounds, prompt=PROMPT, new_tokens=NEW,
                 prefill_tokens=PREFILL, quant_dense=a.quant_dense,
                 two_tier="mixed: even experts HI, odd experts LO in every layer (fixed)",
                 wall_s=time.time() - t0, models=results)


if __name__ == "__main__":
    main()

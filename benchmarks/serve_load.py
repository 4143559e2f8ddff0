"""Load on `dynaexq serve` (localhost only): a bounded number of streamed completions from
concurrent clients against the server under a budget, then the same prompts as static batches
through Engine.generate at the same budget and batch, one after the other in one run. Reports
requests/s, output tokens/s, time to first token and latency percentiles, the runtime's HI hit
rate and swaps, and peak RSS; writes benchmarks/results/serve_load.json. The two sides alternate,
round by round (the other idle), and each reports its best round.

Prompts: the corpus validation split (prose and code alternating), each a slice of a document of
a length drawn from --prompt-tokens; greedy, ending at eos or --max-tokens. The server runs as its
own process (`dynaexq serve`), the clients here (threads with the openai client)."""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from common import write_result  # benchmarks/common.py

from dynaexq_jax.experiments import corpus, default_model
from dynaexq_jax.serving.tokenizer import TextCodec


def workload(codec: TextCodec, n: int, lengths: tuple[int, int], new: tuple[int, int], seed: int):
    """n (prompt token ids, max_tokens) pairs: prompts of lengths drawn from `lengths`, limits from `new`."""
    docs = corpus.documents()
    pools = [[d for d in corpus.select(docs, dom, "validation")] for dom in corpus.DOMAINS]
    rng = np.random.default_rng(seed)
    prompts = []
    while len(prompts) < n:
        doc = pools[len(prompts) % 2][rng.integers(len(pools[len(prompts) % 2]))]
        ids = codec.encode(doc.text)
        want = int(rng.integers(lengths[0], lengths[1] + 1))
        if len(ids) > want:
            start = int(rng.integers(0, len(ids) - want))
            prompts.append(ids[start:start + want])
    return list(zip(prompts, rng.integers(new[0], new[1] + 1, n).tolist()))


def percentiles(xs) -> dict:
    return {f"p{q}": float(np.percentile(xs, q)) for q in (50, 90, 99)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics(url: str) -> dict:
    text = httpx.get(url + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}


@contextlib.contextmanager
def server_process(a, ckpt: Path, queue: int):
    """`dynaexq serve` in its own process: yields (url, process, start-up seconds)."""
    port = free_port()
    cmd = [sys.executable, "-m", "dynaexq_jax.cli", "serve", str(ckpt), "--port", str(port), "--budget", a.budget,
           "--policy", a.policy, "--max-batch", str(a.max_batch), "--max-len", str(a.max_len), "--segment",
           str(a.segment), "--max-queue", str(queue), "--served-model-name", "bench"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"dynaexq serve exited:\n{proc.stdout.read()}")
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        startup = time.perf_counter() - t0
        print(f"server up in {startup:.1f}s: {' '.join(cmd[2:])}", flush=True)
        yield url, proc, startup
    finally:
        proc.terminate()
        proc.wait(30)


def server_pass(a, url: str, proc, requests) -> dict:
    """Every request from a.concurrency streaming clients; their own latencies from submission."""
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def one(request):
        prompt, max_tokens = request
        t = time.perf_counter()
        first, usage, text = None, None, []
        for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens,
                                               temperature=0, stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].text and first is None:
                first = time.perf_counter() - t
            if chunk.usage:
                usage = chunk.usage
            text += [c.text for c in chunk.choices]
        return dict(ttft_s=first if first is not None else time.perf_counter() - t,
                    latency_s=time.perf_counter() - t, tokens=usage.completion_tokens, text="".join(text))

    before = metrics(url)
    t0, cpu0, server_cpu0 = time.perf_counter(), os.times(), cpu_seconds(proc.pid)
    with concurrent.futures.ThreadPoolExecutor(a.concurrency) as pool:
        done = list(pool.map(one, requests))
    wall = time.perf_counter() - t0
    m = metrics(url)
    tokens = sum(r["tokens"] for r in done)
    return dict(mode="server", requests=len(done), concurrency=a.concurrency, wall_s=wall,
                requests_per_s=len(done) / wall, output_tokens=tokens, output_tokens_per_s=tokens / wall,
                ttft_s=percentiles([r["ttft_s"] for r in done]), latency_s=percentiles([r["latency_s"] for r in done]),
                hi_hit_rate=m["dynaexq_hi_hit_rate"],
                promotions=int(m["dynaexq_promotions_total"] - before["dynaexq_promotions_total"]),
                batch_occupancy=m["dynaexq_batch_occupancy"], device_stalls=int(m["dynaexq_device_stalls_total"]),
                max_owned_bytes=int(m["dynaexq_device_owned_bytes_max"]), budget_bytes=int(m["dynaexq_budget_bytes"]),
                server_cpu_s=cpu_seconds(proc.pid) - server_cpu0, client_cpu_s=sum(os.times()[:2]) - sum(cpu0[:2]),
                texts=[r["text"] for r in done])


def static_engine(a, ckpt: Path):
    from dynaexq_jax.runtime.config import EngineConfig
    from dynaexq_jax.runtime.engine import Engine
    settings = EngineConfig(policy=a.policy, batch=a.max_batch, max_len=a.max_len, segment_len=a.segment)
    return Engine(ckpt, budget_bytes=a.budget, settings=settings)


def static_pass(engine, a, requests) -> dict:
    """The same requests in arrival order, max_batch at a time through Engine.generate (a batch
    runs to its longest limit, or until every row met eos), every request counted from t = 0."""
    t0, latencies, tokens, hits, promotions, texts = time.perf_counter(), [], 0, [], 0, []
    eos = engine.config.eos_token_ids
    for i in range(0, len(requests), a.max_batch):
        batch = requests[i:i + a.max_batch]
        # One limit for the batch: the longest; each row is cut to its own afterwards.
        res = engine.generate([p for p, _ in batch], max_new_tokens=max(n for _, n in batch))
        latencies += [time.perf_counter() - t0] * len(batch)
        rows = [row[:n] for row, (_, n) in zip(res.tokens, batch)]
        tokens += sum(map(len, rows))
        hits.append(res.runtime["hi_hit_rate"])
        promotions += res.runtime["counters"]["promotions"]
        texts += [engine.codec.decode([t for t in row if t not in eos]) for row in rows]
    wall = time.perf_counter() - t0
    return dict(mode="static batches", requests=len(requests), wall_s=wall, requests_per_s=len(requests) / wall,
                output_tokens=tokens, output_tokens_per_s=tokens / wall, latency_s=percentiles(latencies),
                hi_hit_rate=float(np.nanmean(hits)), promotions=promotions, texts=texts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a converted checkpoint or HF directory (default: the embedded model)")
    ap.add_argument("--budget", default="20%")
    ap.add_argument("--policy", default="dynaexq")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-tokens", default="16,128", help="min,max new tokens per request (each draws its own)")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--segment", type=int, default=16)
    ap.add_argument("--prompt-tokens", default="32,192", help="min,max prompt length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="load passes of each side, alternating")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    a = ap.parse_args()
    if a.requests > 1000:
        raise SystemExit("--requests is bounded at 1000 (a benchmark, not a load generator)")
    ckpt = default_model.cached_conversion(a.model, None, None, SystemExit)
    lengths = tuple(int(x) for x in a.prompt_tokens.split(","))
    new = tuple(int(x) for x in a.max_tokens.split(","))
    new = new * (3 - len(new))
    requests = workload(TextCodec(ckpt), a.requests, lengths, new[:2], a.seed)
    with server_process(a, ckpt, len(requests)) as (url, proc, startup):
        engine = static_engine(a, ckpt)
        static_pass(engine, a, requests)      # compiles every batch's prompt shapes (the server did at start-up)
        rounds = []
        for r in range(a.rounds):             # alternating, the other side idle: side by side on a noisy machine
            rounds.append((server_pass(a, url, proc, requests), static_pass(engine, a, requests)))
            print(f"round {r + 1}: server {rounds[-1][0]['output_tokens_per_s']:.0f} tok/s, static batches "
                  f"{rounds[-1][1]['output_tokens_per_s']:.0f} tok/s", flush=True)
        rss = peak_rss_mib(proc.pid)
    server = min((sv for sv, _ in rounds), key=lambda x: x["wall_s"])
    static = min((st for _, st in rounds), key=lambda x: x["wall_s"])
    server.update(startup_s=startup, peak_rss_mib=rss)
    ratios = [sv["output_tokens_per_s"] / st["output_tokens_per_s"] for sv, st in rounds]
    same = sum(x == y for x, y in zip(server.pop("texts"), static.pop("texts")))
    print(f"\n{a.requests} requests, prompts {lengths[0]}-{lengths[1]} tokens, {new[0]}-{new[1]} new tokens (greedy), "
          f"budget {a.budget}, policy {a.policy}, {a.max_batch} slots; server: {a.concurrency} concurrent clients")
    print("| mode | wall s | requests/s | output tok/s | TTFT p50 / p90 / p99 s | latency p50 / p90 / p99 s "
          "| HI hit rate | promotions |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in (server, static):
        ttft = " / ".join(f"{v:.2f}" for v in r["ttft_s"].values()) if "ttft_s" in r else "-"
        lat = " / ".join(f"{v:.2f}" for v in r["latency_s"].values())
        print(f"| {r['mode']} | {r['wall_s']:.1f} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.0f} | "
              f"{ttft} | {lat} | {r['hi_hit_rate']:.3f} | {r['promotions']} |")
    print(f"best of {a.rounds} rounds each; server / static output tok/s per round: "
          f"{', '.join(f'{x:.2f}x' for x in ratios)}; "
          f"batch occupancy {server['batch_occupancy']:.2f}; same text as static for {same}/{a.requests} requests; "
          f"server peak RSS {server['peak_rss_mib']:.0f} MiB, startup {server['startup_s']:.1f}s; CPU seconds "
          f"while loaded: server {server['server_cpu_s']:.1f}, clients {server['client_cpu_s']:.1f}; "
          f"max owned {server['max_owned_bytes'] / 2**20:.1f} of {server['budget_bytes'] / 2**20:.1f} MiB")
    write_result(a.out, settings=vars(a), server=server, static=static, same_text=same, ratios_per_round=ratios,
                 rounds=[dict(server={k: v for k, v in sv.items() if k != "texts"},
                              static={k: v for k, v in st.items() if k != "texts"}) for sv, st in rounds],
                 bench_peak_rss_mib=peak_rss_mib(os.getpid()))


if __name__ == "__main__":
    main()

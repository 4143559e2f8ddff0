"""Real scale on this machine: Qwen3-30B-A3B and Qwen3-Next-80B-A3B shapes (full width, every
expert, vocab 151936, bf16, per-expert tensors) at reduced depth, end to end, extrapolated to 48 layers.

For each model and depth: write a random Hugging Face checkpoint (sharded safetensors + index,
shard by shard, never the whole model in memory), convert it into two tier pairs (bf16/int4 and
int4/int2), plan budgets (at the measured depth and for the real 48 layers, from the config
alone), and serve batch 1 and 8 under the budget that leaves --fraction of every layer's experts
HI (runtime.budget.budget_for_fraction): start-up, prefill and decode tokens/s, then a workload
that shifts between two domains, teacher-forced through the live runtime (Engine.score).

Random weights route nearly uniformly over a wide vocabulary, so the two domains are two small
disjoint sets of token ids (--domain-tokens each): a domain then has its own hot experts in every
layer, and switching domains moves the router. Hit rates (the share of routed mass served by HI
experts) are reported per layer group as they come, beside two references computed from the same
run's router trace: what the same policy reaches with unlimited, instant transfers
(runtime.replay, per layer) and what the best fixed HI set of the phase would serve (oracle).

Every phase runs in a child process. This parent imports nothing heavy, so a child's peak RSS is
its own (wait4's ru_maxrss, cross-checked with the child's VmHWM; Linux carries a parent's
high-water mark across fork+exec). A watchdog stops a child whose RSS passes --max-rss-gb (the
machine is shared); a stopped or failed phase is reported as such and the run goes on.

  python benchmarks/scale.py                                      # the default run (see --help)
  python benchmarks/scale.py --models qwen3-30b-a3b --layers 2 --pairs int4/int2 --batches 1
  python benchmarks/scale.py --set hidden_size=64 --set num_experts=8 ...        # toy shapes

Writes benchmarks/results/scale.json; generated checkpoints live under --workdir and are
deleted as soon as they are no longer needed (--keep retains them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import write_result  # benchmarks/common.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GB = 1e9
GIB = 2**30
FULL_DEPTH = 48

# The released configs (benchmarks/configs: Qwen/Qwen3-30B-A3B, Qwen/Qwen3-Next-80B-A3B-Instruct), depth set per run.
MODELS = {name: json.loads((ROOT / "benchmarks" / "configs" / f"{file}.json").read_text())
          for name, file in (("qwen3-30b-a3b", "Qwen3-30B-A3B"), ("qwen3-next-80b-a3b", "Qwen3-Next-80B-A3B-Instruct"))}
assert all(m["num_hidden_layers"] == FULL_DEPTH for m in MODELS.values())
# Budgets shown for the full 48-layer models: the GPUs this project is for, at two serving shapes.
PLAN_BUDGETS_GIB = (24, 32, 48, 80)
PLAN_SHAPES = ((1, 4096), (8, 2048))      # (batch, max_len)


# ---- the parent: children, their peak RSS, the run ---------------------------------------------------
def run_child(phase: str, spec: dict, *, max_rss: float, log) -> dict:
    """Run `python scale.py --child phase` on spec; -> its result dict plus peak_rss (wait4's
    ru_maxrss, bytes) and seconds, or {"error": ...} when it failed or was stopped."""
    result_file = Path(spec["workdir"]) / f".{phase}-{os.getpid()}-{time.monotonic_ns()}.json"
    spec = {**spec, "result": str(result_file)}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", phase, json.dumps(spec)],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    stopped = threading.Event()

    def watch():      # the shared machine must not run out of memory: stop the child first
        while p.poll() is None:
            try:
                status = Path(f"/proc/{p.pid}/status").read_text()
            except OSError:
                return
            rss = next((int(x.split()[1]) * 1024 for x in status.splitlines() if x.startswith("VmRSS")), 0)
            if rss > max_rss:
                stopped.set()
                os.kill(p.pid, signal.SIGKILL)
                return
            time.sleep(0.2)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    out = dict(seconds=time.perf_counter() - t0, peak_rss=usage.ru_maxrss * 1024)
    if stopped.is_set():
        out["error"] = f"stopped: RSS passed --max-rss-gb ({max_rss / GB:.1f} GB)"
    elif p.returncode:
        out["error"] = f"exit code {p.returncode}"
    else:
        out.update(json.loads(result_file.read_text()))
    result_file.unlink(missing_ok=True)
    if "error" in out:
        log(f"  {phase} FAILED: {out['error']}")
    return out


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def model_config(name: str, layers: int, overrides: dict) -> dict:
    cfg = {**MODELS[name], **{k: v for k, v in overrides.items() if k in MODELS[name]}}
    cfg["num_hidden_layers"] = layers
    return cfg


def run_model(name: str, a, overrides: dict, log) -> dict:
    """Every phase of one model at every depth -> {plans, depths: [...]}."""
    depths = a.layers if name == "qwen3-30b-a3b" else a.next_layers
    max_rss = a.max_rss_gb * GB
    pairs = [p.split("/") for p in a.pairs]
    plan = run_child("plan", dict(workdir=str(a.workdir), cfg=model_config(name, FULL_DEPTH, overrides),
                                  depth_cfgs=[model_config(name, n, overrides) for n in depths], pairs=pairs,
                                  fraction=a.fraction, max_len=a.max_len, batches=a.batches,
                                  budgets=[b * GIB for b in a.plan_budgets], shapes=PLAN_SHAPES),
                     max_rss=max_rss, log=log)
    out = dict(config=model_config(name, FULL_DEPTH, overrides), plan=plan, depths=[])
    for n in depths:
        cfg = model_config(name, n, overrides)
        root = a.workdir / f"{name}-{n}L"
        remove(root)
        root.mkdir(parents=True)
        log(f"[{name}, {n} layers] writing a random checkpoint to {root / 'hf'}")
        row = dict(layers=n, write=run_child("write", dict(workdir=str(a.workdir), cfg=cfg, out=str(root / "hf"),
                                                           shard_bytes=int(a.shard_gb * GB)),
                                             max_rss=max_rss, log=log),
                   convert={}, serve={})
        for hi, lo in pairs:
            key = f"{hi}/{lo}"
            log(f"[{name}, {n} layers] converting, HI {hi} / LO {lo}")
            row["convert"][key] = run_child("convert", dict(workdir=str(a.workdir), hf=str(root / "hf"),
                                                            out=str(root / key.replace('/', '-')), hi=hi, lo=lo),
                                            max_rss=max_rss, log=log)
        if not a.keep:
            remove(root / "hf")
        for key, conv in row["convert"].items():
            for b in a.batches:
                if "error" in conv:
                    row["serve"][f"{key} b{b}"] = dict(error="not converted")
                    continue
                log(f"[{name}, {n} layers] serving {key}, batch {b}, r = {a.fraction:.0%}")
                row["serve"][f"{key} b{b}"] = run_child("serve", dict(
                    workdir=str(a.workdir), model=conv["out"], batch=b, fraction=a.fraction, max_len=a.max_len,
                    prompt_len=a.prompt_len, new_tokens=a.new_tokens, phase_positions=a.phase_positions,
                    domain_tokens=a.domain_tokens, period=a.period, segment=a.segment, backend=a.backend,
                    shift=b == a.batches[0]),
                    max_rss=max_rss, log=log)
            if not a.keep:
                remove(Path(conv.get("out", "")))
        if not a.keep:
            remove(root)
        out["depths"].append(row)
    out["extrapolation"] = extrapolate(out, pairs, a.batches)
    return out


# ---- extrapolation to 48 layers (pure Python, in the parent) ------------------------------------------
def line_at(points: list[tuple[int, float]], x: int) -> float | None:
    """The straight line through (depth, value) points (least squares) evaluated at x; None for
    fewer than two depths."""
    pts = [(d, v) for d, v in points if v is not None]
    if len({d for d, _ in pts}) < 2:
        return None
    n = len(pts)
    mx, my = sum(d for d, _ in pts) / n, sum(v for _, v in pts) / n
    slope = sum((d - mx) * (v - my) for d, v in pts) / sum((d - mx) ** 2 for d, _ in pts)
    return my + slope * (x - mx)


def positive(v: float | None) -> float | None:
    """A time from a line fit, None where the fit is not positive (noise between the depths' runs
    larger than the depth's effect: the machine's load changed)."""
    return v if v is not None and v > 0 else None


def extrapolate(model: dict, pairs, batches) -> dict:
    """What a 48-layer run would show, from the measured depths. Scales with the number of layers
    (a straight line through the depths): bytes, conversion time at the measured rate, serving
    RSS, start-up time, time per generated token. Does not (per layer, reported as measured):
    hit rates, HI slots per layer at a budget share, conversion MB/s and its peak RSS (streaming:
    one layer at a time). The 48-layer budget plans are exact (from the config, see plan)."""
    rows = model["depths"]
    ex = {"note": "straight line through the measured depths (least squares); None: fewer than two depths, "
                  "or a time whose fit is not positive"}
    for hi, lo in pairs:
        key = f"{hi}/{lo}"
        conv = [(r["layers"], r["convert"].get(key, {})) for r in rows]
        ok = [(d, c) for d, c in conv if "error" not in c and "seconds_convert" in c]
        rate = ok[-1][1]["mb_per_s"] if ok else None
        src48 = model["plan"].get("source_bytes_full")
        ex[key] = dict(
            convert_mb_per_s=rate,
            convert_seconds=src48 / 1e6 / rate if rate and src48 else None,
            convert_peak_rss=line_at([(d, c["peak_rss"]) for d, c in ok], FULL_DEPTH),
            output_bytes=line_at([(d, c["output_bytes"]) for d, c in ok], FULL_DEPTH))
        for b in batches:
            sv = [(r["layers"], r["serve"].get(f"{key} b{b}", {})) for r in rows]
            sv = [(d, s) for d, s in sv if "error" not in s and "decode_tok_s" in s]
            per_token = line_at([(d, 1 / s["decode_tok_s"]) for d, s in sv], FULL_DEPTH)
            per_prompt_token = line_at([(d, 1 / s["prefill_tok_s"]) for d, s in sv], FULL_DEPTH)
            ex[key][f"b{b}"] = dict(
                serve_peak_rss=line_at([(d, s["peak_rss"]) for d, s in sv], FULL_DEPTH),
                # What the CPU's RSS holds beyond what a GPU would hold in device memory.
                rss_beyond_resident=line_at([(d, s["peak_rss"] - s["resident_bytes"]) for d, s in sv
                                             if "resident_bytes" in s], FULL_DEPTH),
                startup_s=positive(line_at([(d, s["open_s"] + s["engine_s"]) for d, s in sv], FULL_DEPTH)),
                decode_tok_s=1 / per_token if per_token and per_token > 0 else None,
                prefill_tok_s=1 / per_prompt_token if per_prompt_token and per_prompt_token > 0 else None,
                swaps_per_layer=[(d, s["shift"]["counters"]["promotions"] / d) for d, s in sv if s["shift"]])
    return ex


# ---- tables --------------------------------------------------------------------------------------------
def fmt(v, spec=".1f", scale=1.0):
    return "-" if v is None else format(v / scale, spec)


def groups(n_layers: int) -> list[range]:
    """Up to four contiguous layer groups."""
    size = max(1, math.ceil(n_layers / 4))
    return [range(s, min(s + size, n_layers)) for s in range(0, n_layers, size)]


def group_means(per_layer: list[float] | None, n_layers: int) -> str:
    if not per_layer:
        return "-"
    return " ".join(f"{sum(per_layer[l] for l in g) / len(g):.2f}" for g in groups(n_layers))


def print_tables(name: str, m: dict, a) -> None:
    cfg = m["config"]
    print(f"\n== {name}: hidden {cfg['hidden_size']}, {cfg['num_experts']} experts top-{cfg['num_experts_per_tok']}"
          f" of {cfg['moe_intermediate_size']}, vocab {cfg['vocab_size']}; measured at "
          f"{', '.join(str(r['layers']) for r in m['depths'])} layers of {FULL_DEPTH} ==")
    print(f"{'layers':>6} {'source GB':>9} {'write s':>7} {'write RSS GB':>12} | {'pair':>10} {'convert s':>9} "
          f"{'MB/s':>6} {'peak RSS GB':>11} {'out GB':>7}")
    for r in m["depths"]:
        w = r["write"]
        for key, c in r["convert"].items():
            print(f"{r['layers']:>6} {fmt(w.get('bytes'), '.2f', GB):>9} {fmt(w.get('seconds_write'), '.0f'):>7} "
                  f"{fmt(w.get('peak_rss'), '.2f', GB):>12} | {key:>10} {fmt(c.get('seconds_convert'), '.0f'):>9} "
                  f"{fmt(c.get('mb_per_s'), '.0f'):>6} {fmt(c.get('peak_rss'), '.2f', GB):>11} "
                  f"{fmt(c.get('output_bytes'), '.2f', GB):>7}" + (f"  {c['error']}" if "error" in c else ""))
    plan = m["plan"]
    if "error" in plan:
        print(f"budget plans FAILED: {plan['error']}")
    else:
        print(f"\nbudget plans for {FULL_DEPTH} layers (from the config; backend xla): HI slots per MoE layer "
              f"(of {cfg['num_experts']}), workspace")
        print(f"{'pair':>10} {'batch x len':>11} " + " ".join(f"{f'{b} GiB':>16}" for b in a.plan_budgets)
              + f" {'smallest':>10} {f'r={a.fraction:.0%}':>10}")
        for p in plan["full"]:
            cells = []
            for c in p["budgets"]:
                cells.append(f"{c['n_hi_min']:>3}-{c['n_hi_max']:<3} ws {c['workspace'] / GIB:5.2f}" if c["feasible"]
                             else "infeasible")
            print(f"{p['pair']:>10} {p['batch']:>4} x {p['max_len']:<5} " + " ".join(f"{c:>16}" for c in cells)
                  + f" {p['smallest_budget'] / GIB:>6.2f} GiB {p['fraction_budget'] / GIB:>6.2f} GiB")
    print(f"\nserving under the budget for r = {a.fraction:.0%} (prompt {a.prompt_len}, {a.new_tokens} new tokens; "
          f"shift workload at batch {a.batches[0]}: one stream of {a.phase_positions} + {a.phase_positions} "
          "positions; swaps published/planned in it; hit rates per layer group)")
    print(f"{'layers':>6} {'pair':>10} {'b':>2} {'budget GiB':>10} {'HI/layer':>8} {'open s':>6} {'engine s':>8} "
          f"{'compile s':>9} {'RSS GB':>6} {'prefill t/s':>11} {'decode t/s':>10} {'swaps':>9} "
          f"{'hit before':>14} {'hit after':>14} {'unlimited':>14} {'oracle':>14}")
    for r in m["depths"]:
        for key, s in r["serve"].items():
            if "error" in s:
                print(f"{r['layers']:>6} {key:>13} {s['error']}")
                continue
            n, sh = len(s["n_hi"]), s["shift"] or {}
            swaps = f"{sh['counters']['promotions']}/{sh['counters']['swaps_planned']}" if sh else "-"
            print(f"{r['layers']:>6} {key.split()[0]:>10} {s['batch']:>2} {s['budget'] / GIB:>10.2f} "
                  f"{s['n_hi'][0]:>8} {s['open_s']:>6.1f} {s['engine_s']:>8.1f} {s['compile_s']:>9.1f} "
                  f"{s['peak_rss'] / GB:>6.2f} {s['prefill_tok_s']:>11.1f} {s['decode_tok_s']:>10.2f} {swaps:>9} "
                  + " ".join(f"{group_means(sh.get(k), n):>14}"
                             for k in ("hit_before", "hit_after", "replay_after", "oracle_after")))
    ex = m["extrapolation"]
    print(f"\nextrapolated to {FULL_DEPTH} layers ({ex['note']})")
    for key in (k for k in ex if k != "note"):
        e = ex[key]
        print(f"  {key}: conversion {fmt(e['convert_mb_per_s'], '.0f')} MB/s -> "
              f"{fmt(e['convert_seconds'], '.0f', 60)} min, peak RSS {fmt(e['convert_peak_rss'], '.2f', GB)} GB, "
              f"output {fmt(e['output_bytes'], '.1f', GB)} GB")
        for b in a.batches:
            s = e[f"b{b}"]
            print(f"    batch {b}: serving peak RSS {fmt(s['serve_peak_rss'], '.1f', GB)} GB "
                  f"({fmt(s['rss_beyond_resident'], '.1f', GB)} GB beyond dense + pools + KV), start-up "
                  f"{fmt(s['startup_s'], '.0f')} s, prefill {fmt(s['prefill_tok_s'], '.1f')} tok/s, decode "
                  f"{fmt(s['decode_tok_s'], '.2f')} tok/s; swaps per layer at each depth "
                  + ", ".join(f"{d}L: {v:.1f}" for d, v in s["swaps_per_layer"]))


# ---- the children ----------------------------------------------------------------------------------------
def vm_hwm() -> int:
    """This process's peak RSS so far, bytes (Linux)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(x.split()[1] for x in status if x.startswith("VmHWM"))) * 1024


def dir_bytes(d: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in Path(d).rglob(pattern) if f.is_file())


def hf_bytes(cfg: dict) -> tuple[int, int]:
    """(bytes of every HF tensor, bytes of the routed experts) of config dict cfg in its torch_dtype,
    from the family's schema (nothing is allocated)."""
    import numpy as np

    from dynaexq_jax.model.config import parse_hf_config
    from dynaexq_jax.model.families import family, schema
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.get("torch_dtype") or "float32"]
    total = experts = 0
    for _, _, spec in schema.leaves(family(cfg["model_type"]).abstract(parse_hf_config(cfg))):
        if isinstance(spec, schema.Experts):
            n = sum(int(np.prod(s)) for s in spec.hf_shapes(spec.saved_layout).values())
            experts += n * itemsize
        else:
            n = int(np.prod(spec.hf_shape))
        total += n * itemsize
    return total, experts


def child_write(spec: dict) -> dict:
    """A random HF checkpoint, tensor by tensor into shards (experiments.synthetic)."""
    import ml_dtypes
    import numpy as np
    from tqdm import tqdm

    from dynaexq_jax.experiments.synthetic import random_state_dict, save_safetensors
    cfg, out = spec["cfg"], Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[cfg["torch_dtype"]]
    total, _ = hf_bytes(cfg)
    t0 = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="write", file=sys.stderr, mininterval=5) as bar:
        def counted():
            for name, arr in random_state_dict(cfg, seed=0, dtype=dtype):
                bar.update(arr.nbytes)
                yield name, arr
        save_safetensors(counted(), out, spec["shard_bytes"])
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return dict(seconds_write=time.perf_counter() - t0, bytes=dir_bytes(out, "*.safetensors"),
                shards=len(list(out.glob("*.safetensors"))), vm_hwm=vm_hwm())


def child_convert(spec: dict) -> dict:
    from checkpoints_convert import convert
    t0 = time.perf_counter()
    out = convert(spec["hf"], spec["out"], hi=spec["hi"], lo=spec["lo"], progress=True)
    seconds = time.perf_counter() - t0
    source = dir_bytes(Path(spec["hf"]), "*.safetensors")
    return dict(out=str(out), seconds_convert=seconds, source_bytes=source, mb_per_s=source / 1e6 / seconds,
                output_bytes=dir_bytes(out), vm_hwm=vm_hwm())


def dense_param_bytes(cfg) -> int:
    """Bytes of the dense parameters (everything but the routed experts) of a ModelConfig stored
    in bf16 -- what a converted checkpoint's params hold with the default --dtype source."""
    import numpy as np

    from dynaexq_jax.model.families import family, schema
    return sum(2 * int(np.prod(spec.shape)) for _, _, spec in schema.leaves(family(cfg.model_type).abstract(cfg))
               if not isinstance(spec, schema.Experts))


def child_plan(spec: dict) -> dict:
    """Budget plans from the config alone (no weights): for the full depth at fixed budgets and
    serving shapes, and the budget the serving phases use at each measured depth."""
    import ml_dtypes
    import numpy as np

    from dynaexq_jax.errors import InfeasibleBudgetError
    from dynaexq_jax.model.config import parse_hf_config
    from dynaexq_jax.model.quant import parse_format
    from dynaexq_jax.runtime.budget import plan_budget, smallest_budget
    from dynaexq_jax.runtime.config import EngineConfig

    def plan(cfg, hi, lo, batch, max_len, budget, **kw):
        # The engine's own settings for that batch and length (staging, strategy, backend, ...).
        options = EngineConfig(batch=batch, max_len=max_len).plan_options() | kw
        return plan_budget(cfg, budget=budget, hi=parse_format(hi), lo=parse_format(lo),
                           dense_params=dense_param_bytes(cfg), cache_dtype=np.dtype(ml_dtypes.bfloat16), **options)

    def fraction_budget(cfg, hi, lo, batch, max_len):
        return smallest_budget(plan(cfg, hi, lo, batch, max_len, 2**62, max_hi_fraction=spec["fraction"]))

    full = parse_hf_config(spec["cfg"])
    out = dict(source_bytes_full=hf_bytes(spec["cfg"])[0], dense_bytes_full=dense_param_bytes(full), full=[],
               depths=[])
    for hi, lo in spec["pairs"]:
        for batch, max_len in spec["shapes"]:
            cells = []
            for budget in spec["budgets"]:
                try:
                    p = plan(full, hi, lo, batch, max_len, budget)
                    cells.append(dict(budget=budget, feasible=True, n_hi_min=min(p.n_hi), n_hi_max=max(p.n_hi),
                                      workspace=p.fixed.workspace, kv_cache=p.fixed.kv_cache, total=p.total))
                except InfeasibleBudgetError as e:
                    cells.append(dict(budget=budget, feasible=False, error=str(e)))
            floor = plan(full, hi, lo, batch, max_len, 2**62, max_hi_fraction=0.0)
            out["full"].append(dict(pair=f"{hi}/{lo}", batch=batch, max_len=max_len, budgets=cells,
                                    smallest_budget=smallest_budget(floor),
                                    fraction_budget=fraction_budget(full, hi, lo, batch, max_len)))
    for d in spec["depth_cfgs"]:
        cfg = parse_hf_config(d)
        out["depths"].append(dict(layers=cfg.num_layers, source_bytes=hf_bytes(d)[0], fraction_budgets={
            f"{hi}/{lo} b{b}": fraction_budget(cfg, hi, lo, b, spec["max_len"])
            for hi, lo in spec["pairs"] for b in spec["batches"]}))
    return out


def domain_tokens(vocab: int, width: int, domain: int, rng, shape) -> list:
    """Random token ids of one domain: domain 0 draws from [1, 1 + width), domain 1 from
    [vocab / 2, vocab / 2 + width) -- disjoint sets, so the two domains route differently."""
    start = 1 if domain == 0 else vocab // 2
    return rng.integers(start, start + width, shape)


def per_layer_hits(timeline: list[dict], keep) -> list[float]:
    """Share of routed mass served by HI experts per MoE layer, over the boundaries keep(step) selects."""
    import numpy as np
    rows = [t for t in timeline if keep(t["step"]) and t["routed_mass"] > 0]
    mass = np.array([t["mass"] for t in rows])                       # [boundaries, L, E]
    served = np.array([t["served_hi_mask"] for t in rows], bool)
    return ((mass * served).sum((0, 2)) / mass.sum((0, 2))).tolist()


def child_serve(spec: dict) -> dict:
    """Start an Engine under the budget for `fraction` and time a generation; with spec["shift"],
    then score the shift workload (shift_workload)."""
    import numpy as np

    from dynaexq_jax.runtime.budget import budget_for_fraction
    from dynaexq_jax.runtime.config import EngineConfig
    from dynaexq_jax.runtime.engine import Engine
    from dynaexq_jax.serving.checkpoint import load_checkpoint

    def say(msg):
        print(f"  serve: {msg} ({time.perf_counter() - t0:.0f} s, peak RSS {vm_hwm() / GB:.2f} GB)", file=sys.stderr,
              flush=True)
    t0 = time.perf_counter()
    ckpt = load_checkpoint(spec["model"])
    open_s = time.perf_counter() - t0
    say("checkpoint opened")
    cfg, b = ckpt.config, spec["batch"]
    settings = EngineConfig(batch=b, max_len=spec["max_len"], segment_len=spec["segment"],
                            update_period=spec["period"], backend=spec["backend"])
    budget = budget_for_fraction(ckpt, spec["fraction"], settings)
    t1 = time.perf_counter()
    engine = Engine(ckpt, budget_bytes=budget, settings=settings)
    engine_s = time.perf_counter() - t1
    rss_engine = vm_hwm()
    say(f"engine started: {engine.n_hi[0]} of {cfg.num_experts} experts HI per layer")
    rng = np.random.default_rng(0)
    prompts = domain_tokens(cfg.vocab_size, spec["domain_tokens"], 0, rng, (b, spec["prompt_len"])).tolist()

    def gen():
        return engine.generate(prompts, max_new_tokens=spec["new_tokens"], stop_tokens=())
    t2 = time.perf_counter()
    gen()                                        # compiles prefill, decode and publish at these shapes
    compile_s = time.perf_counter() - t2
    say("warm-up generation done")
    res = gen()
    ctl = sum(s["controller_s"] for s in res.stats.segments)
    say(f"generation: {res.stats.decode_tokens_per_s:.2f} tok/s")
    out = dict(
        batch=b, budget=budget, n_hi=engine.n_hi, budget_rows=engine.plan.rows(), open_s=open_s, engine_s=engine_s,
        # What a GPU holds in device memory (here in RAM too): dense params, the pools, the KV cache.
        resident_bytes=engine.plan.fixed.dense_params + engine.pools.nbytes + engine.plan.fixed.kv_cache,
        compile_s=compile_s, rss_after_start=rss_engine, prompt_tokens=res.stats.prompt_tokens,
        prefill_tok_s=res.stats.prompt_tokens / res.stats.time_to_first_token_s,
        decode_tok_s=res.stats.decode_tokens_per_s, decode_controller_share=ctl / res.stats.decode_s,
        generation_counters=res.runtime["counters"], shift=None)
    if spec["shift"]:
        out["shift"] = shift_workload(engine, settings, spec, rng)
        say(f"shift workload scored: {out['shift']['score_tok_s']:.1f} tok/s")
    out["vm_hwm"] = vm_hwm()
    return out


def shift_workload(engine, settings, spec: dict, rng) -> dict:
    """One stream of phase_positions positions of domain 0, then as many of domain 1, scored with
    the policy live; per MoE layer: the hit rates before and after the shift, and after it what
    the same policy reaches with unlimited transfers on the same trace, and the oracle bound."""
    import numpy as np

    from dynaexq_jax.runtime.replay import replay
    cfg, P, width = engine.config, spec["phase_positions"], spec["domain_tokens"]
    stream = np.concatenate([domain_tokens(cfg.vocab_size, width, 0, rng, (1, P)),
                             domain_tokens(cfg.vocab_size, width, 1, rng, (1, P + 1))], axis=1)
    start_mask = engine.hi_mask()
    scored = engine.score(stream)
    timeline = scored.runtime["timeline"]
    trace = np.array([t["mass"] for t in timeline])                   # [chunks, L, E]
    after = np.array([t["step"] for t in timeline]) > P
    # The same policy on the same trace from the same HI sets, every planned swap started at once.
    unlimited = replay(settings.make_policy(), trace, engine.n_hi, chunk=spec["segment"], alpha=settings.alpha,
                       ranking=start_mask.astype(float))
    post = trace[after].sum(0)                                        # [L, E]
    oracle = [float(np.sort(post[l])[::-1][:n].sum() / post[l].sum()) for l, n in enumerate(engine.n_hi)]
    return dict(score_tok_s=scored.tokens_per_s, hi_hit_rate=scored.runtime["hi_hit_rate"],
                counters=scored.runtime["counters"], hit_before=per_layer_hits(timeline, lambda s: s <= P),
                hit_after=per_layer_hits(timeline, lambda s: s > P),
                replay_after=np.nanmean(unlimited["layer_hit_rate"][after], 0).tolist(),
                replay_swaps=unlimited["swaps"], oracle_after=oracle)


CHILDREN = {"write": child_write, "convert": child_convert, "plan": child_plan, "serve": child_serve}


# ---- command line ------------------------------------------------------------------------------------------
def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in set().union(*MODELS.values()):
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with a config.json key of the models "
                             f"({', '.join(sorted(set().union(*MODELS.values())))})")
        out[key] = json.loads(value)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    ap.add_argument("--layers", type=ints, default=[4, 8], help="depths of Qwen3-30B-A3B (default 4,8)")
    ap.add_argument("--next-layers", type=ints, default=[2, 4], help="depths of Qwen3-Next-80B-A3B (default 2,4)")
    ap.add_argument("--pairs", type=lambda s: s.split(","), default=["bf16/int4", "int4/int2"],
                    help="HI/LO tier pairs (default bf16/int4,int4/int2)")
    ap.add_argument("--batches", type=ints, default=[1, 8], help="served batch sizes (default 1,8)")
    ap.add_argument("--fraction", type=float, default=0.2, help="share of each layer's experts in HI (default 0.2)")
    ap.add_argument("--max-len", type=int, default=1024, help="KV cache length the budget is planned for")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--phase-positions", type=int, default=128, help="positions per domain of the shift workload")
    ap.add_argument("--domain-tokens", type=int, default=32, help="token ids per domain")
    ap.add_argument("--period", type=int, default=32, help="policy update period T_u, steps (default 32)")
    ap.add_argument("--segment", type=int, default=16)
    ap.add_argument("--backend", default="xla")
    ap.add_argument("--plan-budgets", type=ints, default=list(PLAN_BUDGETS_GIB),
                    help=f"GiB budgets of the {FULL_DEPTH}-layer plans")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config.json value (JSON) of every model that has it, e.g. hidden_size=64")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="safetensors shard size of the written checkpoints")
    ap.add_argument("--max-rss-gb", type=float, default=12.0, help="stop a phase whose RSS passes this")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dynaexq-scale"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        phase, spec = a.child[0], json.loads(a.child[1])
        result = CHILDREN[phase](spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return
    models = a.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown} (use {', '.join(MODELS)})")
    overrides = parse_set(a.set)
    a.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)
    results = {}
    try:
        for name in models:
            results[name] = run_model(name, a, overrides, log)
    finally:
        if not a.keep:
            for name in models:
                for d in a.workdir.glob(f"{name}-*L"):
                    remove(d)
    for name, m in results.items():
        print_tables(name, m, a)
    write_result(a.out, benchmark="scale",
                 args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "child"},
                 seconds=time.perf_counter() - t0, models=results)
    print(f"({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()

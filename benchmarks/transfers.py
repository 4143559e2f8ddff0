"""Transfers as one global schedule, model-free: a synthetic router trace with workload shifts
(runtime.replay.shifting_trace: per phase and layer a hot set) at real MoE shapes, replayed through
the dynaexq policy with the engine's default settings and the engine's own transfer schedule
(runtime.transfers), for the schedule before issue 12 (layer by layer, K = 4 copies counted), the
global byte-bounded schedule at the default staging, and unlimited transfers; plus rows that
separate the two changes (layer order at the default staging, global order at K = 4's bytes) and
one at a staging of --staging-mib (default: what K = 64 reserves on Qwen3-30B-A3B), which shows
what a staging set in bytes rather than in copies of the largest expert gives a model of small experts.
Prints the post-shift HI hit rate and the swaps per layer group; writes
benchmarks/results/transfers.json.

Shapes: the MoE layers of Qwen3-30B-A3B (48 x 128 experts top-8, hidden 2048, moe_intermediate
768, bf16/int4) and of Qwen3-Next-80B-A3B (48 x 512 experts top-10, moe_intermediate 512,
int4/int2); HI slots from the budget plan at r = 20%, staging from the same plan."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import write_result  # benchmarks/common.py

from dynaexq_jax.experiments.synthetic import qwen3_moe_config
from dynaexq_jax.model.config import parse_hf_config
from dynaexq_jax.model.quant import parse_format
from dynaexq_jax.runtime.budget import plan_budget
from dynaexq_jax.runtime.config import EngineConfig
from dynaexq_jax.runtime.offload import PCIE_BYTES_PER_S
from dynaexq_jax.runtime.policies import DynaExqPolicy
from dynaexq_jax.runtime.replay import replay, shifting_trace
from dynaexq_jax.runtime.transfers import TransferSchedule

MODELS = {
    "Qwen3-30B-A3B": dict(experts=128, top_k=8, inter=768, hi="bf16", lo="int4", hot=20),
    "Qwen3-Next-80B-A3B": dict(experts=512, top_k=10, inter=512, hi="int4", lo="int2", hot=80),
}
LAYERS, HIDDEN, HI_FRACTION, GROUP = 48, 2048, 0.2, 12
OLD_K = 4     # the default before issue 12, with copies counted (two per swap) instead of bytes


def moe_plan(m: dict, transfers_in_flight: int):
    cfg = parse_hf_config(qwen3_moe_config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_experts=m["experts"],
                                           num_experts_per_tok=m["top_k"], moe_intermediate_size=m["inter"]))
    return plan_budget(cfg, budget=2**62, hi=parse_format(m["hi"]), lo=parse_format(m["lo"]), dense_params=0,
                       batch=1, max_len=512, transfers_in_flight=transfers_in_flight, max_hi_fraction=HI_FRACTION)


def schedules(m: dict, k: int, staging_mib: float) -> dict:
    """name -> (TransferSchedule or None for unlimited, the plan it comes from)."""
    new, old = moe_plan(m, k), moe_plan(m, OLD_K)
    by_bytes = moe_plan(m, max(2, int(staging_mib * 2**20 // new.m_hi)))
    swap = new.m_hi + new.m_lo
    return {f"before: layer FIFO, K={OLD_K} copies": (TransferSchedule(old.staging, 2 * old.m_hi, "layer"), old),
            f"layer FIFO, K={k} staging": (TransferSchedule(new.staging, swap, "layer"), new),
            f"global, K={OLD_K} staging": (TransferSchedule(old.staging, swap), old),
            f"global, K={k} staging (default)": (TransferSchedule(new.staging, swap), new),
            f"global, {staging_mib:g} MiB staging (K={by_bytes.transfers_in_flight})":
                (TransferSchedule(by_bytes.staging, swap), by_bytes),
            "unlimited": (None, new)}


def main():
    d = EngineConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--phase-chunks", type=int, default=128, help="segments per workload phase")
    ap.add_argument("--phases", type=int, default=3)
    ap.add_argument("--transfers", type=int, default=d.transfers_in_flight, help="K of the new schedule")
    ap.add_argument("--staging-mib", type=float, default=576.0, help="the staging of the row set in bytes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "transfers.json"))
    a = ap.parse_args()
    results = {}
    for name in a.models.split(","):
        m = MODELS[name]
        trace = shifting_trace(LAYERS, m["experts"], top_k=m["top_k"], hot=m["hot"], chunks=a.phases * a.phase_chunks,
                               phase_chunks=a.phase_chunks, seed=a.seed)
        rows, unlimited_layers = {}, None
        for label, (schedule, plan) in reversed(schedules(m, a.transfers, a.staging_mib).items()):   # unlimited first
            r = replay(DynaExqPolicy(period=d.update_period, delta=d.delta), trace, list(plan.n_hi),
                       chunk=d.segment_len, alpha=d.alpha, schedule=schedule)
            layers = np.nanmean(r["layer_hit_rate"][a.phase_chunks:], 0)
            unlimited_layers = layers if unlimited_layers is None else unlimited_layers
            swaps_per_boundary = None if schedule is None else schedule.staging_bytes // schedule.swap_bytes
            rows[label] = dict(
                staging_bytes=None if schedule is None else schedule.staging_bytes,
                swaps_per_boundary=swaps_per_boundary,
                copy_ms_per_boundary=None if schedule is None else
                1e3 * swaps_per_boundary * (plan.m_hi + plan.m_lo) / PCIE_BYTES_PER_S,
                post_shift_hit_rate=float(np.nanmean(r["hit_rate"][a.phase_chunks:])),
                hit_rate=r["mean_hit_rate"],
                group_post_shift_hit_rate=[float(layers[g:g + GROUP].mean()) for g in range(0, LAYERS, GROUP)],
                group_swaps=[int(sum(r["layer_swaps"][g:g + GROUP])) for g in range(0, LAYERS, GROUP)],
                worst_layer_vs_unlimited=float((layers / unlimited_layers).min()),
                swaps=r["swaps"], swaps_planned=r["swaps_planned"])
        rows = dict(reversed(rows.items()))
        plan = moe_plan(m, a.transfers)
        results[name] = dict(model=m, n_hi=plan.n_hi[0], m_hi=plan.m_hi, m_lo=plan.m_lo, rows=rows)
        print(f"\n{name}: {LAYERS} x {m['experts']} experts top-{m['top_k']}, {m['hi']}/{m['lo']} "
              f"({plan.m_hi / 2**20:.2f} / {plan.m_lo / 2**20:.2f} MiB), {plan.n_hi[0]} HI slots per layer, "
              f"hot set {m['hot']} per layer and phase, {a.phases} phases of {a.phase_chunks} segments of "
              f"{d.segment_len} steps")
        head = " | ".join(f"layers {g}-{g + GROUP - 1}" for g in range(0, LAYERS, GROUP))
        print(f"| schedule | swaps / boundary (copy ms at 25 GB/s) | {head} | post-shift | overall "
              "| worst layer / unlimited |")
        print("| --- " * (5 + LAYERS // GROUP) + "|")
        for label, row in rows.items():
            per = "all" if row["swaps_per_boundary"] is None else \
                f"{row['swaps_per_boundary']} ({row['copy_ms_per_boundary']:.1f} ms)"
            groups = " | ".join(f"{h:.2f} ({s} swaps)" for h, s in zip(row["group_post_shift_hit_rate"],
                                                                      row["group_swaps"]))
            print(f"| {label} | {per} | {groups} | {row['post_shift_hit_rate']:.2f} | {row['hit_rate']:.2f} | "
                  f"{row['worst_layer_vs_unlimited']:.2f} |")
    write_result(a.out, benchmark="transfers", layers=LAYERS, hi_fraction=HI_FRACTION, phase_chunks=a.phase_chunks,
                 phases=a.phases, seed=a.seed, segment_len=d.segment_len, update_period=d.update_period,
                 delta=d.delta, alpha=d.alpha, transfers=a.transfers, staging_mib=a.staging_mib,
                 pcie_bytes_per_s_assumed=PCIE_BYTES_PER_S, models=results)


if __name__ == "__main__":
    main()

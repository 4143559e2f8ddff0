"""The budget of every supported family's published models, from their config.json alone (no weights):
what `dynaexq budget CONFIG --hi H --lo L --budget B --platform gpu --backend pallas --json` says for
the configs in benchmarks/configs at a few GPU sizes. Per model: the dense parameters, the KV cache
(or recurrent / latent state) at the serving shape, the workspace, the bytes of one expert in each
tier and of all experts, the HI slots per MoE layer at each budget ("-" where infeasible) and the
smallest feasible budget. Prints a markdown table; writes benchmarks/results/published_budgets.json.

    python benchmarks/published_budgets.py [--hi bf16 --lo int4] [--budgets 24,48,80] [--batch 1 --max-len 4096]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import write_result  # benchmarks/common.py

from dynaexq_jax.errors import DynaexqError
from dynaexq_jax.runtime.budget import budget_report, model_info
from dynaexq_jax.runtime.config import EngineConfig

CONFIGS = Path(__file__).parent / "configs"
GIB = 2**30


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hi", default="bf16")
    ap.add_argument("--lo", default="int4")
    ap.add_argument("--budgets", default="24,48,80", help="GPU sizes in GiB")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "published_budgets.json"))
    a = ap.parse_args()
    budgets = [float(b) for b in a.budgets.split(",")]
    settings = EngineConfig(batch=a.batch, max_len=a.max_len, backend="pallas")
    rows = {}
    print(f"HI {a.hi} / LO {a.lo}, batch {a.batch} x {a.max_len} tokens, planned for a GPU (pallas)\n")
    print("| model | family | layers x experts (top-k) | dense | KV / state | workspace | expert HI / LO "
          "| all experts HI | " + " | ".join(f"HI slots @ {b:g} GiB" for b in budgets) + " | smallest feasible |")
    print("| --- " * (9 + len(budgets)) + "|")
    for f in sorted(CONFIGS.glob("*.json")):
        try:
            info = model_info(f, hi=a.hi, lo=a.lo, dtype="bf16")
            reports = [budget_report(info, int(b * GIB), settings) for b in budgets]   # pallas: a GPU
        except DynaexqError as e:
            rows[f.stem] = dict(error=str(e))
            print(f"| {f.stem} | {e} |")
            continue
        cfg, r0 = info.config, reports[0]
        n_moe = len(cfg.moe_layers)
        slots = [("-" if not r["feasible"] else
                  f"{min(r['hi_slots_per_layer'])}" if len(set(r["hi_slots_per_layer"])) == 1 else
                  f"{min(r['hi_slots_per_layer'])}-{max(r['hi_slots_per_layer'])}") for r in reports]
        rows[f.stem] = dict(model_type=cfg.model_type, moe_layers=n_moe, num_experts=cfg.num_experts,
                            top_k=cfg.num_experts_per_tok, reports=reports)
        print(f"| {f.stem} | {cfg.model_type} | {n_moe} x {cfg.num_experts} ({cfg.num_experts_per_tok}) "
              f"| {r0['dense_bytes'] / GIB:.1f} GiB | {r0['kv_cache_bytes'] / GIB:.2f} GiB "
              f"| {r0['workspace_bytes'] / GIB:.2f} GiB "
              f"| {r0['expert_hi_bytes'] / 2**20:.1f} / {r0['expert_lo_bytes'] / 2**20:.1f} MiB "
              f"| {r0['expert_hi_bytes'] * n_moe * cfg.num_experts / GIB:.0f} GiB | " + " | ".join(slots)
              + f" | {r0['min_feasible_bytes'] / GIB:.1f} GiB |", flush=True)
    write_result(a.out, benchmark="published_budgets", hi=a.hi, lo=a.lo, budgets_gib=budgets, batch=a.batch,
                 max_len=a.max_len, models=rows)


if __name__ == "__main__":
    main()

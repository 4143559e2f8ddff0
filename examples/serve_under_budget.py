"""Serve a Qwen3-MoE checkpoint under a device-memory budget and compare policies on the same
prompts: the copy-and-edit starting point for policy research.

    python examples/serve_under_budget.py                       # the embedded trained model
    python examples/serve_under_budget.py --hf-dir PATH/TO/HF   # another Hugging Face checkpoint

Prints each policy's budget plan, decode speed, HI hit rate and swaps, and writes residency and
hotness plots per policy to --out.
"""
import argparse
import json
from pathlib import Path

from dynaexq_jax.experiments.default_model import converted_model
from dynaexq_jax.runtime.budget import budget_for_fraction
from dynaexq_jax.runtime.config import EngineConfig
from dynaexq_jax.runtime.engine import Engine
from dynaexq_jax.runtime.plots import plot_stats
from dynaexq_jax.runtime.policies import DynaExqPolicy, Policy
from dynaexq_jax.serving.checkpoint import load_checkpoint


class LowestIds(Policy):
    """An example custom policy: never swaps; the HI slots stay with the lowest expert ids."""
    name = "lowest-ids"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-dir", help="Hugging Face checkpoint (default: the embedded trained model)")
    ap.add_argument("--out", default="runs/example")
    ap.add_argument("--hi-fraction", type=float, default=0.25, help="share of experts the budget keeps HI")
    ap.add_argument("--new-tokens", type=int, default=96)
    a = ap.parse_args()
    out = Path(a.out)
    conv = load_checkpoint(converted_model(a.hf_dir, out / "converted"))

    prompts = ["def parse(line):\n    ", "The tutorial explains how to", "import os\nimport sys\n", "In this chapter"]
    # Every policy runs with the same settings and budget: one that holds every expert LO plus
    # HI slots for about hi_fraction of them.
    settings = EngineConfig(batch=len(prompts), max_len=256, segment_len=16)
    budget = budget_for_fraction(conv, a.hi_fraction, settings)

    policies = {"dynaexq": DynaExqPolicy(period=32, delta=0.01), "lowest-ids": LowestIds()}
    for name, policy in policies.items():
        engine = Engine(conv, budget_bytes=budget, settings=settings.replace(policy=policy))
        engine.generate(prompts, max_new_tokens=16)                    # warm-up: compile
        res = engine.generate(prompts, max_new_tokens=a.new_tokens, stop_tokens=())
        r = res.runtime
        print(f"{name:>11}: {res.stats.decode_tokens_per_s:7.1f} tok/s, HI hit rate {r['hi_hit_rate']:.3f}, "
              f"{r['counters']['promotions']} swaps, HI slots/layer {r['n_hi']}")
        stats = out / f"stats_{name}.json"
        stats.write_text(json.dumps({"runtime": r, "stats": res.stats.to_dict(), "texts": res.texts}))
        plot_stats(stats, out / name)
    print(f"plots in {out}/<policy>/")


if __name__ == "__main__":
    main()

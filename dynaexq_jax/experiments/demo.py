"""The README's main job on the default model: the project's own small trained Qwen3-MoE
(dynaexq_jax.experiments.default_model, shipped as a Hugging Face directory) through the real path: convert
(both expert tiers) -> load -> jitted generation in each tier -> the DynaExq runtime under a budget."""
from __future__ import annotations

from pathlib import Path

from dynaexq_jax.serving.generate import SEGMENT_LEN

DEFAULT_PROMPTS = ["def read_config(path):\n    ", "The with statement is used to"]


def run_demo(workdir: Path, prompts=None, **generate_kwargs) -> None:
    import dynaexq_jax
    from dynaexq_jax.experiments import default_model

    prompts = prompts or DEFAULT_PROMPTS
    conv_dir = workdir / "converted"
    print(f"[demo] default model {default_model.HF_DIR} -> {conv_dir} "
          f"(HI tier {default_model.HI}, LO tier {default_model.LO})")
    default_model.converted_model(None, conv_dir)
    for tier in ("hi", "lo"):
        model = dynaexq_jax.load(conv_dir, tier=tier)
        c = model.config
        print(f"\n[demo] {c.model_type}: {c.num_layers} layers, {c.num_experts} experts top-{c.num_experts_per_tok}; "
              f"all experts in the {tier.upper()} tier ({model.checkpoint.tiers[tier].name})")
        res = model.generate(prompts, **generate_kwargs)
        for p, text in zip(prompts, res.texts):
            print(f"  {p!r} -> {text!r}")
        s = res.stats
        print(f"  time to first token {s.time_to_first_token_s * 1e3:.0f} ms (includes compilation), "
              f"decode {s.decode_tokens_per_s:.1f} tok/s over {s.decode_tokens} tokens")
    run_budgeted(conv_dir, workdir, prompts, **generate_kwargs)


def run_budgeted(conv_dir: Path, workdir: Path, prompts, *, max_new_tokens=32, segment_len=SEGMENT_LEN,
                 **sampling_kwargs):
    """The DynaExq runtime under a budget that leaves about a quarter of the experts HI."""
    import json

    from dynaexq_jax.experiments.compare import calibration_ranking
    from dynaexq_jax.runtime.budget import budget_for_fraction
    from dynaexq_jax.runtime.config import EngineConfig
    from dynaexq_jax.runtime.engine import Engine
    from dynaexq_jax.runtime.plots import plot_stats
    from dynaexq_jax.serving.checkpoint import load_checkpoint
    from dynaexq_jax.serving.sampling import Sampling
    from dynaexq_jax.serving.tokenizer import TextCodec

    max_len = 256
    ckpt = load_checkpoint(conv_dir)
    settings = EngineConfig(policy="dynaexq", batch=len(prompts), max_len=max_len, segment_len=segment_len,
                            update_period=2 * segment_len)
    budget = budget_for_fraction(ckpt, 0.25, settings)
    # The initial HI set: the all-LO model's routed mass on the calibration split of both domains.
    ranking = calibration_ranking(ckpt, TextCodec(conv_dir), ("prose", "code"), rows=4, positions=512)
    engine = Engine(ckpt, budget_bytes=budget, settings=settings, calibration=ranking)
    print(f"\n[demo] DynaExq runtime, budget {budget / 2**20:.2f} MiB:")
    print("\n".join("  " + line for line in engine.plan.table().splitlines()))
    print(f"  this plan again: dynaexq budget {conv_dir} --budget {budget} --batch {len(prompts)} --max-len {max_len}")
    seed = sampling_kwargs.pop("seed", 0)
    res = engine.generate(prompts, max_new_tokens=max(max_new_tokens, 4 * segment_len), seed=seed,
                          sampling=Sampling(sampling_kwargs.get("temperature", 0.0), sampling_kwargs.get("top_k", 0),
                                            sampling_kwargs.get("top_p", 1.0)))
    r, c = res.runtime, res.runtime["counters"]
    print(f"  decode {res.stats.decode_tokens_per_s:.1f} tok/s; HI hit rate {r['hi_hit_rate']:.2f}; "
          f"{c['promotions']} promotions / {c['demotions']} demotions ({c['bytes_moved'] / 2**20:.2f} MiB moved), "
          f"{c['publishes_deferred']} deferred publishes, {c['device_stalls']} device stalls")
    stats = workdir / "stats.json"
    stats.write_text(json.dumps({"prompts": prompts, "tokens": res.tokens, "texts": res.texts,
                                 "stats": res.stats.to_dict(), "runtime": r}, indent=1))
    for png in plot_stats(stats):
        print(f"  wrote {png}")

"""The `dynaexq` command line. Every DynaexqError becomes one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dynaexq_jax.errors import ConfigError, DynaexqError


def _cmd_convert(a):
    from checkpoints_convert import convert
    t0 = time.perf_counter()
    out = convert(a.hf_dir, a.out_dir, hi=a.hi, lo=a.lo, dtype=a.dtype, overwrite=a.overwrite,
                  progress=not a.quiet)
    print(f"converted {a.hf_dir} -> {out} in {time.perf_counter() - t0:.1f}s")


def _cmd_info(a):
    from dynaexq_jax.serving.checkpoint import load_checkpoint
    from dynaexq_jax.model.quant import expert_nbytes
    ck = load_checkpoint(a.model)
    c = ck.config
    print(f"{ck.path}: {c.model_type}, {c.num_layers} layers ({len(c.moe_layers)} MoE), hidden {c.hidden_size}, "
          f"{c.num_experts} experts top-{c.num_experts_per_tok}, moe_intermediate {c.moe_intermediate_size}, "
          f"vocab {c.vocab_size}")
    for name, fmt in ck.tiers.items():
        b = expert_nbytes(fmt, c.hidden_size, c.moe_intermediate_size)
        print(f"  tier {name}: {fmt.name:<12} {b / 2**20:8.3f} MiB per expert, "
              f"{b * c.num_experts * len(c.moe_layers) / 2**20:9.1f} MiB for all experts")


def _generate_kwargs(a):
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                seed=a.seed, segment_len=a.segment)


def _print_generation(prompts, res, stats_path=None):
    for p, text in zip(prompts, res.texts or [None] * len(prompts)):
        print(f"--- prompt: {p!r}")
        print(text)
    s = res.stats
    print(f"--- {len(prompts)} prompt(s), {s.prompt_tokens} prompt tokens, {s.generated_tokens} generated; "
          f"time to first token {s.time_to_first_token_s * 1e3:.0f} ms; decode {s.decode_tokens_per_s:.1f} tok/s")
    if res.runtime:
        r, c = res.runtime, res.runtime["counters"]
        print(f"--- policy {r['policy']}, HI slots per layer {r['n_hi']}, HI hit rate {r['hi_hit_rate']:.3f}, "
              f"promotions {c['promotions']}, demotions {c['demotions']}, moved {c['bytes_moved'] / 2**20:.2f} MiB, "
              f"publishes deferred {c['publishes_deferred']}, device stalls {c['device_stalls']}, "
              f"controller {1e3 * r['controller_s']:.1f} ms")
    if stats_path:
        Path(stats_path).write_text(json.dumps({"prompts": prompts, "tokens": res.tokens, "texts": res.texts,
                                                "stats": s.to_dict(), "runtime": res.runtime}, indent=1))
        print(f"--- wrote {stats_path}")


def _engine(a, batch: int, max_len: int):
    from dynaexq_jax.runtime.engine import Engine
    return Engine(a.model, budget_bytes=a.budget, policy=a.policy, segment_len=a.segment, batch=batch,
                  max_len=max_len, strategy=a.strategy, transfers_in_flight=a.transfers, alpha=a.alpha,
                  update_period=a.period, delta=a.delta, rate_limit=a.rate_limit, backend=a.backend)


def _cmd_generate(a):
    if a.budget is None:
        import dynaexq_jax
        model = dynaexq_jax.load(a.model, tier=a.tier, backend=a.backend)
        res = model.generate(a.prompt, **_generate_kwargs(a))
    else:
        from dynaexq_jax.serving.generate import bucket
        from dynaexq_jax.serving.sampling import Sampling
        from dynaexq_jax.serving.tokenizer import TextCodec
        ids = TextCodec(Path(a.model)).prompts(a.prompt)
        max_len = a.max_len or bucket(max(map(len, ids)) + a.max_new_tokens + 2 * a.segment, 64)
        engine = _engine(a, len(ids), max_len)
        res = engine.generate(ids, max_new_tokens=a.max_new_tokens, seed=a.seed,
                              sampling=Sampling(a.temperature, a.top_k, a.top_p))
    _print_generation(a.prompt, res, a.stats)


def _cmd_budget(a):
    engine = _engine(a, a.batch, a.max_len)
    print(f"{a.model}: budget breakdown for batch {a.batch}, max_len {a.max_len}, backend {a.backend}, "
          f"tiers HI {engine.checkpoint.tiers['hi'].name} / LO {engine.checkpoint.tiers['lo'].name}")
    print(engine.plan.table())


def _cmd_plot(a):
    from dynaexq_jax.runtime.plots import plot_stats
    for p in plot_stats(a.stats, a.out):
        print(f"wrote {p}")


def _cmd_demo(a):
    from dynaexq_jax.experiments.demo import run_demo
    run_demo(Path(a.workdir), prompts=a.prompt or None, **_generate_kwargs(a))


def _cmd_train_tiny(a):
    from dynaexq_jax.experiments.training import TrainConfig, train
    tc = TrainConfig(steps=a.steps, batch=a.batch, seq_len=a.seq_len, lr=a.lr, seed=a.seed,
                     warmup=min(TrainConfig.warmup, max(1, a.steps // 10)))
    if min(a.steps, a.batch, a.seq_len) < 1 or a.lr <= 0:
        raise ConfigError("train-tiny: --steps, --batch and --seq-len must be >= 1 and --lr > 0")
    train(a.out_dir, tc, source_limit=a.limit_sources)


def _csv(cast):
    return lambda text: tuple(cast(x) for x in text.split(",") if x.strip())


def _cmd_compare(a):
    from dynaexq_jax.experiments.compare import CompareConfig, Harness
    from dynaexq_jax.experiments import default_model
    model = default_model.converted_model(a.model, Path(a.out) / "converted", hi=a.hi or default_model.HI, lo=a.lo)
    cfg = CompareConfig(policies=a.policies, workload=a.workload, budget=a.budget, rows=a.rows,
                        phase_tokens=a.phase_tokens, chunk=a.chunk, window=a.window, period=a.period, delta=a.delta,
                        alpha=a.alpha, transfers=a.transfers, calibration_domain=a.calibration_domain, sweep=a.sweep,
                        throughput_batches=a.throughput_batches, baselines=a.baselines, new_tokens=a.new_tokens,
                        seed=a.seed)
    res = Harness(model, cfg).run(a.out)
    print(Path(a.out, "report.md").read_text())
    print(f"wrote {a.out}/results.json, results.csv, report.md and plots")
    return res


def _add_runtime_args(p, budget_required: bool):
    p.add_argument("--budget", required=budget_required,
                   help="device-memory budget (e.g. 20GiB, 512MiB); runs the DynaExq runtime")
    p.add_argument("--policy", default="dynaexq", help="dynaexq (default), static, all-hi, all-lo, random")
    p.add_argument("--strategy", default="proportional", help="HI slots per layer: uniform, proportional, greedy")
    p.add_argument("--period", type=int, default=200, help="decode steps between policy updates (T_u)")
    p.add_argument("--delta", type=float, default=0.01, help="hysteresis margin")
    p.add_argument("--rate-limit", type=int, default=None, help="max swaps per layer per update")
    p.add_argument("--alpha", type=float, default=0.9, help="hotness EMA factor")
    p.add_argument("--transfers", type=int, default=4, help="K: transitions (copies) in flight")
    p.add_argument("--backend", default="xla", choices=["xla", "xla-only", "pallas"])


def _add_sampling_args(p):
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segment", type=int, default=16, help="decode steps per jitted segment")


def build_parser() -> argparse.ArgumentParser:
    from dynaexq_jax.experiments.training import TrainConfig
    ap = argparse.ArgumentParser(prog="dynaexq", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint (both expert tiers)")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--hi", default="source", help="HI tier format (default: the source dtype)")
    p.add_argument("--lo", default="int4", help="LO tier format, e.g. int4, int4:g64, int2, int8 (default int4:g128)")
    p.add_argument("--dtype", default="source", help="dense parameter dtype: source, f32, bf16, fp16")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_convert)

    p = sub.add_parser("info", help="describe a converted checkpoint")
    p.add_argument("model")
    p.set_defaults(fn=_cmd_info)

    p = sub.add_parser("generate", help="generate text from a converted checkpoint")
    p.add_argument("model")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--tier", default="hi", help="without --budget: the tier every expert runs in, hi or lo")
    p.add_argument("--max-len", type=int, default=None, help="cache length (default: fits the prompts)")
    p.add_argument("--stats", help="write tokens, statistics and the runtime timeline to this JSON file")
    _add_runtime_args(p, budget_required=False)
    _add_sampling_args(p)
    p.set_defaults(fn=_cmd_generate)

    p = sub.add_parser("budget", help="print how a device-memory budget is spent")
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--segment", type=int, default=16)
    _add_runtime_args(p, budget_required=True)
    p.set_defaults(fn=_cmd_budget)

    p = sub.add_parser("plot", help="plot expert residency and hotness from a --stats file (PNG)")
    p.add_argument("stats")
    p.add_argument("--out", help="output folder (default: beside the stats file)")
    p.set_defaults(fn=_cmd_plot)

    p = sub.add_parser("train-tiny", help="train the small default MoE on the standard library's code and prose")
    p.add_argument("out_dir", help="where the Hugging Face directory is written")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch", type=int, default=TrainConfig.batch, help="sequences per step, half per domain")
    p.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--limit-sources", type=int, default=None, help="use only the first N source files (quick runs)")
    p.set_defaults(fn=_cmd_train_tiny)

    from dynaexq_jax.experiments.compare import BASELINES, POLICIES, CompareConfig as C
    p = sub.add_parser("compare", help="compare precision policies and offloading baselines on the same streams")
    p.add_argument("model", nargs="?", default=None,
                   help="a converted checkpoint or a Hugging Face directory (default: the embedded model)")
    p.add_argument("--out", default="runs/compare", help="output folder (results.json, results.csv, report.md, PNGs)")
    p.add_argument("--budget", default=C.budget, help="'20%%' (share of HI slots per layer) or bytes ('3MiB')")
    p.add_argument("--policies", type=_csv(str), default=C.policies, help=f"comma-separated, from {','.join(POLICIES)}")
    p.add_argument("--workload", type=_csv(str), default=C.workload, help="domains per phase, e.g. prose,code,prose")
    p.add_argument("--rows", type=int, default=C.rows, help="streams scored side by side (batch)")
    p.add_argument("--phase-tokens", type=int, default=C.phase_tokens, help="positions per stream per phase")
    p.add_argument("--chunk", type=int, default=C.chunk, help="positions per jitted chunk (a decode segment)")
    p.add_argument("--window", type=int, default=C.window, help="scoring window = cache length")
    p.add_argument("--period", type=int, default=C.period, help="policy update period in steps (T_u)")
    p.add_argument("--delta", type=float, default=C.delta, help="dynaexq hysteresis margin")
    p.add_argument("--alpha", type=float, default=C.alpha, help="hotness EMA factor per step")
    p.add_argument("--transfers", type=int, default=C.transfers, help="K: copies in flight")
    p.add_argument("--calibration-domain", default=None, help="domain of the static ranking (default: first phase)")
    p.add_argument("--sweep", type=_csv(float), default=C.sweep, help="HI fractions for a budget sweep, e.g. 0,0.1,0.2")
    p.add_argument("--throughput-batches", type=_csv(int), default=C.throughput_batches, help="e.g. 1,32; empty: skip")
    p.add_argument("--baselines", type=_csv(str), default=C.baselines, help=f"offloading baselines: {','.join(BASELINES)}")
    p.add_argument("--new-tokens", type=int, default=C.new_tokens, help="decode tokens per throughput run")
    p.add_argument("--hi", default=None, help="HI tier when MODEL is a Hugging Face directory (default int4:g64)")
    p.add_argument("--lo", default=None, help="LO tier when MODEL is a Hugging Face directory (default int2:g64)")
    p.add_argument("--seed", type=int, default=C.seed)
    p.set_defaults(fn=_cmd_compare)

    p = sub.add_parser("demo", help="the end-to-end demo on the default model")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--prompt", action="append")
    _add_sampling_args(p)
    p.set_defaults(fn=_cmd_demo)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except DynaexqError as e:
        print(f"dynaexq {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `dynaexq` command line. Every DynaexqError becomes one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dynaexq_jax.errors import ConfigError, DynaexqError, RuntimeConfigError, check_int


def _cmd_convert(a):
    from dynaexq_jax.serving.conversion import hf_converter
    convert = hf_converter()
    t0 = time.perf_counter()
    out = convert(a.hf_dir, a.out_dir, hi=a.hi, lo=a.lo, dtype=a.dtype, overwrite=a.overwrite,
                  calibration=_calibration_tokens(a), progress=not a.quiet)
    print(f"converted {a.hf_dir} -> {out} in {time.perf_counter() - t0:.1f}s")


def _calibration_tokens(a):
    """--calibration FILE: the text's first --calibration-tokens tokens (the source's tokenizer), as rows."""
    from dynaexq_jax.errors import CalibrationError
    if a.calibration is None:
        if a.calibration_tokens is not None:
            raise CalibrationError("--calibration-tokens: give the calibration text too (--calibration FILE)")
        return None
    from dynaexq_jax.serving.conversion import DEFAULT_TOKENS, MIN_TEXT_TOKENS, calibration_rows
    from dynaexq_jax.serving.tokenizer import TextCodec
    n = DEFAULT_TOKENS if a.calibration_tokens is None else a.calibration_tokens
    check_int("--calibration-tokens", n, CalibrationError, minimum=MIN_TEXT_TOKENS)
    try:
        text = Path(a.calibration).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"--calibration {a.calibration}: cannot read it as UTF-8 text ({e})") from None
    codec = TextCodec(Path(a.hf_dir))
    if codec.tokenizer is None:
        raise CalibrationError(f"--calibration: {a.hf_dir} has no tokenizer.json to tokenize the text with")
    return calibration_rows(codec.encode(text), n)


def _cmd_info(a):
    import numpy as np

    from dynaexq_jax.model.families import schema
    from dynaexq_jax.serving.checkpoint import read_info, verify_checkpoint
    info = read_info(a.model)         # metadata only: no tensor is read
    c = info.config
    print(f"{info.path}: {c.model_type}, {c.num_layers} layers ({len(c.moe_layers)} MoE), hidden {c.hidden_size}, "
          f"{c.num_experts} experts top-{c.num_experts_per_tok}, moe_intermediate {c.moe_intermediate_size}, "
          f"vocab {c.vocab_size}")
    width = max(12, *(len(f.name) for f in info.tiers.values()))
    print(f"  dense:   {info.dense_format.name:<{width}} {info.dense_nbytes / 2**20:8.1f} MiB "
          "(all but the routed experts)")
    for name, fmt in info.tiers.items():
        b = schema.expert_bytes(c, fmt)
        print(f"  tier {name}: {fmt.name:<{width}} {b / 2**20:8.3f} MiB per expert, "
              f"{b * c.num_experts * len(c.moe_layers) / 2**20:9.1f} MiB for all experts")
    cal = info.metadata.get("calibration")
    if cal:
        print(f"  calibration ({', '.join(cal['tiers']) or 'no gptq tier'}): {cal['tokens']} tokens in "
              f"{cal['rows']} rows of {cal['row_length']} through the {cal['model']} model, sha256 "
              f"{cal['sha256'][:16]}...")
        costs = info.lo_costs
        if costs is not None:
            per_layer = costs.mean(axis=1)
            print(f"  LO costs ({cal['measured']['lo_costs']}; --policy sensitivity): mean per layer "
                  f"{per_layer.min():.3g} to {per_layer.max():.3g}, max/mean within a layer up to "
                  f"{(costs.max(axis=1) / np.maximum(per_layer, 1e-30)).max():.1f}x")
    if a.verify:
        t0 = time.perf_counter()
        n, size = verify_checkpoint(info)
        print(f"  verified: {n} files, {size / 2**30:.2f} GiB, match the sha256 written at conversion "
              f"({time.perf_counter() - t0:.1f}s)")


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
              f"controller {1e3 * r['controller_work_s']:.1f} ms work, "
              f"{1e3 * r['device_wait_s']:.1f} ms waiting for the device")
    if stats_path:
        Path(stats_path).write_text(json.dumps({"prompts": prompts, "tokens": res.tokens, "texts": res.texts,
                                                "stats": s.to_dict(), "runtime": res.runtime}, indent=1))
        print(f"--- wrote {stats_path}")


def _settings(a, **shape):
    """The EngineConfig of the runtime options in a (filled by _fill_runtime_defaults); shape: batch,
    max_len and the like."""
    from dynaexq_jax.runtime.config import EngineConfig
    return EngineConfig(policy=a.policy, segment_len=a.segment, strategy=a.strategy, transfers_in_flight=a.transfers,
                        alpha=a.alpha, update_period=a.period, delta=a.delta, rate_limit=a.rate_limit,
                        backend=a.backend, devices=a.devices, **shape)


def _engine(a, batch: int, max_len: int):
    from dynaexq_jax.runtime.engine import Engine
    return Engine(a.model, budget_bytes=a.budget, settings=_settings(a, batch=batch, max_len=max_len))


def _check_generate_options(a):
    """generate has two paths: without --budget every expert runs in one tier (--tier), with it the
    DynaExq runtime decides. An option of the other path is an error, never silently dropped."""
    if a.budget is None:
        given = [_option(name) for name in _runtime_fields() if getattr(a, name) is not None]
        if given:
            raise RuntimeConfigError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} only with --budget "
                                     f"(the DynaExq runtime); without it every expert runs in one tier (--tier)")
    elif a.tier is not None:
        raise RuntimeConfigError("--tier applies only without --budget; with it the runtime chooses each expert's tier")


def _fill_runtime_defaults(a):
    for name, value in _runtime_defaults().items():
        if getattr(a, name, None) is None:
            setattr(a, name, value)


def _cmd_generate(a):
    _check_generate_options(a)
    check_int("--devices", a.devices, RuntimeConfigError)
    _fill_runtime_defaults(a)
    if a.budget is None:
        import dynaexq_jax
        model = dynaexq_jax.load(a.model, tier=a.tier or "hi", backend=a.backend,
                                 devices=None if a.devices == 1 else a.devices)
        res = model.generate(a.prompt, max_len=a.max_len, **_generate_kwargs(a))
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
    """The plan from metadata alone: a converted checkpoint's, or for a Hugging Face model the
    checkpoint its conversion would write (no weight is read, no engine is built)."""
    import jax

    from dynaexq_jax.runtime.budget import budget_report, model_info, plan_for, resolve_budget
    from dynaexq_jax.runtime.config import EngineConfig
    _fill_runtime_defaults(a)
    settings = EngineConfig(policy=a.policy, batch=a.batch, max_len=a.max_len, prefill_chunk=a.prefill_chunk,
                            prefill_batch=a.prefill_batch, strategy=a.strategy, transfers_in_flight=a.transfers,
                            backend=a.backend)
    info = model_info(a.model, hi=a.hi, lo=a.lo, dtype=a.dtype)
    platform = "gpu" if a.backend == "pallas" else a.platform or jax.default_backend()
    check_int("--devices", a.devices, RuntimeConfigError)
    where = dict(platform=platform, devices=a.devices)
    if a.json:
        print(json.dumps(budget_report(info, a.budget, settings, **where), indent=1))
        return
    plan = plan_for(info, resolve_budget(a.budget, info, settings, **where), settings, **where)
    source = "converted checkpoint" if info.metadata else "Hugging Face config, before conversion"
    prefill = f" (prefilled {a.prefill_batch} at a time)" if a.prefill_batch else ""
    each = (f"budget breakdown of each of {a.devices} devices (experts split across them, the rest replicated)"
            if a.devices > 1 else "budget breakdown")
    print(f"{a.model} ({source}): {each} for batch {a.batch}{prefill}, max_len {a.max_len}, prefill chunk "
          f"{a.prefill_chunk}, backend {a.backend} on {platform}, tiers HI {info.tiers['hi'].name} / "
          f"LO {info.tiers['lo'].name}, dense {info.dense_format.name}")
    print(plan.table())


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
    from dynaexq_jax.experiments import default_model
    from dynaexq_jax.experiments.compare import CompareConfig, Harness
    # Built (and so checked) before the model is converted: a bad option costs no conversion.
    cfg = CompareConfig(policies=a.policies, workload=a.workload, budget=a.budget, rows=a.rows,
                        phase_tokens=a.phase_tokens, chunk=a.chunk, window=a.window, period=a.period, delta=a.delta,
                        alpha=a.alpha, transfers=a.transfers, calibration_domain=a.calibration_domain, sweep=a.sweep,
                        throughput_batches=a.throughput_batches, baselines=a.baselines, new_tokens=a.new_tokens,
                        seed=a.seed, devices=a.devices)
    model = default_model.converted_model(a.model, Path(a.out) / "converted", hi=a.hi or default_model.HI, lo=a.lo)
    res = Harness(model, cfg).run(a.out)
    print(Path(a.out, "report.md").read_text())
    print(f"wrote {a.out}/results.json, results.csv, report.md and plots")
    return res


def _cmd_eval(a):
    """lm-eval tasks through the runtime: one run per policy (dynaexq_jax.lm_eval.run)."""
    from dynaexq_jax.lm_eval.run import REFERENCES
    if a.policy is not None and a.policies:
        raise RuntimeConfigError("give --policy (one run) or --policies (several side by side), not both")
    if a.tier is not None and (a.budget is not None or a.policies):
        raise RuntimeConfigError("--tier applies only to one run without --budget (every expert in that tier)")
    policies = a.policies or ((a.policy,) if a.policy else ("dynaexq",) if a.budget is not None
                              else (f"all-{a.tier or 'hi'}",))
    if a.budget is None:
        given = [_option(n) for n in _runtime_fields() if n != "policy" and getattr(a, n) is not None]
        given += ["--calibration"] * (a.calibration is not None)
        if given or any(p not in REFERENCES for p in policies):
            raise RuntimeConfigError(f"{', '.join(given) or 'a policy other than all-hi/all-lo'} needs --budget "
                                     f"(without it every expert runs in one tier)")
    from dynaexq_jax.lm_eval.run import evaluate
    options = dict(pretrained=a.model, hi=a.hi, lo=a.lo, backend=a.backend, batch_size=a.batch_size,
                   max_len=a.max_len, segment=a.segment, max_gen_toks=a.max_gen_toks, seed=a.seed,
                   calibration=a.calibration, devices=a.devices,
                   **{n: getattr(a, n) for n in _runtime_fields() if n != "policy"})
    limit = None if a.limit is None else int(a.limit) if a.limit >= 1 else a.limit
    res = evaluate(a.tasks, policies, budget=a.budget, options=options, include_path=a.include_path, limit=limit,
                   num_fewshot=a.num_fewshot, apply_chat_template=a.apply_chat_template,
                   confirm_run_unsafe_code=a.confirm_run_unsafe_code, out=a.out)
    print(res["table"])
    print(f"wrote {a.out}/results.json, report.md and each run's lm-eval results")


def _cmd_serve(a):
    """The OpenAI-compatible server (dynaexq_jax.server): continuous batching under the runtime."""
    import os
    _check_generate_options(a)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise RuntimeConfigError('dynaexq serve needs the serve extra: pip install -e ".[serve]"') from None
    for name in ("max_batch", "max_queue", "max_body_bytes"):
        check_int(f"--{name.replace('_', '-')}", getattr(a, name), RuntimeConfigError)
    check_int("--port", a.port, RuntimeConfigError, minimum=0)
    if not a.request_timeout > 0:
        raise RuntimeConfigError(f"--request-timeout must be > 0 seconds, got {a.request_timeout}")
    _fill_runtime_defaults(a)
    from dynaexq_jax.experiments import default_model
    from dynaexq_jax.runtime.budget import budget_for_fraction
    from dynaexq_jax.runtime.engine import Engine
    from dynaexq_jax.server.app import create_app, serve
    from dynaexq_jax.server.batcher import Batcher
    from dynaexq_jax.serving.checkpoint import load_checkpoint
    ckpt = load_checkpoint(default_model.cached_conversion(a.model, a.hi, a.lo, RuntimeConfigError))
    policy = a.policy if a.budget is not None else f"all-{a.tier or 'hi'}"
    # The engine's batch holds every slot and the row a joining request is prefilled into, alone.
    a.policy = policy
    settings = _settings(a, batch=a.max_batch + 1, prefill_batch=1, prefill_chunk=a.prefill_chunk,
                         max_len=a.max_len or min(ckpt.config.max_position_embeddings, 2048))
    budget = a.budget if a.budget is not None else budget_for_fraction(ckpt, float(policy == "all-hi"), settings)
    engine = Engine(ckpt, budget_bytes=budget, settings=settings)
    batcher = Batcher(engine, slots=a.max_batch, max_queue=a.max_queue).start()
    name = a.served_model_name or Path(a.model or default_model.HF_DIR).name
    api_key = a.api_key or os.environ.get("DYNAEXQ_API_KEY") or None
    print(f"serving {ckpt.path} as '{name}' on http://{a.host}:{a.port}/v1: policy {policy}, budget "
          f"{engine.plan.budget / 2**20:.1f} MiB, HI slots per layer {engine.n_hi}, {a.max_batch} slots, max_len "
          f"{settings.max_len}{', API key required' if api_key else ''}", flush=True)
    try:
        serve(create_app(batcher, model_name=name, api_key=api_key, request_timeout=a.request_timeout,
                         max_body_bytes=a.max_body_bytes), a.host, a.port)
    finally:
        batcher.close()


# The runtime's options that only the budgeted path uses (runtime.config.RUNTIME_OPTIONS). The
# parser stores None for an option not given, so that generate can reject one given without
# --budget instead of dropping it; _fill_runtime_defaults then sets the others.
def _runtime_fields() -> dict:
    from dynaexq_jax.runtime.config import RUNTIME_OPTIONS
    return RUNTIME_OPTIONS


def _runtime_defaults() -> dict:
    from dynaexq_jax.runtime.config import EngineConfig
    return {name: getattr(EngineConfig, field) for name, field in _runtime_fields().items()}


# How --budget may be given, in every command that takes one (runtime.budget.resolve_budget).
_BUDGET_FORMS = "a size (20GiB, 512MiB, 1.5GB, bytes) or a share of each layer's experts in HI (25%%)"


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_devices_arg(p, note: str = ""):
    p.add_argument("--devices", type=int, default=1,
                   help="devices of an expert-parallel mesh: every layer's experts split across them, the dense "
                        "parameters, cache and workspace on each; a --budget is each device's" + note)


def _add_runtime_args(p, plan_only: bool):
    """The runtime's options: all of them for generate, for budget (plan_only) those the plan depends
    on (all-hi and all-lo fix the HI slots; the strategy spreads them; K sizes the staging)."""
    from dynaexq_jax.model.moe import BACKENDS
    from dynaexq_jax.runtime.config import EngineConfig
    d = _runtime_defaults()
    p.add_argument("--policy", help=f"dynaexq, static, all-hi, all-lo, random, sensitivity (dynaexq by traffic x "
                                    f"each expert's LO cost, stored by convert --calibration; with --strategy greedy "
                                    f"the slots follow them across layers; default: {d['policy']})")
    p.add_argument("--strategy", help=f"HI slots per layer: uniform, proportional, greedy (default: {d['strategy']})")
    p.add_argument("--transfers", type=int, help=f"K: transitions (copies) in flight (default: {d['transfers']})")
    p.add_argument("--backend", default=EngineConfig.backend, choices=BACKENDS,
                   help="MoE op backend: xla (on a CPU with the C++ kernel), xla-only, pallas (GPU kernels)")
    if plan_only:
        return
    p.add_argument("--period", type=int, help=f"decode steps between policy updates, T_u (default: {d['period']})")
    p.add_argument("--delta", type=float, help=f"hysteresis margin (default: {d['delta']})")
    p.add_argument("--rate-limit", type=int, help="max swaps per layer per update (default: no limit)")
    p.add_argument("--alpha", type=float, help=f"hotness EMA factor (default: {d['alpha']})")


def _add_sampling_args(p):
    from dynaexq_jax.runtime.config import EngineConfig
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens; 0 = no top-k cut")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the likeliest tokens up to probability P; 1 = no cut")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--segment", type=int, default=EngineConfig.segment_len, help="decode steps per jitted segment")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Ends every option's help with its default, unless the help already says it. An option whose
    default is None (not given) or False (a flag) says in its help what happens without it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from dynaexq_jax.experiments.training import TrainConfig
    from dynaexq_jax.runtime.config import EngineConfig
    ap = argparse.ArgumentParser(prog="dynaexq", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)

    p = command("convert", "convert a Hugging Face checkpoint (both expert tiers)")
    p.add_argument("hf_dir", help="a Hugging Face checkpoint directory (config.json, *.safetensors)")
    p.add_argument("out_dir", help="where the converted checkpoint is written")
    p.add_argument("--hi", default="source", help="HI tier format (default: the source dtype)")
    p.add_argument("--lo", default="int4",
                   help="LO tier format, e.g. int4, int4:g64, int2, int2:g64:mse (the least-error quantizer), "
                        "int2:g64:hqq (HQQ, a zero per group), int2:g64:gptq (GPTQ: needs --calibration), int8, "
                        "or gate/up's then down's, int2:g64:hqq+down=int4:g64 (default int4:g128, "
                        "round-to-nearest)")
    p.add_argument("--dtype", default="source", help="dense parameter dtype: source, f32, bf16, fp16")
    p.add_argument("--calibration", metavar="FILE",
                   help="UTF-8 text run through the model: the gptq quantizer's calibration (needed by a gptq "
                        "tier), and where each expert's LO cost is measured and stored (--policy sensitivity)")
    p.add_argument("--calibration-tokens", type=int,
                   help="how many of the text's tokens calibrate (rows of 512; default 8192)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_convert)

    p = command("info", "describe a converted checkpoint (reads its metadata only)")
    p.add_argument("model", help="a converted checkpoint directory")
    p.add_argument("--verify", action="store_true",
                   help="also recompute every file's sha256 and compare with those written at conversion "
                        "(exit status 2 naming a damaged file)")
    p.set_defaults(fn=_cmd_info)

    p = command("generate", "generate text from a converted checkpoint")
    p.add_argument("model", help="a converted checkpoint directory")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--budget", help=f"device-memory budget, {_BUDGET_FORMS}: runs the DynaExq runtime under it "
                                    "(default: no budget, every expert in the --tier tier)")
    p.add_argument("--tier", help="without --budget: the tier every expert runs in, hi or lo (default: hi)")
    p.add_argument("--max-len", type=int, help="cache length in tokens (default: fits the prompts and new tokens)")
    p.add_argument("--stats", help="write tokens, statistics and the runtime timeline to this JSON file")
    _add_devices_arg(p)
    _add_runtime_args(p, plan_only=False)
    _add_sampling_args(p)
    p.set_defaults(fn=_cmd_generate)

    p = command("budget", "print how a device-memory budget is spent, from a converted checkpoint's metadata or "
                          "a Hugging Face config (before converting)")
    p.add_argument("model", help="a converted checkpoint directory, or a Hugging Face model directory or its "
                                 "config.json (planned as `dynaexq convert` with --hi/--lo/--dtype would write it)")
    p.add_argument("--budget", required=True, help=f"the device-memory budget to plan: {_BUDGET_FORMS}")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded side by side (sizes cache and workspace)")
    p.add_argument("--max-len", type=int, default=2048, help="cache length in tokens (sizes cache and workspace)")
    p.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk,
                   help="prompt tokens per prefill forward (sizes the workspace)")
    p.add_argument("--prefill-batch", type=int, help="prompts prefilled together (sizes the workspace; default: "
                                                     "--batch; `serve` prefills 1 and has --batch = its slots + 1)")
    p.add_argument("--hi", help="for a Hugging Face config: HI tier format, as in `dynaexq convert` (default: source)")
    p.add_argument("--lo", help="for a Hugging Face config: LO tier format, as in `dynaexq convert` (default: int4)")
    p.add_argument("--dtype", help="for a Hugging Face config: dense parameter dtype, as in `dynaexq convert` "
                                   "(default: source)")
    _add_devices_arg(p)
    p.add_argument("--platform", choices=("cpu", "gpu"),
                   help="where the plan is served: sizes the workspace (default: this machine's; gpu for pallas)")
    p.add_argument("--json", action="store_true",
                   help="print the plan as JSON (bytes as integers; an infeasible budget is reported, not an error)")
    _add_runtime_args(p, plan_only=True)
    # The plan does not depend on the segment length: no option, the Engine gets the default.
    p.set_defaults(fn=_cmd_budget, segment=EngineConfig.segment_len)

    p = command("plot", "plot expert residency and hotness from a --stats file (PNG)")
    p.add_argument("stats", help="a JSON file written by `dynaexq generate --budget SIZE --stats FILE`")
    p.add_argument("--out", help="output folder (default: beside the stats file)")
    p.set_defaults(fn=_cmd_plot)

    p = command("train-tiny", "train the small default MoE on the standard library's code and prose")
    p.add_argument("out_dir", help="where the Hugging Face directory is written")
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps")
    p.add_argument("--batch", type=int, default=TrainConfig.batch, help="sequences per step, half per domain")
    p.add_argument("--seq-len", type=int, default=TrainConfig.seq_len, help="tokens per training sequence")
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate")
    p.add_argument("--seed", type=int, default=TrainConfig.seed, help="initialisation and data-order seed")
    p.add_argument("--limit-sources", type=int, default=None, help="use only the first N source files (quick runs)")
    p.set_defaults(fn=_cmd_train_tiny)

    from dynaexq_jax.experiments.compare import BASELINES, POLICIES
    from dynaexq_jax.experiments.compare import CompareConfig as C
    p = command("compare", "compare precision policies and offloading baselines on the same streams")
    p.add_argument("model", nargs="?", default=None,
                   help="a converted checkpoint or a Hugging Face directory (default: the embedded model)")
    p.add_argument("--out", default="runs/compare", help="output folder (results.json, results.csv, report.md, PNGs)")
    p.add_argument("--budget", default=C.budget, help=f"the device-memory budget of every engine: {_BUDGET_FORMS}")
    # Comma-separated defaults: argparse passes a string default through `type`, and --help shows it as typed.
    p.add_argument("--policies", type=_csv(str), default=",".join(C.policies),
                   help=f"comma-separated, from {','.join(POLICIES)}")
    p.add_argument("--workload", type=_csv(str), default=",".join(C.workload), help="domains per phase")
    p.add_argument("--rows", type=int, default=C.rows, help="streams scored side by side (batch)")
    p.add_argument("--phase-tokens", type=int, default=C.phase_tokens, help="positions per stream per phase")
    p.add_argument("--chunk", type=int, default=C.chunk, help="positions per jitted chunk (a decode segment)")
    p.add_argument("--window", type=int, default=C.window, help="scoring window = cache length")
    p.add_argument("--period", type=int, default=C.period, help="policy update period in steps (T_u)")
    p.add_argument("--delta", type=float, default=C.delta, help="dynaexq hysteresis margin")
    p.add_argument("--alpha", type=float, default=C.alpha, help="hotness EMA factor per step")
    p.add_argument("--transfers", type=int, default=C.transfers, help="K: copies in flight")
    p.add_argument("--calibration-domain", default=None, help="domain of the static ranking (default: first phase)")
    p.add_argument("--sweep", type=_csv(float), default=",".join(map(str, C.sweep)),
                   help="HI fractions for a budget sweep, e.g. 0,0.1,0.2 (default: no sweep)")
    p.add_argument("--throughput-batches", type=_csv(int), default=",".join(map(str, C.throughput_batches)),
                   help="batch sizes of the decode throughput runs; empty: skip")
    p.add_argument("--baselines", type=_csv(str), default=",".join(C.baselines),
                   help=f"offloading baselines, from {','.join(BASELINES)}")
    p.add_argument("--new-tokens", type=int, default=C.new_tokens, help="decode tokens per throughput run")
    p.add_argument("--hi", default=None, help="HI tier when MODEL is a Hugging Face directory (default int4:g64)")
    p.add_argument("--lo", default=None, help="LO tier when MODEL is a Hugging Face directory (default int2:g64)")
    p.add_argument("--seed", type=int, default=C.seed, help="seed of the random policy's HI sets")
    _add_devices_arg(p, " (the offloading baselines run on one device: give --baselines '')")
    p.set_defaults(fn=_cmd_compare)

    p = command("eval", "lm-evaluation-harness tasks served by the runtime, one run per policy side by side "
                        '(needs the eval extra: pip install -e ".[eval]")')
    p.add_argument("model", nargs="?", help="a converted checkpoint or a Hugging Face directory (converted once, "
                                            "with --hi/--lo); default: the embedded model")
    p.add_argument("--tasks", type=_csv(str), required=True,
                   help="lm-eval task or group names, comma-separated; the local suite: dynaexq_suite")
    p.add_argument("--include-path", action="append", help="a folder of more task YAMLs (repeat for several)")
    p.add_argument("--budget", help=f"device-memory budget of every policy but all-hi/all-lo, {_BUDGET_FORMS}")
    p.add_argument("--tier", help="without --budget: the tier of the single run, hi or lo (default: hi)")
    p.add_argument("--policies", type=_csv(str),
                   help="several runs side by side, e.g. all-hi,all-lo,static-calibrated,dynaexq,oracle")
    p.add_argument("--calibration", help="corpus domains that rank the experts for static-calibrated and dynaexq: "
                                         "prose, code, prose+code, all (default) or none")
    p.add_argument("--limit", type=float, help="documents per task (a fraction below 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="prompts through the checkpoint's chat template (chat models)")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="allow tasks that execute the model's code (humaneval)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (the engine's batch)")
    p.add_argument("--max-len", type=int, help="cache length in tokens (default: the model's context, at most 2048)")
    p.add_argument("--segment", type=int, default=EngineConfig.segment_len,
                   help="positions per scoring chunk and decode steps per segment")
    p.add_argument("--max-gen-toks", type=int, default=256, help="generation length unless a task sets one")
    p.add_argument("--hi", help="HI tier when MODEL is a Hugging Face directory (default: the embedded model's "
                                "int4:g64, otherwise the source dtype)")
    p.add_argument("--lo", help="LO tier when MODEL is a Hugging Face directory (default: int2:g64 / int4)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of sampled generation tasks")
    p.add_argument("--out", default="runs/eval", help="output folder (results.json, report.md, lm-eval results)")
    _add_devices_arg(p)
    _add_runtime_args(p, plan_only=False)
    p.set_defaults(fn=_cmd_eval)

    from dynaexq_jax.server import MAX_BODY_BYTES, REQUEST_TIMEOUT_S
    p = command("serve", "an OpenAI-compatible HTTP server with continuous batching under the runtime "
                         '(needs the serve extra: pip install -e ".[serve]")')
    p.add_argument("model", nargs="?", help="a converted checkpoint or a Hugging Face directory (converted once, "
                                            "with --hi/--lo); default: the embedded model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 serves every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--budget", help=f"device-memory budget, {_BUDGET_FORMS}: runs the DynaExq runtime under it "
                                    "(default: no budget, every expert in the --tier tier)")
    p.add_argument("--tier", help="without --budget: the tier every expert runs in, hi or lo (default: hi)")
    p.add_argument("--max-batch", type=int, default=8, help="batch slots: requests decoded side by side")
    p.add_argument("--max-len", type=int, help="context per slot, prompt plus new tokens (default: the model's, "
                                               "at most 2048)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    p.add_argument("--segment", type=int, default=EngineConfig.segment_len,
                   help="decode steps per segment (requests join and leave at segment boundaries)")
    p.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk,
                   help="prompt tokens per prefill forward")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                                     "(default: $DYNAEXQ_API_KEY, else none)")
    p.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT_S,
                   help="seconds a request may take, queue included")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request body")
    p.add_argument("--served-model-name", help="the model id clients name (default: the checkpoint's folder name)")
    _add_devices_arg(p)
    p.add_argument("--hi", help="HI tier when MODEL is a Hugging Face directory (default: the embedded model's "
                                "int4:g64, otherwise the source dtype)")
    p.add_argument("--lo", help="LO tier when MODEL is a Hugging Face directory (default: int2:g64 / int4)")
    _add_runtime_args(p, plan_only=False)
    p.set_defaults(fn=_cmd_serve)

    p = command("demo", "the end-to-end demo on the default model")
    p.add_argument("--workdir", default="runs/demo", help="where the converted model, stats and plots go")
    p.add_argument("--prompt", action="append", help="repeat for a batch (default: two built-in prompts)")
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

"""The one prepared check for the day a GPU is lent: everything this project wants to know from a
CUDA machine, in one go, in at most 550 s (about 5 minutes expected) on an H200, writing one JSON.

Stages, each in its own child process under a time limit (a failure or a timeout is recorded in
the JSON with what the stage had finished, and the next stage runs):
  env             jax / jaxlib / plugin versions, devices, device memory, memory kinds (pinned host?)
  kernels         correctness of every Pallas kernel configuration on the device, compiled: the
                  kernel tests (tests/test_kernels.py, tests/test_kernels_lowering.py) and the MoE
                  op's conformance cases for the pallas backend (tests/test_moe_backends.py -k pallas)
  kernel_timings  benchmarks/moe_kernels.py's GPU path: Pallas vs XLA vs jax.lax.ragged_dot at
                  Qwen3-30B-A3B expert shapes, bytes/s against the copy bandwidth
  checkpoint      a random Qwen3-30B-A3B-shaped checkpoint at reduced depth, written and converted
                  (bf16/int4) on this machine (it cannot travel: the carry limit is 64 MiB)
  engine_pallas,  the runtime on it under the budget for --fraction HI, one stage per backend: host
  engine_xla      store memory kind, start-up, prefill/decode tok/s, swaps published, copy and drain
                  waits, device stalls, hit rates per layer on a shifting workload; run with the
                  engine's drain-before-publish wait and (where EngineConfig has the switch) without
                  it, comparing tokens and scores: is the wait needed on this backend?

  python benchmarks/gpu_check.py              # on the GPU machine
  python benchmarks/gpu_check.py --reduced    # tiny shapes, interpret mode, on a CPU (the tests run it)

This parent imports no JAX (a JAX client would take most of the GPU's memory for the whole run);
each stage's child does. Writes benchmarks/results/gpu_check.json (--out) and prints a summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale  # noqa: E402  (benchmarks/scale.py: model shapes, checkpoint writing, the shift workload)

STAGES = ("env", "kernels", "kernel_timings", "checkpoint", "engine_pallas", "engine_xla")
# Seconds per stage on the GPU machine: 550 s together, inside one 600 s device command.
LIMITS_S = dict(env=30, kernels=150, kernel_timings=80, checkpoint=110, engine_pallas=110, engine_xla=70)
# The EngineConfig setting that turns the drain-before-publish wait off (runtime/engine.py _publish_ready).
DRAIN_SETTING = "drain_before_publish"


@dataclasses.dataclass(frozen=True)
class Mode:
    """Everything that differs between the GPU run and the reduced CPU run."""
    layers: int
    overrides: dict              # config.json values over Qwen3-30B-A3B's
    pair: tuple[str, str]        # HI, LO formats of the converted checkpoint
    kernel_tests: tuple          # pytest invocations (argument lists)
    kernel_timings: tuple        # benchmarks/moe_kernels.py arguments
    batch: int
    max_len: int
    prompt_len: int
    new_tokens: int
    segment: int
    period: int
    phase_positions: int
    domain_tokens: int
    limits_s: dict


# 2 layers: writing and converting 3.7 GB takes about a minute of the 110 s the stage has.
GPU = Mode(layers=2, overrides={}, pair=("bf16", "int4"),
           kernel_tests=(("tests/test_kernels.py", "tests/test_kernels_lowering.py"),
                         ("tests/test_moe_backends.py", "-k", "pallas")),
           kernel_timings=("--batches", "1,8,32", "--iters", "10"),
           batch=8, max_len=1024, prompt_len=256, new_tokens=64, segment=16, period=32, phase_positions=128,
           domain_tokens=32, limits_s=LIMITS_S)
# Tiny shapes (the Pallas tiles need powers of two >= 16), a couple of kernel cases in interpret mode.
TOY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
           num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=512)
REDUCED = Mode(layers=2, overrides=TOY, pair=("bf16", "int4:g32"),
               kernel_tests=(("tests/test_kernels.py::test_kernels_one_row_and_all_empty_groups",
                              "tests/test_moe_backends.py::test_backend_equals_the_dense_reference[bf16+int4-pallas]"),),
               kernel_timings=("--quick", "--pallas-interpret", "--experts", "8", "--hidden", "64", "--inter", "64",
                               "--batches", "2", "--tiers", "bf16,int4:g32", "--iters", "1"),
               batch=2, max_len=64, prompt_len=8, new_tokens=8, segment=4, period=4, phase_positions=16,
               domain_tokens=4, limits_s={s: 120 for s in STAGES})


# ---- the parent ---------------------------------------------------------------------------------------
def run_stage(stage: str, spec: dict, limit_s: float) -> dict:
    """Run one stage's child under limit_s -> its result with status 'passed', 'failed' or 'timeout'.
    The child saves its result as it goes, so a stage cut short still reports what it finished."""
    result_file = Path(spec["workdir"]) / f".{stage}.json"
    result_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", stage,
                          json.dumps({**spec, "result": str(result_file)})], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    try:
        code = p.wait(timeout=limit_s)
        status = None
    except subprocess.TimeoutExpired:
        p.kill()
        code, status = p.wait(), "timeout"
    out = json.loads(result_file.read_text()) if result_file.is_file() else {}
    out["seconds"] = time.perf_counter() - t0
    out["limit_s"] = limit_s
    if status == "timeout":
        out["error"] = f"stopped after its time limit of {limit_s:.0f} s"
    elif code and "error" not in out:
        out["error"] = f"the stage's process exited with code {code}"
    out["status"] = status or ("failed" if "error" in out else "passed")
    return out


def summary(results: dict) -> str:
    lines = []
    for stage, r in results["stages"].items():
        lines.append(f"{stage:15} {r['status']:8} {r['seconds']:6.1f} s" + (f"  {r['error']}" if "error" in r else ""))
    env = results["stages"].get("env", {})
    if "devices" in env:
        lines.append(f"device: {env['devices'][0]['kind']} ({env['backend']}), jax {env['jax']}, memory kinds "
                     f"{env['memory_kinds']}")
    k = results["stages"].get("kernels", {})
    for run in k.get("runs", []):
        lines.append(f"kernel tests {' '.join(run['args'])}: {run['passed']} passed, {run['failed']} failed, "
                     f"{run['skipped']} skipped" + "".join(f"\n  FAILED {f}" for f in run["failures"][:10]))
    t = results["stages"].get("kernel_timings", {})
    if t.get("results"):
        lines.append(f"MoE op timings (copy bandwidth {t['copy_bytes_per_s'] / 1e9:.0f} GB/s): tier batch backend "
                     "ms GB/s")
        lines += [f"  {r['tier']:10} {r['batch']:3} {r['backend']:10} {r['ms']:8.3f} {r['bytes_per_s'] / 1e9:7.1f}"
                  for r in t["results"]]
    for stage in ("engine_pallas", "engine_xla"):
        e = results["stages"].get(stage, {})
        for label, run in e.get("runs", {}).items():
            c, hit = run.get("counters", {}), run.get("hi_hit_rate", float("nan"))
            lines.append(f"{stage} ({label}): start-up {run.get('engine_s', 0):.1f} s, prefill "
                         f"{run.get('prefill_tok_s', 0):.0f} tok/s, decode {run.get('decode_tok_s', 0):.1f} tok/s, "
                         f"{c.get('promotions', 0)} swaps published, {c.get('device_stalls', 0)} stalls, drain wait "
                         f"{c.get('drain_wait_s', 0) * 1e3:.0f} ms, hit rate {hit:.2f}")
        if "bytes_per_s" in e.get("transfer", {}):
            tr = e["transfer"]
            lines.append(f"{stage}: one HI expert ({tr['expert_bytes'] / 2**20:.1f} MiB) host -> device in "
                         f"{tr['seconds_per_copy'] * 1e3:.2f} ms ({tr['bytes_per_s'] / 1e9:.1f} GB/s)")
        if "drain_verdict" in e:
            lines.append(f"{stage}: {e['drain_verdict']}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reduced", action="store_true", help="tiny shapes and interpret mode (a CPU; the tests)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of: {', '.join(STAGES)}")
    ap.add_argument("--layers", type=int, help="depth of the generated checkpoint (default 2)")
    ap.add_argument("--fraction", type=float, default=0.2, help="share of each layer's experts in HI")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dynaexq-gpu-check"))
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the generated checkpoint")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/gpu_check.json; reduced: "
                                             "gpu_check_reduced.json)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return run_child(*a.child)
    mode = REDUCED if a.reduced else GPU
    stages = a.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown} (use {', '.join(STAGES)})")
    a.workdir.mkdir(parents=True, exist_ok=True)
    spec = dict(reduced=a.reduced, workdir=str(a.workdir), layers=a.layers or mode.layers, fraction=a.fraction,
                checkpoint=str(a.workdir / "converted"), keep=a.keep)
    t0 = time.perf_counter()
    results = dict(benchmark="gpu_check", reduced=a.reduced,
                   created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                   host=dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count()),
                   stages={})
    try:
        for stage in stages:
            print(f"== {stage} (limit {mode.limits_s[stage]} s)", file=sys.stderr, flush=True)
            results["stages"][stage] = run_stage(stage, spec, mode.limits_s[stage])
    finally:
        if not a.keep:
            shutil.rmtree(a.workdir / "hf", ignore_errors=True)
            shutil.rmtree(a.workdir / "converted", ignore_errors=True)
    results["seconds"] = time.perf_counter() - t0
    results["passed"] = all(r["status"] == "passed" for r in results["stages"].values())
    out = a.out or scale.RESULTS / ("gpu_check_reduced.json" if a.reduced else "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(summary(results))
    print(f"wrote {out} ({results['seconds']:.0f} s; {'all stages passed' if results['passed'] else 'FAILURES'})")
    return 0 if results["passed"] else 1


# ---- the children -----------------------------------------------------------------------------------
def run_child(stage: str, spec_json: str) -> int:
    spec = json.loads(spec_json)
    mode = REDUCED if spec["reduced"] else GPU
    result: dict = {}

    def save():
        Path(spec["result"]).write_text(json.dumps(result, default=str))
    try:
        STAGE_FUNCTIONS[stage](spec, mode, result, save)
    except Exception as e:  # recorded in the JSON; the parent goes on with the next stage
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-4000:]
        print(result["traceback"], file=sys.stderr)
    save()
    return 0


def stage_env(spec, mode, result, save):
    import jax
    import numpy as np
    result.update(jax=jax.__version__, jaxlib=importlib.metadata.version("jaxlib"), numpy=np.__version__,
                  backend=jax.default_backend(), python=platform.python_version(), host_cpus=os.cpu_count())
    result["packages"] = {}
    for name in ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-cuda12-pjrt", "jax-cuda13-pjrt", "triton",
                 "orbax-checkpoint", "flax"):
        try:
            result["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            result["packages"][name] = None          # not installed on this machine
    dev = jax.devices()[0]
    result["devices"] = [dict(id=d.id, kind=d.device_kind, platform=d.platform) for d in jax.devices()]
    result["memory_kinds"] = sorted(m.kind for m in dev.addressable_memories())
    stats = dev.memory_stats() or {}
    result["device_memory"] = {k: stats[k] for k in ("bytes_limit", "bytes_in_use", "peak_bytes_in_use") if k in stats}
    result["sanity"] = float(jax.jit(lambda x: (x @ x).sum())(np.ones((256, 256), np.float32)))
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    result["host_memory_bytes"] = int(next(x.split()[1] for x in meminfo if x.startswith("MemTotal"))) * 1024
    result["disk_free_bytes"] = shutil.disk_usage(spec["workdir"]).free
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        result["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()


def junit_outcomes(path: Path) -> dict:
    """pytest's JUnit XML -> passed / failed / skipped counts and the failures' names and messages."""
    out = dict(passed=0, failed=0, skipped=0, failures=[])
    for case in ET.parse(path).getroot().iter("testcase"):
        bad = case.find("failure")
        bad = bad if bad is not None else case.find("error")
        if bad is not None:
            out["failed"] += 1
            out["failures"].append(f"{case.get('name')}: {(bad.get('message') or '')[:300]}")
        elif case.find("skipped") is not None:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def stage_kernels(spec, mode, result, save):
    """The kernel tests as they are, on this machine's default backend: compiled on a GPU,
    interpreted on a CPU (the tests choose; nothing here changes it)."""
    result["runs"] = []
    # Compiling a hundred Triton kernels is CPU-bound: on the GPU machine's cores, in 4 processes
    # (pytest-xdist where installed), each allocating GPU memory as it needs it instead of 75% up front.
    parallel = ["-n", "4"] if not spec["reduced"] and importlib.util.find_spec("xdist") else []
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if parallel else None
    for i, args in enumerate(mode.kernel_tests):
        xml = Path(spec["workdir"]) / f"kernels-{i}.xml"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                               *parallel, *args], cwd=ROOT, capture_output=True, text=True, env=env)
        run = dict(args=list(args), seconds=time.perf_counter() - t0, exit_code=proc.returncode,
                   **junit_outcomes(xml), tail=proc.stdout[-1500:])
        result["runs"].append(run)
        save()
    bad = [r for r in result["runs"] if r["failed"] or r["passed"] == 0 or r["exit_code"] != 0]
    if bad:
        result["error"] = "kernel tests failed: " + "; ".join(
            f"{' '.join(r['args'])}: {r['failed']} failed, {r['passed']} passed" for r in bad)


def stage_kernel_timings(spec, mode, result, save):
    import moe_kernels  # benchmarks/moe_kernels.py
    out = Path(spec["workdir"]) / "moe_kernels.json"
    result.update(moe_kernels.main([*mode.kernel_timings, "--out", str(out)]))
    errs = [r["max_rel_err_vs_reference"] for r in result["results"] if r["max_rel_err_vs_reference"] is not None]
    result["max_rel_err_vs_reference"] = max(errs) if errs else None


def stage_checkpoint(spec, mode, result, save):
    """Write and convert the scale checkpoint (or reuse a kept one)."""
    converted, hf = Path(spec["checkpoint"]), Path(spec["workdir"]) / "hf"
    hi, lo = mode.pair
    cfg = scale.model_config("qwen3-30b-a3b", spec["layers"], mode.overrides)
    result.update(layers=spec["layers"], pair=f"{hi}/{lo}", config=cfg)
    if spec["keep"] and (converted / "metadata.json").is_file():
        result["reused"] = str(converted)
        return
    shutil.rmtree(hf, ignore_errors=True)
    shutil.rmtree(converted, ignore_errors=True)
    result["write"] = scale.child_write(dict(cfg=cfg, out=str(hf), shard_bytes=2 * 10**9))
    save()
    result["convert"] = scale.child_convert(dict(hf=str(hf), out=str(converted), hi=hi, lo=lo))
    shutil.rmtree(hf, ignore_errors=True)


def host_store_kind(engine) -> str:
    """What the host store hands out for an expert: a jax memory kind, or the numpy type (memmap:
    the converted checkpoint's map)."""
    import jax

    from dynaexq_jax.model.moe import HI
    leaf = jax.tree.leaves(engine.store.expert(0, HI, 0))[0]
    return getattr(getattr(leaf, "sharding", None), "memory_kind", None) or type(leaf).__name__


def transfer_probe(engine, copies: int = 17) -> dict:
    """Host-to-device copies of single HI experts through the engine's host store, one at a
    time and waited for (the first is a warm-up): seconds per copy and bytes/s."""
    import jax

    from dynaexq_jax.model.moe import HI
    from dynaexq_jax.runtime.pools import tree_nbytes
    store, E = engine.store, engine.config.num_experts
    experts = [store.expert(0, HI, e % E) for e in range(copies)]
    jax.block_until_ready(store.to_device(experts[0]))
    t0 = time.perf_counter()
    for one in experts[1:]:
        jax.block_until_ready(store.to_device(one))
    per_copy = (time.perf_counter() - t0) / (copies - 1)
    nbytes = tree_nbytes(experts[0])
    return dict(expert_bytes=nbytes, seconds_per_copy=per_copy, bytes_per_s=nbytes / per_copy)


def measure(engine, prompts, streams, mode: Mode, run: dict, save) -> tuple:
    """A warm-up and a timed generation, then the shift workload scored; fills run, saving as it
    goes -> (generated tokens, nll) to compare runs by."""
    def gen():
        return engine.generate(prompts.tolist(), max_new_tokens=mode.new_tokens, stop_tokens=())
    t0 = time.perf_counter()
    gen()
    run["compile_s"] = time.perf_counter() - t0
    res = gen()
    run.update(prefill_tok_s=res.stats.prompt_tokens / res.stats.time_to_first_token_s,
               decode_tok_s=res.stats.decode_tokens_per_s, counters=res.runtime["counters"])
    save()
    scored = engine.score(streams)
    run.update(score_tok_s=scored.tokens_per_s, hi_hit_rate=scored.runtime["hi_hit_rate"],
               score_counters=scored.runtime["counters"],
               hit_after_shift=scale.per_layer_hits(scored.runtime["timeline"],
                                                    lambda step: step > mode.phase_positions))
    save()
    return res.tokens, scored.nll


def drain_verdict(outputs: dict) -> str:
    """outputs: run label -> (tokens, nll). Whether skipping the drain-before-publish wait changed anything."""
    import numpy as np

    def same(a, b):
        return outputs[a][0] == outputs[b][0] and np.array_equal(outputs[a][1], outputs[b][1])
    if not same("drain", "drain_again"):
        return "not reproducible even with the wait: two identical runs differ, so the comparison says nothing"
    if "no_drain" not in outputs:
        return f"reproducible with the wait; without it not run (EngineConfig has no '{DRAIN_SETTING}')"
    if same("drain", "no_drain"):
        return "same tokens and scores without the wait: not needed on this backend, as far as this run shows"
    diff = np.abs(outputs["drain"][1] - outputs["no_drain"][1]).max()
    return f"results differ without the wait (max |nll diff| {diff:.3g}): the wait is needed on this backend"


def stage_engine(backend: str):
    def stage(spec, mode, result, save):
        import numpy as np

        from dynaexq_jax.runtime.budget import budget_for_fraction
        from dynaexq_jax.runtime.config import EngineConfig
        from dynaexq_jax.runtime.engine import Engine
        from dynaexq_jax.serving.checkpoint import load_checkpoint
        t0 = time.perf_counter()
        ckpt = load_checkpoint(spec["checkpoint"])
        result.update(backend=backend, open_s=time.perf_counter() - t0, runs={})
        cfg = ckpt.config
        settings = EngineConfig(batch=mode.batch, max_len=mode.max_len, segment_len=mode.segment,
                                update_period=mode.period, backend=backend)
        result["budget"] = budget = budget_for_fraction(ckpt, spec["fraction"], settings)
        # The run with the wait twice (is the engine reproducible here at all?), then without it.
        runs = {"drain": settings, "drain_again": settings}
        if DRAIN_SETTING in {f.name for f in dataclasses.fields(EngineConfig)}:
            runs["no_drain"] = settings.replace(**{DRAIN_SETTING: False})
        else:
            result["drain_switch"] = f"missing: EngineConfig has no '{DRAIN_SETTING}' setting"
        rng = np.random.default_rng(0)
        prompts = scale.domain_tokens(cfg.vocab_size, mode.domain_tokens, 0, rng, (mode.batch, mode.prompt_len))
        P, width = mode.phase_positions, mode.domain_tokens
        streams = np.concatenate([scale.domain_tokens(cfg.vocab_size, width, 0, rng, (mode.batch, P)),
                                  scale.domain_tokens(cfg.vocab_size, width, 1, rng, (mode.batch, P + 1))], axis=1)
        outputs = {}
        for label, s in runs.items():
            t1 = time.perf_counter()
            engine = Engine(ckpt, budget_bytes=budget, settings=s)
            result["runs"][label] = run = dict(engine_s=time.perf_counter() - t1, n_hi=engine.n_hi,
                                               host_store=host_store_kind(engine))
            if label == "drain":
                try:
                    result["transfer"] = transfer_probe(engine)
                except Exception as e:  # the probe is extra: the runs go on without it
                    result["transfer"] = dict(error=f"{type(e).__name__}: {e}")
            outputs[label] = measure(engine, prompts, streams, mode, run, save)
            del engine                     # its device pools, before the next engine allocates its own
        result["drain_verdict"] = drain_verdict(outputs)
    return stage


STAGE_FUNCTIONS = dict(env=stage_env, kernels=stage_kernels, kernel_timings=stage_kernel_timings,
                       checkpoint=stage_checkpoint, engine_pallas=stage_engine("pallas"),
                       engine_xla=stage_engine("xla"))

if __name__ == "__main__":
    sys.exit(main())

"""Expert parallelism on a forced 4-device CPU mesh (model.moe.sharded, load(devices=N),
Engine with EngineConfig(devices=N)): each layer's experts split across the devices, the rest
replicated; logits and greedy tokens equal one device's; under a budget per device with swaps,
every token equals a one-device model frozen at the same per-expert assignment, each device's
bytes stay within its budget, runs are deterministic and nothing recompiles. JAX fixes its
device count at start-up, so the checks run in a subprocess."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    import dynaexq_jax
    from dynaexq_jax.errors import RuntimeConfigError
    path, out = sys.argv[1], {}
    ids = np.random.default_rng(0).integers(1, 256, (2, 20))
    prompts = [[5, 17, 99, 3], [200, 1, 42, 7, 8, 9]]
    for backend in ("xla", "xla-only"):
        one = dynaexq_jax.load(path, backend=backend)
        ref, want = one.logits(ids), one.generate(prompts, max_new_tokens=12, stop_tokens=()).tokens
        for n in (2, 4):
            m = dynaexq_jax.load(path, backend=backend, devices=n)
            out[f"{backend}/{n}"] = dict(
                err=float(np.abs(m.logits(ids) - ref).max() / np.abs(ref).max()),
                same_tokens=m.generate(prompts, max_new_tokens=12, stop_tokens=()).tokens == want)
    m = dynaexq_jax.load(path, devices=4)
    layer = m.params.layers[0].mlp.experts
    pool = layer.pools[0]
    out["shard_slots"] = sorted({s.data.shape[0] for s in pool.gate.data.addressable_shards})
    out["shard_devices"] = len({s.device for s in pool.gate.data.addressable_shards})
    out["tier_replicated"] = len(layer.tier.addressable_shards)
    per_device = {}
    for a in jax.tree.leaves(m.params):
        for s in a.addressable_shards:
            per_device[str(s.device)] = per_device.get(str(s.device), 0) + s.data.nbytes
    out["per_device_bytes"] = per_device
    experts = [l.mlp.experts for l in one.params.layers]
    out["expert_bytes"] = sum(a.nbytes for a in jax.tree.leaves(experts))
    out["all_bytes"] = sum(a.nbytes for a in jax.tree.leaves(one.params))
    errors = []
    for bad in (lambda: dynaexq_jax.load(path, devices=3), lambda: dynaexq_jax.load(path, devices=8)):
        try:
            bad()
        except RuntimeConfigError as e:
            errors.append(str(e))
    out["errors"] = errors
    print("RESULT " + json.dumps(out))
''')


ENGINE_CHECK = textwrap.dedent('''
    import gc, json, sys
    import jax, numpy as np
    from dynaexq_jax.model.families import qwen3_moe
    from dynaexq_jax.runtime.budget import budget_for_fraction
    from dynaexq_jax.runtime.config import EngineConfig
    from dynaexq_jax.runtime.engine import Engine
    from dynaexq_jax.runtime.pools import DevicePools
    from dynaexq_jax.serving.checkpoint import attach_experts, load_checkpoint
    from tests.test_runtime import RandomSwaps
    ckpt, out = load_checkpoint(sys.argv[1]), {}
    cfg, SEG, MAX_LEN = ckpt.config, 4, 128
    prompts = [[5, 17, 99, 3, 8, 8, 1], [200, 1, 42, 7, 8, 9, 100, 3, 2]]
    settings = EngineConfig(policy="all-hi", batch=2, max_len=MAX_LEN, segment_len=SEG)

    def tokens(n, **kw):
        s = settings.replace(devices=n, **kw)
        e = Engine(ckpt, budget_bytes=budget_for_fraction(ckpt, 1.0 if s.policy == "all-hi" else 0.5, s), settings=s)
        return e, e.generate(prompts, max_new_tokens=16, stop_tokens=())
    _, one = tokens(1)
    out["all_hi_equal"] = {n: tokens(n)[1].tokens == one.tokens for n in (2, 4)}

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    runs = []
    for seed in (7, 7):
        eng, _ = tokens(4, policy=RandomSwaps(seed), backend="xla-only")
        eng.generate([prompts[1]], max_new_tokens=12, stop_tokens=())      # warm-up at batch 1
        warm = len(compiles)
        res = eng.generate([prompts[0]], max_new_tokens=20, stop_tokens=())
        runs.append(dict(tokens=res.tokens, published=[t["published"] for t in eng.timeline],
                         compiles=len(compiles) - warm, promotions=res.runtime["counters"]["promotions"],
                         stalls=res.runtime["counters"]["device_stalls"],
                         max_owned=max(t["owned_bytes"] for t in eng.timeline), for_owned=eng.budget_for_owned,
                         budget=eng.plan.budget, n_hi=list(eng.n_hi)))
    out["runs"] = runs
    gc.collect()                 # the earlier engines' arrays: only the last engine's stay live
    per = {d: 0 for d in jax.devices()}
    for a in jax.live_arrays():
        for sh in a.addressable_shards:
            per[sh.device] += sh.data.nbytes
    out["live_device_bytes"] = sorted(per.values())

    # Every token equals a one-device model frozen at the assignment that served it, decoding with
    # the same cache (whose earlier positions earlier assignments wrote). Plain XLA on both sides:
    # the CPU kernel's int8 activations could round a value on a code boundary either way when the
    # devices' partial sums add up in another order.
    forward = jax.jit(qwen3_moe.forward, static_argnames=("cfg", "backend"))
    dense = jax.device_put(ckpt.params, jax.devices()[0])
    toks = res.tokens[0]
    masks = [np.array(t["served_hi_mask"], bool) for t in eng.timeline]
    served = [masks[0] if j == 0 else masks[1 + (j - 1) // SEG] for j in range(len(toks))]

    def frozen(mask):
        pools = DevicePools(eng.store, [set(np.flatnonzero(m)) for m in mask], cfg.num_experts)
        return attach_experts(dense, dict(zip(cfg.moe_layers, pools.expert_pools())))
    cache, bad = qwen3_moe.init_cache(cfg, 1, MAX_LEN), []
    inputs = [prompts[0]] + [[t] for t in toks[:-1]]
    for j, ids in enumerate(inputs):
        logits, cache, _ = forward(frozen(served[j]), cfg, np.asarray([ids], np.int32), cache, backend="xla-only")
        if int(np.argmax(np.asarray(logits[0, -1]))) != toks[j]:
            bad.append(j)
    out["frozen_mismatches"], out["assignments"] = bad, len({m.tobytes() for m in masks})
    print("RESULT " + json.dumps(out))
''')


# The same program in one process of 4 devices, or in each of 2 processes of 2 devices joined by
# jax.distributed (argv: checkpoint, process id, process count, coordinator port).
PROCESSES_CHECK = textwrap.dedent('''
    import gc, json, sys
    import jax, numpy as np
    path, pid, count, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if count > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")     # CPU collectives across processes
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=count, process_id=pid)
    import dynaexq_jax
    from dynaexq_jax.runtime.engine import Engine
    prompts, out = [[5, 17, 99, 3, 8, 8, 1], [200, 1, 42, 7, 8, 9, 100, 3, 2]], {}
    m = dynaexq_jax.load(path, devices=4)
    out["one_tier"] = m.generate(prompts, max_new_tokens=12, stop_tokens=()).tokens
    del m
    gc.collect()
    eng = Engine(path, budget_bytes="50%", devices=4, batch=2, max_len=128, segment_len=4, update_period=4,
                 backend="xla-only")
    res = eng.generate(prompts, max_new_tokens=24, stop_tokens=())
    c = res.runtime["counters"]
    mine = {d: 0 for d in jax.local_devices()}
    for a in jax.live_arrays():
        for sh in a.addressable_shards:
            mine[sh.device] += sh.data.nbytes
    out.update(budgeted=res.tokens, promotions=c["promotions"], stalls=c["device_stalls"],
               published=[t["published"] for t in eng.timeline], budget=eng.plan.budget,
               local_devices=len(mine), device_bytes=sorted(mine.values()))
    print("RESULT " + json.dumps(out))
''')


# `dynaexq compare` and `dynaexq eval` on 2 devices (argv: a converted default model, an output
# folder), with the comparison's one-device run of the same configuration as the reference.
HARNESS_CHECK = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from dynaexq_jax.cli import main
    from dynaexq_jax.experiments.compare import CompareConfig, Harness
    model, out = sys.argv[1], Path(sys.argv[2])
    rc = [main(["compare", model, "--out", str(out / "two"), "--devices", "2", "--baselines", "", "--budget", "25%",
                "--rows", "2", "--phase-tokens", "64", "--chunk", "8", "--window", "64", "--period", "16",
                "--throughput-batches", "", "--policies", "dynaexq,oracle"])]
    one = Harness(model, CompareConfig(budget="25%", rows=2, phase_tokens=64, chunk=8, window=64, period=16,
                                       throughput_batches=(), policies=("dynaexq", "oracle"))).run(out / "one")
    rc.append(main(["eval", model, "--tasks", "dynaexq_prose_choice", "--limit", "4", "--budget", "25%",
                    "--batch-size", "4", "--max-len", "256", "--policy", "dynaexq", "--devices", "2",
                    "--out", str(out / "eval")]))
    two = json.loads((out / "two" / "results.json").read_text())
    ev = json.loads((out / "eval" / "results.json").read_text())
    print("RESULT " + json.dumps(dict(
        rc=rc, ppl_two={k: v["ppl"]["overall"] for k, v in two["policies"].items()},
        ppl_one={k: v["ppl"]["overall"] for k, v in one["policies"].items()},
        n_hi=[two["budget"]["n_hi"], one["budget"]["n_hi"]], report=(out / "two" / "report.md").read_text(),
        promotions={k: v["counters"]["promotions"] for k, v in two["policies"].items()},
        stalls=max(v["counters"]["device_stalls"] for v in two["policies"].values()),
        eval={k: v["runtime"]["counters"]["promotions"] for k, v in ev["runs"].items()})))
''')


def run_on_devices(n: int, *args, script: str = CHECK) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_experts_split_across_four_cpu_devices_give_one_devices_logits_and_tokens(tiny_ckpt):
    out = run_on_devices(4, tiny_ckpt.path)
    for key in ("xla/2", "xla/4", "xla-only/2", "xla-only/4"):
        assert out[key]["err"] < 1e-5 and out[key]["same_tokens"], (key, out[key])
    assert out["shard_slots"] == [2] and out["shard_devices"] == 4      # 8 experts, 2 per device
    assert out["tier_replicated"] == 4
    sizes = sorted(out["per_device_bytes"].values())
    # Each device: the replicated dense parameters and assignment, and a quarter of the expert pools.
    dense = out["all_bytes"] - out["expert_bytes"]
    pools = out["expert_bytes"] - 2 * 4 * 8 * 3          # the assignment: tier + slot, int32 [8], 3 layers
    assert sizes == [dense + 2 * 4 * 8 * 3 + pools // 4] * 4, (sizes, dense, pools)
    assert "do not split evenly across 3 devices" in out["errors"][0]
    assert "devices=8, but JAX sees 4 cpu device(s)" in out["errors"][1]


def test_the_budgeted_runtime_on_four_devices_keeps_its_invariants_per_device(tiny_ckpt):
    out = run_on_devices(4, tiny_ckpt.path, script=ENGINE_CHECK)
    assert out["all_hi_equal"] == {"2": True, "4": True}
    a, b = out["runs"]
    assert a["tokens"] == b["tokens"] and a["published"] == b["published"], "not deterministic"
    assert a["promotions"] > 0 and a["stalls"] == 0 and a["compiles"] == 0, a
    assert a["max_owned"] <= a["for_owned"] and a["n_hi"] == [1] * 3      # half of each device's 2 experts
    assert max(out["live_device_bytes"]) <= a["budget"], out["live_device_bytes"]
    assert out["assignments"] > 2 and out["frozen_mismatches"] == [], out


def test_generate_devices_from_the_command_line(tmp_path):
    """`dynaexq generate --devices 2` on the default model: the tokens of one device; under a budget
    per device; `dynaexq serve --devices 2` answers."""
    from dynaexq_jax.experiments import default_model
    model = default_model.converted_model(None, tmp_path / "converted", progress=False)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

    def generate(*options):
        stats = tmp_path / "stats.json"
        proc = subprocess.run([sys.executable, "-m", "dynaexq_jax.cli", "generate", str(model), "--prompt",
                               "def f(x):", "--max-new-tokens", "12", "--stats", str(stats), *options], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        return proc, json.loads(stats.read_text())["tokens"] if proc.returncode == 0 else None
    (one, want), (two, got) = generate(), generate("--devices", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert got == want and len(got[0]) == 12
    proc, budgeted = generate("--devices", "2", "--budget", "50%", "--period", "4", "--segment", "4")
    assert proc.returncode == 0 and "device stalls 0" in proc.stdout and "HI slots per layer [8," in proc.stdout, \
        proc.stdout + proc.stderr
    # The server on the same mesh: its greedy text is generate's (every expert HI, no budget).
    import socket
    import time

    import httpx
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "dynaexq_jax.cli", "serve", str(model), "--port", str(port),
                               "--devices", "2", "--max-batch", "2", "--max-len", "128", "--prefill-chunk", "32"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": model.name, "prompt": "def f(x):", "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == len(want[0])
    finally:
        server.terminate()
        server.wait(30)
    proc, _ = generate("--devices", "4")
    assert proc.returncode == 2 and "devices=4, but JAX sees 2 cpu device(s)" in proc.stderr, proc.stderr


def test_two_processes_of_two_devices_run_as_one_process_of_four(tiny_ckpt):
    """jax.distributed on localhost: 2 processes x 2 CPU devices each serve one 4-device mesh (each
    process holding its own devices' experts); the tokens in one tier and under a budget per
    device with dynaexq swaps equal one process of 4 devices, and each process's devices stay
    within the budget."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, "-c", PROCESSES_CHECK, str(tiny_ckpt.path), str(i), "2", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        want = run_on_devices(4, tiny_ckpt.path, 0, 1, 0, script=PROCESSES_CHECK)
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:          # one that failed leaves the other waiting for it
            if p.poll() is None:
                p.kill()
    results = []
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(next(x for x in stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):]))
    assert want["promotions"] > 0 and want["stalls"] == 0 and want["local_devices"] == 4
    for got in results:
        assert got["local_devices"] == 2
        for key in ("one_tier", "budgeted", "promotions", "published", "stalls"):
            assert got[key] == want[key], key
        assert max(got["device_bytes"]) <= got["budget"]


def test_compare_and_eval_on_two_devices(tmp_path):
    """`dynaexq compare --devices 2` (dynaexq and the oracle, whose trace is read by shards) and
    `dynaexq eval --devices 2` (dynaexq): the budget is each device's (25% of its 16 experts per layer), the
    all-HI and all-LO perplexities equal one device's, the policies swap without stalls."""
    from dynaexq_jax.experiments import default_model
    model = default_model.converted_model(None, tmp_path / "converted", progress=False)
    out = run_on_devices(2, model, tmp_path / "runs", script=HARNESS_CHECK)
    assert out["rc"] == [0, 0]
    assert out["n_hi"] == [[4] * 6, [8] * 6]
    for name in ("all-hi", "all-lo"):
        assert abs(out["ppl_two"][name] / out["ppl_one"][name] - 1) < 1e-4, (name, out)
    assert out["ppl_two"]["all-hi"] < out["ppl_two"]["dynaexq"] < out["ppl_two"]["all-lo"]
    assert out["promotions"]["dynaexq"] > 0 and out["promotions"]["oracle"] > 0 and out["stalls"] == 0
    assert list(out["eval"]) == ["dynaexq"] and out["eval"]["dynaexq"] > 0
    assert "on each of 2 devices" in out["report"] and "HI slots per layer [4, 4, 4, 4, 4, 4] of 16" in out["report"]

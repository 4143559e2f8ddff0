"""Expert parallelism on a forced 4-device CPU mesh (model.moe.sharded, load(devices=N)): each
layer's experts split across the devices, the rest replicated; logits and greedy tokens equal one
device's. JAX fixes its device count at start-up, so the checks run in a subprocess."""
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


def run_on_devices(n: int, *args) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
    proc = subprocess.run([sys.executable, "-c", CHECK, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
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


def test_generate_devices_from_the_command_line(tmp_path):
    """`dynaexq generate --devices 2` on the default model: the tokens of one device; with --budget
    (the runtime is one device's so far) an error."""
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
    proc, _ = generate("--devices", "2", "--budget", "50%")
    assert proc.returncode == 2 and "--devices runs without --budget" in proc.stderr, proc.stderr
    proc, _ = generate("--devices", "4")
    assert proc.returncode == 2 and "devices=4, but JAX sees 2 cpu device(s)" in proc.stderr, proc.stderr

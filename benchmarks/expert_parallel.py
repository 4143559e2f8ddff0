"""Expert parallelism on a forced CPU mesh (model.moe.sharded): decode step time and prefill time
against the device count, and the bytes each step moves between devices, on the bench config
(random weights) with every expert in one tier. Writes benchmarks/results/expert_parallel.json.

On one CPU the "devices" share the same cores and memory, so this measures the partitioning's
overhead (a psum per MoE layer, per-device kernel calls), not a speed-up: on a GPU node each
device streams only its share of the experts (1/N of the expert bytes per step) while the psum
moves T x H x 4 bytes per MoE layer, 2 (N - 1) / N of it over each device's links (a ring
all-reduce). The script re-runs itself once per device count (JAX fixes the count at start).

It also times one MoE layer's op both ways a mesh can combine the experts' work, side by side on
the same routed tokens: the runtime's (tokens replicated, one psum of [T, H]) and all-to-all
dispatch (moe_all_to_all: each token's pairs sent to the devices of their experts and back)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def moe_all_to_all(x, ids, weights, experts, local_op):
    """The alternative to model.moe.sharded's replicated tokens + psum, measured here: each device
    takes T/N of the (replicated) tokens, sends every routed (token, expert) pair to the device
    that holds the expert (one all-to-all of fixed-size buffers: each destination can receive all
    T/N x k pairs, so nothing is dropped and the result is exact), computes its own experts on what
    it received, sends the results back (a second all-to-all), sums each token's pairs and
    all-gathers the rows. Same signature and result as sharded.moe_experts_sharded."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    from dynaexq_jax.model.moe import ExpertPools, sharded
    mesh, n = experts.mesh, experts.mesh.shape[sharded.AXIS]
    T, H = x.shape
    k = ids.shape[1]
    pad = -T % n
    xp, idp = jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(ids, ((0, pad), (0, 0)))
    wp = jnp.pad(weights, ((0, pad), (0, 0)))          # padded rows: weight 0
    r = (T + pad) // n
    C = r * k                                          # pairs per destination, at most

    def local(x, ids, weights, pools, tier, slot):
        d = jax.lax.axis_index(sharded.AXIS)
        xs = jax.lax.dynamic_slice_in_dim(x, d * r, r)
        ids_s = jax.lax.dynamic_slice_in_dim(ids, d * r, r).reshape(-1)
        w_s = jax.lax.dynamic_slice_in_dim(weights, d * r, r).reshape(-1)
        sizes = jnp.array([p.size for p in pools], jnp.int32)          # each device's slots per tier
        owner = slot[ids_s] // sizes[tier[ids_s]]                        # [r k] destination device
        onehot = jax.nn.one_hot(owner, n, dtype=jnp.int32)
        pos = jnp.take_along_axis(jnp.cumsum(onehot, 0) - 1, owner[:, None], 1)[:, 0]
        token = jnp.arange(r * k) // k
        E = tier.shape[0]
        send_x = jnp.zeros((n, C, H), x.dtype).at[owner, pos].set(xs[token])
        send_e = jnp.full((n, C), E, jnp.int32).at[owner, pos].set(ids_s)   # E: an empty entry
        send_w = jnp.zeros((n, C), weights.dtype).at[owner, pos].set(w_s)
        recv_x, recv_e, recv_w = (jax.lax.all_to_all(a, sharded.AXIS, 0, 0) for a in (send_x, send_e, send_w))
        # This device's view, with the empty entry E on an out-of-range tier as well.
        view = sharded.local_view(pools, tier, slot)
        mine = ExpertPools(pools, jnp.append(view.tier, len(pools)), jnp.append(view.slot, 0))
        out = local_op(recv_x.reshape(n * C, H), recv_e.reshape(-1, 1), recv_w.reshape(-1, 1), mine)
        back = jax.lax.all_to_all(out.reshape(n, C, H).astype(jnp.float32), sharded.AXIS, 0, 0)
        rows = jnp.zeros((r, H), jnp.float32).at[token].add(back[owner, pos])
        return jax.lax.all_gather(rows, sharded.AXIS, tiled=True).astype(x.dtype)

    pool_specs = jax.tree.map(lambda _: PartitionSpec(sharded.AXIS), experts.pools)
    rep = PartitionSpec()
    y = jax.shard_map(local, mesh=mesh, in_specs=(rep, rep, rep, pool_specs, rep, rep), out_specs=rep,
                      check_vma=False)(xp, idp, wp, experts.pools, experts.tier, experts.slot)
    return y[:T]


def measure_layer(m, tokens: tuple[int, ...], repeats: int) -> list[dict]:
    """One MoE layer's op alone, both ways (psum, all-to-all) side by side on the same routed
    tokens: the results agree, with the time per call and the bytes each device sends."""
    import jax
    import jax.numpy as jnp

    from dynaexq_jax.model.moe.api import moe_experts
    from dynaexq_jax.model.moe.sharded import AXIS
    cfg = m.config
    experts = next(layer.mlp.experts for layer in m.params.layers if hasattr(layer.mlp, "experts"))
    n, H, k = experts.mesh.shape[AXIS], cfg.hidden_size, cfg.num_experts_per_tok
    local_op = lambda x, ids, w, mine: moe_experts(x, ids, w, mine, "xla")      # noqa: E731
    ways = {"psum": jax.jit(lambda x, i, w, e: moe_experts(x, i, w, e, "xla")),
            "all-to-all": jax.jit(lambda x, i, w, e: moe_all_to_all(x, i, w, e, local_op))}
    rows, rng = [], np.random.default_rng(0)
    for T in tokens:
        x = jnp.asarray(rng.standard_normal((T, H)), jnp.float32)
        ids = jnp.asarray(np.stack([rng.choice(cfg.num_experts, k, replace=False) for _ in range(T)]), jnp.int32)
        w = jnp.asarray(rng.dirichlet(np.ones(k), T), jnp.float32)
        out = {name: jax.block_until_ready(f(x, ids, w, experts)) for name, f in ways.items()}
        times = {name: [] for name in ways}
        for _ in range(repeats):
            for name, f in ways.items():              # alternating, so both see the same machine
                t0 = time.perf_counter()
                jax.block_until_ready(f(x, ids, w, experts))
                times[name].append(time.perf_counter() - t0)
        r = -(-T // n)
        rows.append(dict(devices=n, tokens=T, psum_ms=1e3 * min(times["psum"]),
                         all_to_all_ms=1e3 * min(times["all-to-all"]),
                         max_abs_diff=float(jnp.abs(out["psum"] - out["all-to-all"]).max()),
                         # Bytes each device sends per call: a ring all-reduce of [T, H] f32; the two
                         # all-to-alls of n buffers of T/N x k pairs (activation + id + weight out,
                         # the f32 result back, the own buffer staying) and the all-gather of its rows.
                         psum_bytes=int(2 * (n - 1) / n * T * H * 4),
                         all_to_all_bytes=(n - 1) * r * k * (H * 4 + 8) + (n - 1) * r * k * H * 4
                         + (n - 1) * r * H * 4))
    return rows


def measure(devices: int, model: str, batch: int, new_tokens: int, repeats: int) -> dict:
    import jax

    import dynaexq_jax
    m = dynaexq_jax.load(model, devices=None if devices == 1 else devices)
    cfg = m.config
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (batch, 64)).tolist()
    m.generate(prompts, max_new_tokens=new_tokens, stop_tokens=())          # compiles
    best = None
    for _ in range(repeats):
        res = m.generate(prompts, max_new_tokens=new_tokens, stop_tokens=())
        if best is None or res.stats.decode_s < best.stats.decode_s:
            best = res
    psum = len(cfg.moe_layers) * batch * cfg.hidden_size * 4         # one [T, H] f32 all-reduce per MoE layer
    experts = sum(a.nbytes for layer in m.params.layers if hasattr(layer.mlp, "experts")
                  for a in jax.tree.leaves(layer.mlp.experts))
    return dict(devices=devices, batch=batch, decode_tok_s=best.stats.decode_tokens_per_s,
                decode_step_ms=1e3 * best.stats.decode_s / max(1, best.stats.decode_tokens // batch),
                ttft_ms=1e3 * best.stats.time_to_first_token_s, psum_bytes_per_step=psum,
                ring_bytes_per_device_per_step=int(psum * 2 * (devices - 1) / devices),
                expert_bytes_per_device=experts // devices, tokens=best.tokens[0][:8])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="1,2,4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layer-tokens", default="1,8,64,256", help="tokens of the one-layer psum / all-to-all runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "expert_parallel.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)     # a converted model: measure on this process's devices
    a = ap.parse_args()
    if a.child:
        import dynaexq_jax
        n = int(os.environ["DYNAEXQ_BENCH_DEVICES"])
        layer = [] if n == 1 else measure_layer(dynaexq_jax.load(a.child, devices=n),
                                                tuple(int(t) for t in a.layer_tokens.split(",")), 5 * a.repeats)
        print("RESULT " + json.dumps(dict(model=[measure(n, a.child, int(b), a.new_tokens, a.repeats)
                                                 for b in a.batches.split(",")], layer=layer)))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import write_result

    from checkpoints_convert import convert
    from dynaexq_jax.experiments.synthetic import BENCH_CONFIG, write_random_qwen3_moe
    rows, layer = [], []
    with tempfile.TemporaryDirectory() as tmp:
        hf = write_random_qwen3_moe(Path(tmp) / "hf", seed=0, tokenizer=False, **BENCH_CONFIG)
        model = convert(hf, Path(tmp) / "conv", lo="int4", progress=False)
        for n in (int(x) for x in a.devices.split(",")):
            env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
                   "DYNAEXQ_BENCH_DEVICES": str(n)}
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", str(model), "--batches", a.batches,
                                   "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats),
                                   "--layer-tokens", a.layer_tokens],
                                  env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            got = json.loads(line[len("RESULT "):])
            rows += got["model"]
            layer += got["layer"]
            print(f"{n} device(s) measured in {time.perf_counter() - t0:.0f}s", flush=True)
    same = all(len({json.dumps(r["tokens"]) for r in rows if r["batch"] == b}) == 1 for b in {r["batch"] for r in rows})
    print("| devices | batch | decode tok/s | step ms | TTFT ms | psum bytes / step | ring bytes / device / step "
          "| expert bytes / device |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['devices']} | {r['batch']} | {r['decode_tok_s']:.0f} | {r['decode_step_ms']:.2f} | "
              f"{r['ttft_ms']:.0f} | {r['psum_bytes_per_step']:,} | {r['ring_bytes_per_device_per_step']:,} | "
              f"{r['expert_bytes_per_device'] / 2**20:.1f} MiB |")
    print(f"same greedy tokens on every device count: {same}")
    print("\none MoE layer: replicated tokens + psum (the runtime's) against all-to-all dispatch")
    print("| devices | tokens | psum ms | all-to-all ms | all-to-all / psum | psum bytes sent / device "
          "| all-to-all bytes sent / device | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in layer:
        print(f"| {r['devices']} | {r['tokens']} | {r['psum_ms']:.2f} | {r['all_to_all_ms']:.2f} | "
              f"{r['all_to_all_ms'] / r['psum_ms']:.2f}x | {r['psum_bytes']:,} | {r['all_to_all_bytes']:,} | "
              f"{r['max_abs_diff']:.1e} |")
    write_result(a.out, config="bench (benchmarks/engine.py's BENCH_CONFIG), f32 HI tier, one tier",
                 rows=rows, same_tokens=same, layer=layer)


if __name__ == "__main__":
    main()

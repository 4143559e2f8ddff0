"""MoE expert-FFN timings at Qwen3-30B-A3B expert shapes (hidden 2048, moe_intermediate 768,
128 experts, top-8), per tier format, decode batch sizes.

  CPU: times the default "xla" backend (dynaexq_jax.model.moe.moe_experts_xla, which calls the CPU
       kernel, dynaexq_jax/model/moe/csrc/moe_cpu.cc, for the routed experts) beside "xla-only" (plain XLA).
  GPU: times the Pallas op (dynaexq_jax.model.moe.moe_experts_pallas) per tier beside the "xla"
       backend (plain XLA there: gathers, grouped blocks or the dense product) and, for bf16, an
       equivalent op on jax.lax.ragged_dot; checks each Pallas result against the dense reference.

Decode is memory-bound, so the figure of merit is the bytes of routed expert weights (unique
experts touched x bytes per expert in that format, scales included) read per second, set against
the device's copy bandwidth ((read + write bytes) / time of a large jnp copy) measured in the same
run. Plain XLA on the CPU gathers (copies) the routed experts or reads every slot of the pool;
its table shows routed bytes the same way.

  python benchmarks/moe_kernels.py            # full sizes
  python benchmarks/moe_kernels.py --quick    # fewer experts and batches (CPU: a couple of minutes)
  python benchmarks/moe_kernels.py --quick --pallas-interpret --experts 8 --hidden 256 --inter 128
                                              # run the GPU code path in interpret mode (script check)
Writes benchmarks/results/moe_kernels_<device>.json.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import pathlib
import re
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dynaexq_jax.model.moe import (  # noqa: E402
    ExpertPools,
    TierPool,
    moe_experts_pallas,
    moe_experts_reference,
    moe_experts_xla,
    route,
)
from dynaexq_jax.model.quant import QTensor, expert_nbytes, parse_format  # noqa: E402
from pallas_kernels.grouped_matmul import TileConfig  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def random_qtensor(key, fmt, slots, k, n) -> QTensor:
    """Random weights directly in packed form (any byte is a valid packed value): no host quantization."""
    kd, ks = jax.random.split(key)
    if not fmt.is_int:
        return QTensor((0.02 * jax.random.normal(kd, (slots, k, n), jnp.float32)).astype(fmt.storage_dtype), None, fmt)
    data = jax.random.randint(kd, (slots, fmt.packed_rows(k), n), 0, 256, jnp.int32).astype(jnp.uint8)
    scales = (0.02 / fmt.qmax * jax.random.uniform(ks, (slots, k // fmt.group_for(k), n), jnp.float32, 0.5, 1.5))
    return QTensor(data, scales.astype(jnp.float16), fmt)


def random_pool(key, fmt, experts, hidden, inter) -> ExpertPools:
    kg, ku, kd = jax.random.split(key, 3)
    pool = TierPool(random_qtensor(kg, fmt, experts, hidden, inter), random_qtensor(ku, fmt, experts, hidden, inter),
                    random_qtensor(kd, fmt, experts, inter, hidden))
    return ExpertPools((pool,), jnp.zeros((experts,), jnp.int32), jnp.arange(experts, dtype=jnp.int32))


def moe_ragged_dot(x, ids, weights, gate, up, down):
    """The same op on jax.lax.ragged_dot (float weights [E, H, I], [E, H, I], [E, I, H])."""
    t, k = ids.shape
    e = ids.reshape(-1)
    order = jnp.argsort(e, stable=True)
    sizes = jnp.zeros((gate.shape[0],), jnp.int32).at[e].add(1)
    xs = x[order // k]
    g = jax.lax.ragged_dot(xs, gate, sizes, preferred_element_type=jnp.float32)
    u = jax.lax.ragged_dot(xs, up, sizes, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    y = jax.lax.ragged_dot(h, down, sizes, preferred_element_type=jnp.float32)
    y = y * weights.reshape(-1)[order].astype(jnp.float32)[:, None]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return y[inverse].reshape(t, k, -1).sum(1).astype(x.dtype)


def time_per_call(fn, inputs, iters: int) -> float:
    """Median over `iters` rounds of (wall time of one asynchronous call per input set, then one
    block) / number of sets. Cycling through different routings keeps the touched experts from
    sitting in L2 between calls, and async dispatch keeps Python out of small decode steps."""
    for args in inputs:
        jax.block_until_ready(fn(*args))                  # compile + warm up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for args in inputs:
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / len(inputs))
    return statistics.median(times)


def copy_bandwidth(nbytes: int, iters: int) -> float:
    """(read + write) bytes/s of an elementwise pass over a large array."""
    a = jnp.ones((nbytes // 4,), jnp.float32)
    return 2 * a.nbytes / time_per_call(jax.jit(lambda a: a + 1.0), [(a,)], iters)


def device_name() -> str:
    d = jax.devices()[0]
    return re.sub(r"[^a-z0-9]+", "_", (d.device_kind if d.platform == "gpu" else d.platform).lower()).strip("_")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 experts, batches 1,8,32, fewer iterations")
    ap.add_argument("--experts", type=int)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--batches", help="comma-separated batch sizes (default 1,4,8,16,32)")
    ap.add_argument("--tiers", default="bf16,int8,int4,int2")
    ap.add_argument("--iters", type=int)
    ap.add_argument("--reps", type=int, help="different routed batches cycled per timing round "
                    "(default 16 on GPU, 1 on CPU)")
    ap.add_argument("--tiles", help="block_m,block_n,block_k,num_warps,num_stages for the Pallas op")
    ap.add_argument("--pallas-interpret", action="store_true",
                    help="run the GPU (Pallas) code path in interpret mode on a CPU: checks the script, times nothing")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/moe_kernels_<device>.json)")
    args = ap.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    pallas = on_gpu or args.pallas_interpret
    experts = args.experts or (16 if args.quick else 128)
    batches = [int(b) for b in (args.batches or ("1,8,32" if args.quick else "1,4,8,16,32")).split(",")]
    iters = args.iters or (3 if args.quick or not on_gpu else 20)
    reps = args.reps or (16 if on_gpu else 1)
    tiles = TileConfig(*map(int, args.tiles.split(","))) if args.tiles else None
    h, i, k = args.hidden, args.inter, args.top_k
    key = jax.random.key(0)

    copy_bw = copy_bandwidth((1 << 30) if on_gpu else (256 << 20), max(iters, 5))
    print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"experts {experts} x [{h} x {i}], top-{k}; copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    header = (f"{'tier':10} {'batch':>5} {'backend':12} {'ms/call':>9} {'experts':>7} {'MB read':>8} {'GB/s':>8} "
              f"{'% copy':>7} {'max rel err':>11}")
    print(header + "\n" + "-" * len(header))

    rows = []
    for t, tier in enumerate(args.tiers.split(",")):
        fmt = parse_format(tier)
        experts_pools = random_pool(jax.random.fold_in(key, 1000 + t), fmt, experts, h, i)
        per_expert = expert_nbytes(fmt, h, i)
        backends = {}
        if pallas:
            backends["pallas"] = lambda x, ids, w, ex: moe_experts_pallas(
                x, ids, w, ex, interpret=args.pallas_interpret, tiles=tiles)
            backends["xla"] = moe_experts_xla
            if fmt.kind == "bf16":
                backends["ragged_dot"] = lambda x, ids, w, ex: moe_ragged_dot(
                    x, ids, w, ex.pools[0].gate.data, ex.pools[0].up.data, ex.pools[0].down.data)
        else:
            backends["xla"] = moe_experts_xla
            backends["xla-only"] = lambda x, ids, w, ex: moe_experts_xla(x, ids, w, ex, use_kernel=False)
        for b, batch in enumerate(batches):
            kx, kr = jax.random.split(jax.random.fold_in(key, batch))
            xs = (0.5 * jax.random.normal(kx, (reps, batch, h), jnp.float32)).astype(jnp.bfloat16)
            router = jax.random.normal(kr, (h, experts), jnp.float32)
            route_one = functools.partial(route, router=router, top_k=k, norm_topk_prob=True)
            ids, ws, _ = jax.vmap(route_one)(xs)          # [reps, batch, k]
            inputs = [(xs[r], ids[r], ws[r], experts_pools) for r in range(reps)]
            unique = float(np.mean([len(np.unique(np.asarray(ids[r]))) for r in range(reps)]))
            nbytes = unique * per_expert
            err = None
            if pallas and b == 0:    # one correctness check per tier, against the dense reference
                got = jax.jit(backends["pallas"])(*inputs[0]).astype(jnp.float32)
                want = jax.jit(moe_experts_reference)(*inputs[0]).astype(jnp.float32)
                err = float(jnp.abs(got - want).max() / jnp.maximum(jnp.abs(want).max(), 1e-6))
            for name, op in backends.items():
                sec = time_per_call(jax.jit(op), inputs, iters)
                row = dict(tier=fmt.name, batch=batch, backend=name, ms=sec * 1e3, unique_experts=unique,
                           weight_bytes=nbytes, bytes_per_s=nbytes / sec, fraction_of_copy_bw=nbytes / sec / copy_bw,
                           max_rel_err_vs_reference=err if name == "pallas" else None)
                rows.append(row)
                e = "-" if row["max_rel_err_vs_reference"] is None else f"{err:.2e}"
                print(f"{fmt.name:10} {batch:5d} {name:12} {row['ms']:9.3f} {unique:7.1f} {nbytes / 1e6:8.1f} "
                      f"{row['bytes_per_s'] / 1e9:8.1f} {100 * row['fraction_of_copy_bw']:6.1f}% {e:>11}")

    result = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
        jaxlib=importlib.metadata.version("jaxlib"), host_cpus=os.cpu_count(), host_load_average=os.getloadavg(),
        quick=args.quick, pallas_interpret=args.pallas_interpret,
        shapes=dict(experts=experts, hidden=h, inter=i, top_k=k), iters=iters, reps=reps,
        tiles=None if tiles is None else tiles.__dict__, copy_bytes_per_s=copy_bw, results=rows)
    out = pathlib.Path(args.out) if args.out else RESULTS / f"moe_kernels_{device_name()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

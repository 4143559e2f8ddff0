"""Replaying a recorded router trace through a policy, without a model: the controller loop of
the engine (hotness EMA, updates every period, swaps started and published through the same
TransferSchedule) on a trace f32 [chunks, L_moe, E] of per-chunk mean routed mass. Cheap enough
to compare many policies, budgets and transfer limits on the same trace, and the ground for
sanity checks with a known hot set (shifting_trace)."""
from __future__ import annotations

import numpy as np

from dynaexq_jax.runtime.policies import Policy
from dynaexq_jax.runtime.transfers import TransferSchedule
from dynaexq_jax.serving.hotness import ALPHA, ema_update


def replay(policy: Policy, trace: np.ndarray, n_hi: list[int], *, chunk: int, alpha: float = ALPHA,
           ranking: np.ndarray | None = None, schedule: TransferSchedule | None = None) -> dict:
    """Hit rates (the share of routed mass served by HI experts) per chunk and per layer, and
    swap counts. As in the engine's deterministic mode, the swaps started at the boundary after
    chunk b are published at the next boundary, and chunk b + 2 is already dispatched by then, so
    chunk b + 3 is the first they serve. schedule: the transfer limit (default: unlimited, every
    planned swap starts at once). The EMA sees each chunk's mean mass for `chunk` steps (hotness.py).

    Returns hit_rate [chunks] (over all layers, mass-weighted), layer_hit_rate [chunks, L_moe],
    mean_hit_rate, swaps, layer_swaps [L_moe] and swaps_planned."""
    trace = np.asarray(trace, np.float64)
    n_chunks, L, E = trace.shape
    schedule = schedule or TransferSchedule(None, 0)
    hi = np.zeros((L, E), bool)
    for l, s in enumerate(policy.initial_hi(n_hi, E, ranking)):
        hi[l, sorted(s)] = True
    served = [hi.copy(), hi.copy()]          # served[i]: the HI sets chunk i runs with
    scores = np.zeros((L, E))
    layer_hits = np.full((n_chunks, L), np.nan)
    layer_swaps = np.zeros(L, np.int64)
    hits, planned, last = [], 0, None
    for i in range(n_chunks):
        mask, mass = served[i], trace[i]
        total = mass.sum()
        hits.append(float((mass * mask).sum() / total) if total > 0 else float("nan"))
        per_layer = mass.sum(1)
        np.divide((mass * mask).sum(1), per_layer, out=layer_hits[i], where=per_layer > 0)
        scores = ema_update(scores, mass, alpha, steps=chunk)
        for s in list(schedule.in_flight):                   # every copy started last boundary has arrived
            hi[s.pos, s.promote], hi[s.pos, s.demote] = True, False
            layer_swaps[s.pos] += 1
            schedule.published(s)
        served.append(hi.copy())
        step = (i + 1) * chunk
        if policy.wants_update(step, last):
            last = step
            swaps = policy.plan(step, scores, schedule.target_hi(hi), n_hi)
            planned += sum(map(len, swaps))
            schedule.replan(swaps, scores)
        schedule.start(hi)
    return {"hit_rate": hits, "layer_hit_rate": layer_hits, "mean_hit_rate": float(np.nanmean(hits)),
            "swaps": int(layer_swaps.sum()), "layer_swaps": layer_swaps.tolist(), "swaps_planned": planned}


def shifting_trace(num_layers: int, num_experts: int, *, top_k: int, hot: int, chunks: int, phase_chunks: int,
                   tokens_per_chunk: int = 16, hot_logit: float = 4.0, seed: int = 0) -> np.ndarray:
    """A synthetic router trace f32 [chunks, L, E] with a known hot set that shifts: in each phase
    of phase_chunks chunks every layer has its own hot set of `hot` experts (drawn per phase and
    layer) whose router logits are raised by hot_logit. Each token routes to the top_k of its
    softmax over Gumbel-noised logits, and a chunk's entry is the mean selected probability mass
    over its tokens (hotness.selected_mass), so each layer's row sums to the mean top-k mass."""
    rng = np.random.default_rng(seed)
    trace = np.zeros((chunks, num_layers, num_experts), np.float32)
    for i in range(chunks):
        phase = i // phase_chunks
        logits = rng.gumbel(size=(num_layers, tokens_per_chunk, num_experts))
        for l in range(num_layers):
            hot_set = np.random.default_rng([seed, phase, l]).choice(num_experts, hot, replace=False)
            logits[l, :, hot_set] += hot_logit
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        kth = np.sort(p, -1)[..., -top_k][..., None]
        trace[i] = np.where(p >= kth, p, 0).mean(1)
    return trace

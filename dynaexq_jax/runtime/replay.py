"""Replaying a recorded router trace through a policy, without a model: the controller loop of
the engine (hotness EMA, updates every period, swaps published after a lag) on a trace
f32 [chunks, L_moe, E] of per-chunk mean routed mass. Cheap enough to compare many policies and
budgets on the same trace, and the ground for sanity checks with a known hot set."""
from __future__ import annotations

import numpy as np

from dynaexq_jax.runtime.policies import Policy
from dynaexq_jax.serving.hotness import ALPHA, ema_update


def replay(policy: Policy, trace: np.ndarray, n_hi: list[int], *, chunk: int, alpha: float = ALPHA,
           lag: int = 3, ranking: np.ndarray | None = None) -> dict:
    """Hit rate per chunk (the share of routed mass served by HI experts) and swap counts.
    Chunk i is served by the HI set decided at boundary i - lag: in the engine a decision taken
    after chunk b is published at the next boundary, and chunk b + 2 is already dispatched by
    then, so chunk b + 3 is the first to see it (lag 3). Transfer limits are not modelled. The
    EMA sees each chunk's mean mass for `chunk` steps (hotness.py)."""
    trace = np.asarray(trace, np.float64)
    n_chunks, L, E = trace.shape
    hi = np.zeros((L, E), bool)
    for l, s in enumerate(policy.initial_hi(n_hi, E, ranking)):
        hi[l, sorted(s)] = True
    served = [hi.copy()] * lag
    scores = np.zeros((L, E))
    hits, swaps, last = [], 0, None
    for i in range(n_chunks):
        mask = served[i] if i < len(served) else served[-1]
        total = trace[i].sum()
        hits.append(float((trace[i] * mask).sum() / total) if total > 0 else float("nan"))
        scores = ema_update(scores, trace[i], alpha, steps=chunk)
        step = (i + 1) * chunk
        if policy.wants_update(step, last):
            last = step
            for l, layer_swaps in enumerate(policy.plan(step, scores, hi, n_hi)):
                for p, d in layer_swaps:
                    if not hi[l, p] and hi[l, d]:
                        hi[l, p], hi[l, d] = True, False
                        swaps += 1
        served.append(hi.copy())
    return {"hit_rate": hits, "mean_hit_rate": float(np.nanmean(hits)), "swaps": swaps}

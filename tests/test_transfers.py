"""The transfer schedule (runtime.transfers): all layers' swaps ranked by benefit, copies in flight
bounded by staging bytes, a new plan re-ranking the queue without wasting copies in flight; the
starvation check on a synthetic 48 x 128 top-8 trace through the same schedule (runtime.replay);
the engine wired to it; and the CLI's split of controller work from device waits."""
import re

import numpy as np
import pytest

from dynaexq_jax.cli import _print_generation
from dynaexq_jax.errors import RuntimeConfigError
from dynaexq_jax.experiments.synthetic import qwen3_moe_config
from dynaexq_jax.model.config import parse_hf_config
from dynaexq_jax.model.moe import HI, LO
from dynaexq_jax.model.quant import parse_format
from dynaexq_jax.runtime.budget import budget_for_fraction, plan_budget
from dynaexq_jax.runtime.config import EngineConfig
from dynaexq_jax.runtime.engine import Engine
from dynaexq_jax.runtime.policies import DynaExqPolicy, Policy
from dynaexq_jax.runtime.pools import tree_nbytes
from dynaexq_jax.runtime.replay import replay, shifting_trace
from dynaexq_jax.runtime.transfers import PlannedSwap, TransferSchedule
from tests.tiny_runtime import BATCH, MAX_LEN, SEG, prompts


# ---- the schedule ------------------------------------------------------------------------------
def two_hi(L=3, E=6):
    hi = np.zeros((L, E), bool)
    hi[:, [0, 1]] = True
    return hi


def test_swaps_of_all_layers_start_by_benefit_while_their_bytes_fit():
    hi = two_hi()
    scores = np.zeros((3, 6))
    scores[0, [2, 3]] = 0.5, 0.1
    scores[1, 2] = 0.9
    scores[2, [2, 3]] = 0.3, 0.2
    m_hi, m_lo = 4, 1
    # Staging for K = 3 copies of the largest expert: two swaps (2 x 5 bytes), where a count of
    # K copies (two per swap) would allow one.
    sched = TransferSchedule(3 * m_hi, m_hi + m_lo)
    sched.replan([[(2, 0), (3, 1)], [(2, 0)], [(2, 0), (3, 1)]], scores)
    assert [(s.pos, s.promote, s.demote) for s in sched.queue] == [(1, 2, 0), (0, 2, 0), (2, 2, 0), (2, 3, 1),
                                                                  (0, 3, 1)]
    assert [s.benefit for s in sched.queue] == pytest.approx([0.9, 0.5, 0.3, 0.2, 0.1])
    first = sched.start(hi)
    assert [(s.pos, s.promote) for s in first] == [(1, 2), (0, 2)] and sched.in_flight_bytes == 10
    assert sched.start(hi) == []                                  # 2 bytes left: no room for a swap
    hi[1, 2], hi[1, 0] = True, False                              # (1, 2, 0) arrived and is published
    sched.published(first[0])
    assert [(s.pos, s.promote) for s in sched.start(hi)] == [(2, 2)]
    assert len(sched.queue) == 2 and sched.in_flight_bytes == 10


def test_equal_benefits_take_the_layers_in_turn():
    sched = TransferSchedule(None, 5)
    sched.replan([[(2, 0), (3, 1)], [(2, 0), (3, 1)], []], np.zeros((3, 6)))
    assert [(s.pos, s.promote) for s in sched.queue] == [(0, 2), (1, 2), (0, 3), (1, 3)]
    assert len(sched.start(two_hi())) == 4                        # unlimited staging: everything starts


def test_a_new_plan_reranks_the_queue_and_keeps_copies_in_flight():
    hi = two_hi(L=2)
    scores = np.zeros((2, 6))
    scores[0, 2], scores[1, [2, 3]] = 0.5, (0.4, 0.3)
    sched = TransferSchedule(5, 5)                                # one swap at a time
    sched.replan([[(2, 0)], [(2, 0), (3, 1)]], scores)
    flying = sched.start(hi)
    assert [(s.pos, s.promote, s.demote) for s in flying] == [(0, 2, 0)]
    # A new plan is made against the HI sets as they will be after the swap in flight ...
    target = sched.target_hi(hi)
    assert target[0, 2] and not target[0, 0] and hi[0, 0]
    # ... here it no longer wants layer 1's (3, 1), still wants (2, 0), wants expert 0 of layer 0
    # back (demoting 2, whose copy is in flight) and a new swap (4, 1) in layer 0.
    scores[0, [0, 4]] = 0.95, 0.3
    sched.replan([[(0, 2), (4, 1)], [(2, 0)]], scores)
    assert sched.in_flight == flying                              # not dropped, still to be published
    assert [(s.pos, s.promote, s.demote) for s in sched.queue] == [(0, 0, 2), (1, 2, 0), (0, 4, 1)]
    assert [s.benefit for s in sched.queue] == pytest.approx([0.45, 0.4, 0.3])
    sched.staging_bytes = 10
    # The best swap touches an expert in flight: it waits, the next one starts in the room left.
    assert [(s.pos, s.promote) for s in sched.start(hi)] == [(1, 2)]
    assert [(s.pos, s.promote) for s in sched.queue] == [(0, 0), (0, 4)]
    hi[0, 2], hi[0, 0] = True, False                              # (0, 2, 0) arrived and is published
    sched.published(flying[0])
    assert [(s.pos, s.promote, s.demote) for s in sched.start(hi)] == [(0, 0, 2)]
    assert [(s.pos, s.promote) for s in sched.queue] == [(0, 4)]


def test_a_swap_whose_experts_moved_is_dropped():
    hi = two_hi(L=1)
    sched = TransferSchedule(None, 5)
    sched.replan([[(0, 2), (3, 1)]], np.zeros((1, 6)))            # promotes an expert that is HI already
    assert sched.start(hi) == [PlannedSwap(0, 3, 1, 0.0)] and sched.queue == []


def test_bad_schedules():
    with pytest.raises(RuntimeConfigError, match="cannot hold one swap"):
        TransferSchedule(4, 5)
    with pytest.raises(RuntimeConfigError, match="unknown transfer order 'magic'"):
        TransferSchedule(None, 5, order="magic")


# ---- no layer starves: 48 x 128, top-8, with workload shifts ---------------------------------------------
L_MOE, E, TOP_K, PHASE = 48, 128, 8, 128        # a phase of 128 chunks of 16 steps = 2048 tokens


def qwen3_30b_plan(**overrides):
    """The budget plan of a Qwen3-30B-A3B-shaped model (48 MoE layers, 128 experts top-8, hidden
    2048, moe_intermediate 768; bf16/int4) with 20% of every layer's experts in HI slots."""
    cfg = parse_hf_config(qwen3_moe_config(hidden_size=2048, num_hidden_layers=L_MOE, num_experts=E,
                                           num_experts_per_tok=TOP_K, moe_intermediate_size=768))
    kw = dict(budget=2**62, hi=parse_format("bf16"), lo=parse_format("int4"), dense_params=0, batch=1,
              max_len=512, transfers_in_flight=EngineConfig.transfers_in_flight, max_hi_fraction=0.2)
    return plan_budget(cfg, **(kw | overrides))


def post_shift(result):
    """Per-layer [L] and overall hit rates after the first shift."""
    return np.nanmean(result["layer_hit_rate"][PHASE:], 0), float(np.nanmean(result["hit_rate"][PHASE:]))


def test_no_layer_starves_after_a_shift_with_the_default_staging():
    """Every layer's post-shift HI hit rate is within 10% of the unlimited-transfer replay's, and
    the overall rate at least 90% of it, with the staging bytes the default plan reserves. The
    schedule before issue 12 (layer by layer, K = 4 copies counted, not bytes) fails the same
    check: its deep layers get no swaps at all."""
    plan = qwen3_30b_plan()
    assert plan.n_hi == (25,) * L_MOE
    trace = shifting_trace(L_MOE, E, top_k=TOP_K, hot=20, chunks=3 * PHASE, phase_chunks=PHASE)
    d = EngineConfig()

    def run(schedule):
        return replay(DynaExqPolicy(period=d.update_period, delta=d.delta), trace, list(plan.n_hi),
                      chunk=d.segment_len, alpha=d.alpha, schedule=schedule)
    unlimited_layers, unlimited = post_shift(run(None))
    assert unlimited > 0.8
    layers, overall = post_shift(run(TransferSchedule(plan.staging, plan.m_hi + plan.m_lo)))
    assert (layers >= 0.9 * unlimited_layers).all(), np.round(layers / unlimited_layers, 3)
    assert overall >= 0.9 * unlimited
    old = qwen3_30b_plan(transfers_in_flight=4)
    before = run(TransferSchedule(old.staging, 2 * old.m_hi, order="layer"))
    old_layers, _ = post_shift(before)
    assert sum(before["layer_swaps"][12:]) == 0 and (old_layers[12:] < 0.5 * unlimited_layers[12:]).all()


# ---- the engine runs the schedule --------------------------------------------------------------------
class SwapEverything(Policy):
    """At every boundary, every HI expert of every layer swaps with a LO one: more swaps than fit."""
    name = "swap-everything"

    def wants_update(self, step, last_update):
        return True

    def plan(self, step, scores, hi_mask, n_hi):
        return [list(zip(np.flatnonzero(~m).tolist(), np.flatnonzero(m).tolist())) for m in hi_mask]


def engine(tiny_ckpt, **settings):
    config = EngineConfig(batch=BATCH, max_len=MAX_LEN, segment_len=SEG).replace(**settings)
    return Engine(tiny_ckpt, budget_bytes=budget_for_fraction(tiny_ckpt, 0.5, config), settings=config)


def test_the_engine_fills_the_staging_bytes_with_swaps(tiny_ckpt):
    """K = 4 copies of the largest (f32) expert hold three f32 + int4 swaps, where a count of K
    copies allowed two; the copies the engine makes are exactly the bytes the schedule counts."""
    eng = engine(tiny_ckpt, policy=SwapEverything(), transfers_in_flight=4)
    per_swap = eng.plan.m_hi + eng.plan.m_lo
    assert tree_nbytes(eng.store.expert(0, HI, 0)) + tree_nbytes(eng.store.expert(0, LO, 0)) == per_swap
    fit = eng.plan.staging // per_swap
    assert fit == 3
    res = eng.generate(prompts(0), max_new_tokens=1 + 4 * SEG, stop_tokens=())
    assert [t["in_flight"] for t in eng.timeline] == [fit] * len(eng.timeline)
    assert [len(t["published"]) for t in eng.timeline] == [0] + [fit] * (len(eng.timeline) - 1)
    assert res.runtime["counters"]["device_stalls"] == 0


def test_copies_in_flight_survive_new_plans_and_are_published(tiny_ckpt, monkeypatch):
    """Copies that arrive late (deterministic=False) stay in flight across plans that replace the
    queue, and are published once they arrive: nothing started is lost."""
    from dynaexq_jax.runtime import engine as engine_mod
    eng = engine(tiny_ckpt, policy=SwapEverything(), transfers_in_flight=4, deterministic=False)
    arrived = engine_mod.Transition.ready.fget
    monkeypatch.setattr(engine_mod.Transition, "ready", property(lambda t: len(eng.timeline) >= 4 and arrived(t)))
    started, start = [], eng.schedule.start

    def recording_start(hi_mask):
        started.extend(out := start(hi_mask))
        return out
    monkeypatch.setattr(eng.schedule, "start", recording_start)
    eng.generate(prompts(2), max_new_tokens=1 + 8 * SEG, stop_tokens=())
    published = [tuple(p) for t in eng.timeline for p in t["published"]]
    assert all(not t["published"] for t in eng.timeline[:4]) and eng.counters.plans >= 4
    early = [(s.pos, s.promote, s.demote) for s in started[:3]]
    assert set(early) <= set(published)
    in_flight = [(s.pos, s.promote, s.demote) for s in eng.schedule.in_flight]
    assert sorted(published + in_flight) == sorted((s.pos, s.promote, s.demote) for s in started)


def test_cli_reports_controller_work_and_device_waits_apart(tiny_ckpt, capsys):
    eng = engine(tiny_ckpt, policy=SwapEverything())
    res = eng.generate(prompts(1), max_new_tokens=1 + 4 * SEG, stop_tokens=())
    r, c = res.runtime, res.runtime["counters"]
    assert r["device_wait_s"] == pytest.approx(c["drain_wait_s"] + c["copy_wait_s"]) and c["drain_wait_s"] > 0
    assert r["controller_work_s"] + r["device_wait_s"] == pytest.approx(r["controller_s"])
    _print_generation(["a", "b"], res)
    line = next(x for x in capsys.readouterr().out.splitlines() if "controller" in x)
    m = re.search(r"controller (\d+\.\d) ms work, (\d+\.\d) ms waiting for the device", line)
    assert m, line
    assert float(m[1]) == pytest.approx(1e3 * r["controller_work_s"], abs=0.051)
    assert float(m[2]) == pytest.approx(1e3 * r["device_wait_s"], abs=0.051)

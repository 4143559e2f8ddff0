"""The DynaExq runtime: budget, pools, policies, transitions, and the invariants listed in the
README (budget never exceeded, only fully written experts read, determinism, no
recompilation after warm-up)."""
import gc

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaexq_jax.errors import BudgetError, GenerationError, InfeasibleBudgetError, RuntimeConfigError
from dynaexq_jax.model.families import qwen3_moe
from dynaexq_jax.runtime.budget import (
    budget_for_fraction,
    budget_report,
    format_bytes,
    parse_bytes,
    plan_budget,
    plan_for,
)
from dynaexq_jax.runtime.config import EngineConfig
from dynaexq_jax.runtime.engine import Engine
from dynaexq_jax.runtime.policies import DynaExqPolicy, Policy, SensitivityPolicy, rank
from dynaexq_jax.runtime.pools import DevicePools
from dynaexq_jax.serving.checkpoint import attach_experts
from dynaexq_jax.serving.generate import Controller, generate
from dynaexq_jax.serving.hotness import ema_update
from dynaexq_jax.serving.scoring import score
from tests.tiny_runtime import BATCH, MAX_LEN, SEG, TINY, prompts


def engine_budget(tiny_ckpt, hi_fraction, batch=BATCH, max_len=MAX_LEN, **settings):
    """The smallest budget that gives floor(hi_fraction * E) HI slots per layer."""
    return budget_for_fraction(tiny_ckpt, hi_fraction, EngineConfig(batch=batch, max_len=max_len, segment_len=SEG,
                                                               **settings))


# ---- budget ------------------------------------------------------------------------------------
def test_parse_bytes():
    assert parse_bytes("20GiB") == 20 * 2**30
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes(1000) == 1000
    for bad in ("lots", "12 parsecs", "-5MiB", "0"):
        with pytest.raises(BudgetError, match="budget"):
            parse_bytes(bad)


def test_format_bytes_rounded_up_parses_back_to_at_least_the_value():
    """A lower bound printed with two decimals must not fall below itself when pasted back."""
    rng = np.random.default_rng(0)
    for n in [1, 1023, 1024, 53 * 2**20 + 1, 2**18 * 213, *rng.integers(1, 10**12, 2000).tolist()]:
        text = format_bytes(n, round_up=True)
        assert parse_bytes(text) >= n, (n, text)
        value, unit = text.split()
        if unit != "B":    # and it is the least such two-decimal text
            lower = f"{(round(float(value) * 100) - 1) / 100:.2f} {unit}"
            assert parse_bytes(lower) < n, (n, text)
    assert format_bytes(56_077_844) == "53.48 MiB" and format_bytes(56_077_700, round_up=True) == "53.48 MiB"
    assert parse_bytes("53.48MiB") == 56_077_844     # the decimal read exactly: floor(53.48 * 2**20)


def test_infeasible_budget_says_what_is_missing(tiny_ckpt):
    with pytest.raises(InfeasibleBudgetError, match=r"B missing; the smallest feasible budget is") as e:
        Engine(tiny_ckpt, budget_bytes="1MiB", batch=BATCH, max_len=MAX_LEN)
    shown, exact = str(e.value).split("the smallest feasible budget is ")[1].split(" (")
    smallest = int(exact.split(" B)")[0].replace(",", ""))
    eng = Engine(tiny_ckpt, budget_bytes=smallest, policy="all-lo", batch=BATCH, max_len=MAX_LEN)
    assert eng.plan.total <= smallest
    with pytest.raises(InfeasibleBudgetError):
        Engine(tiny_ckpt, budget_bytes=smallest - 1, policy="all-lo", batch=BATCH, max_len=MAX_LEN)
    # The value as shown (e.g. '1.23 MiB', as a user pastes it into --budget) is feasible too.
    assert parse_bytes(shown) >= smallest
    Engine(tiny_ckpt, budget_bytes=shown, policy="all-lo", batch=BATCH, max_len=MAX_LEN)
    with pytest.raises(InfeasibleBudgetError, match="needs every expert HI"):
        Engine(tiny_ckpt, budget_bytes=smallest, policy="all-hi", batch=BATCH, max_len=MAX_LEN)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_budget_for_fraction_is_the_smallest_with_that_many_slots(tiny_ckpt, fraction):
    config = EngineConfig(batch=BATCH, max_len=MAX_LEN)
    budget = budget_for_fraction(tiny_ckpt, fraction, config)
    want = (int(fraction * TINY["num_experts"]),) * 3
    assert Engine(tiny_ckpt, budget_bytes=budget, settings=config).plan.n_hi == want
    if fraction > 0:
        assert Engine(tiny_ckpt, budget_bytes=budget - 1, settings=config).plan.n_hi < want
    # greedy: as many slots in all, spread by the calibration ranking's priority.
    greedy = config.replace(strategy="greedy")
    prio = np.arange(3 * TINY["num_experts"], dtype=float).reshape(3, -1)[::-1] ** 2
    spread = Engine(tiny_ckpt, budget_bytes=budget_for_fraction(tiny_ckpt, fraction, greedy), settings=greedy,
                    calibration=prio).plan.n_hi
    assert sum(spread) == sum(want) and (fraction in (0.0, 1.0) or spread != want)


@settings(max_examples=40, deadline=None)
@given(budget_mib=st.floats(1, 400), strategy=st.sampled_from(["uniform", "proportional", "greedy"]),
       batch=st.integers(1, 8), prio_seed=st.integers(0, 10**6))
def test_budget_plan_never_exceeds_the_budget(budget_mib, strategy, batch, prio_seed):
    from dynaexq_jax.experiments.synthetic import BENCH_CONFIG, qwen3_moe_config
    from dynaexq_jax.model.config import parse_hf_config
    from dynaexq_jax.model.quant import parse_format
    cfg = parse_hf_config(qwen3_moe_config(**BENCH_CONFIG))
    prio = np.random.default_rng(prio_seed).random((len(cfg.moe_layers), cfg.num_experts))
    kw = dict(hi=parse_format("bf16"), lo=parse_format("int4"), dense_params=20 * 2**20, batch=batch,
              max_len=512, strategy=strategy, layer_priority=prio)
    try:
        plan = plan_budget(cfg, budget=int(budget_mib * 2**20), **kw)
    except InfeasibleBudgetError:
        floor = plan_budget(cfg, budget=10**12, **kw)
        assert floor.fixed.total - floor.fixed.margin + floor.resident - sum(floor.n_hi) * (floor.m_hi - floor.m_lo) \
            + floor.staging > budget_mib * 2**20 * 0.98 - 1
        return
    assert plan.total <= plan.budget
    assert all(0 <= n <= cfg.num_experts for n in plan.n_hi)
    # Maximal: one more HI slot anywhere would not fit (or every layer is full).
    if strategy != "greedy" and min(plan.n_hi) < cfg.num_experts:
        assert plan.total + len(plan.n_hi) * (plan.m_hi - plan.m_lo) > plan.budget or strategy == "proportional"
    if strategy == "greedy":
        assert plan.total + (plan.m_hi - plan.m_lo) > plan.budget or min(plan.n_hi) == cfg.num_experts


def test_greedy_gives_slots_to_the_layers_that_need_them():
    from dynaexq_jax.experiments.synthetic import qwen3_moe_config
    from dynaexq_jax.model.config import parse_hf_config
    from dynaexq_jax.model.quant import parse_format
    cfg = parse_hf_config(qwen3_moe_config(**TINY))
    prio = np.zeros((3, 8))
    prio[1] = np.linspace(1, 0.5, 8)          # layer 1's experts matter most
    kw = dict(hi=parse_format("f32"), lo=parse_format("int4:g32"), dense_params=0, batch=1, max_len=16)
    base = plan_budget(cfg, budget=10**9, strategy="uniform", max_hi_fraction=0.0, **kw)
    budget = int((base.total - base.fixed.margin + 4 * (base.m_hi - base.m_lo) + 10) / 0.98)
    plan = plan_budget(cfg, budget=budget, strategy="greedy", layer_priority=prio, **kw)
    assert plan.n_hi == (0, 4, 0)
    assert plan_budget(cfg, budget=budget, strategy="uniform", **kw).n_hi == (1, 1, 1)


# ---- policies ----------------------------------------------------------------------------------
def test_rank_breaks_ties_by_expert_id():
    assert rank(np.array([0.2, 0.5, 0.5, 0.1, 0.5])).tolist() == [1, 2, 4, 0, 3]


def test_dynaexq_policy_hysteresis_and_rate_limit():
    scores = np.array([[0.30, 0.29, 0.10, 0.05, 0.50, 0.295]])
    hi = np.array([[True, True, True, False, False, False]])
    # Outsiders by score: 4 (0.50), 5 (0.295), 3; incumbents worst first: 2 (0.10), 1 (0.29), 0.
    assert DynaExqPolicy(delta=0.01).plan(0, scores, hi, [3]) == [[(4, 2)]]        # 0.295 - 0.29 <= delta
    assert DynaExqPolicy(delta=0.0).plan(0, scores, hi, [3]) == [[(4, 2), (5, 1)]]
    assert DynaExqPolicy(delta=0.0, rate_limit=1).plan(0, scores, hi, [3]) == [[(4, 2)]]
    p = DynaExqPolicy(period=16, update_after_prefill=False)
    assert not p.wants_update(8, None) and p.wants_update(16, None)
    assert not p.wants_update(20, 16) and p.wants_update(32, 16)


def test_the_sensitivity_policy_ranks_traffic_by_the_cost_of_each_lo_copy():
    scores = np.array([[0.30, 0.29, 0.10, 0.05, 0.50, 0.295]])
    hi = np.array([[True, True, True, False, False, False]])
    # Equal costs: dynaexq's decisions; a costly LO copy (expert 3) wins a slot its traffic would not.
    even = SensitivityPolicy(delta=0.0, cost=np.full((1, 6), 7.0))
    assert even.plan(0, scores, hi, [3]) == DynaExqPolicy(delta=0.0).plan(0, scores, hi, [3])
    costly = SensitivityPolicy(delta=0.0, cost=np.array([[1.0, 1.0, 1.0, 20.0, 1.0, 0.0]]))
    assert costly.plan(0, scores, hi, [3]) == [[(3, 2), (4, 1)]]      # 5 costs nothing in LO: never promoted
    assert [sorted(h) for h in costly.initial_hi([2], 6, scores)] == [[3, 4]]
    for bad in (np.ones(6), np.array([[1.0, -1.0]]), np.array([[np.nan, 1.0]])):
        with pytest.raises(RuntimeConfigError, match="finite, non-negative cost"):
            SensitivityPolicy(cost=bad)


def test_the_sensitivity_policy_serves_by_the_costs_stored_at_conversion(tmp_path, tiny_ckpt):
    # By name ('sensitivity', what --policy gives) it reads the LO costs a conversion with
    # calibration text stored, and the traffic measured with them: the initial HI set is the top
    # of traffic x cost per layer and the greedy strategy gives slots by it across layers; a
    # checkpoint converted without them is an error naming it.
    from checkpoints_convert import convert
    from dynaexq_jax.experiments.synthetic import write_random_qwen3_moe
    from dynaexq_jax.serving.checkpoint import load_checkpoint
    settings = dict(batch=BATCH, max_len=MAX_LEN, segment_len=SEG)
    with pytest.raises(RuntimeConfigError, match="conv: policy 'sensitivity' ranks by what each expert's LO copy "
                                                 "costs.*this checkpoint has none"):
        Engine(tiny_ckpt, budget_bytes=engine_budget(tiny_ckpt, 0.25), policy="sensitivity", **settings)
    hf = write_random_qwen3_moe(tmp_path / "hf", seed=1, tokenizer=False, **TINY)
    tokens = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 256))
    ckpt = load_checkpoint(convert(hf, tmp_path / "cal", lo="int2:g32", calibration=tokens, progress=False))
    assert ckpt.lo_costs.shape == (3, 8) and (ckpt.lo_costs > 0).all()
    eng = Engine(ckpt, budget_bytes=engine_budget(ckpt, 0.25), policy="sensitivity", **settings)
    assert isinstance(eng.policy, SensitivityPolicy) and np.array_equal(eng.policy.cost, ckpt.lo_costs)
    value = ckpt.routed_mass * ckpt.lo_costs
    assert ckpt.routed_mass.shape == (3, 8) and ckpt.routed_mass.sum() > 0
    hi = eng.hi_mask()
    for layer, n in enumerate(eng.n_hi):
        assert set(np.flatnonzero(hi[layer])) == set(np.argsort(-value[layer], kind="stable")[:n])
    budget = engine_budget(ckpt, 0.25)
    greedy = Engine(ckpt, budget_bytes=budget, policy="sensitivity", strategy="greedy", **settings)
    want = plan_for(ckpt, budget, greedy.settings, layer_priority=value).n_hi
    assert list(greedy.n_hi) == list(want) and len(set(want)) > 1    # uneven: the costs differ by layer
    assert budget_report(ckpt, budget, greedy.settings)["hi_slots_per_layer"] == list(want)   # dynaexq budget
    res = eng.generate(prompts(3), max_new_tokens=24, stop_tokens=())
    assert res.runtime["counters"]["device_stalls"] == 0
    assert max(t["owned_bytes"] for t in eng.timeline) <= eng.budget_for_owned


def test_hi_set_follows_a_shift_of_the_hot_set():
    """Synthetic traffic whose hot set changes at step 400: the HI set equals the new hot set
    within a few update periods (EMA alpha 0.9, period 16)."""
    rng = np.random.default_rng(0)
    E, n, period = 16, 4, 16
    pol = DynaExqPolicy(period=period, delta=0.01)
    hot_a, hot_b = [0, 1, 2, 3], [9, 10, 11, 12]
    hi = np.zeros((1, E), bool)
    hi[0, hot_a] = True
    S = np.zeros((1, E))
    followed_at = None
    for step in range(1, 800):
        hot = hot_a if step < 400 else hot_b
        c = rng.random(E) * 0.02
        c[hot] += 0.2
        S = 0.9 * S + 0.1 * c[None]
        if step % period == 0:
            for p, d in pol.plan(step, S, hi, [n])[0]:
                hi[0, p], hi[0, d] = True, False
        if step >= 400 and followed_at is None and set(np.flatnonzero(hi[0])) == set(hot_b):
            followed_at = step
    assert followed_at is not None and followed_at - 400 <= 2 * period


# ---- engine and invariants -----------------------------------------------------------------------
class RandomSwaps(Policy):
    """Random decisions at every boundary: the adversary for the budget and purity invariants."""
    name = "random-swaps"

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def wants_update(self, step, last_update):
        return True

    def plan(self, step, scores, hi_mask, n_hi):
        out = []
        for l in range(len(n_hi)):
            his, los = np.flatnonzero(hi_mask[l]), np.flatnonzero(~hi_mask[l])
            k = min(len(his), len(los), int(self.rng.integers(0, 3)))
            out.append(list(zip(self.rng.choice(los, k, replace=False).tolist(),
                                self.rng.choice(his, k, replace=False).tolist())))
        return out


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10**6), hi_fraction=st.floats(0.3, 0.8), transfers=st.integers(2, 6))
def test_owned_device_bytes_never_exceed_the_budget(tiny_ckpt, seed, hi_fraction, transfers):
    gc.collect()
    before = {id(a) for a in jax.live_arrays()}
    budget = engine_budget(tiny_ckpt, hi_fraction, transfers_in_flight=transfers)
    eng = Engine(tiny_ckpt, budget_bytes=budget, policy=RandomSwaps(seed), batch=BATCH, max_len=MAX_LEN,
                 segment_len=SEG, transfers_in_flight=transfers)
    live_peak = []
    original = eng._boundary

    def checked(*args, **kw):
        out = original(*args, **kw)
        live = sum(a.nbytes for a in jax.live_arrays() if id(a) not in before)
        live_peak.append(live)
        return out
    eng._boundary = checked
    res = eng.generate(prompts(seed), max_new_tokens=24, stop_tokens=())
    assert res.runtime["counters"]["promotions"] > 0
    owned = [t["owned_bytes"] for t in eng.timeline]
    assert max(owned) <= eng.budget_for_owned
    # Cross-check against what JAX actually holds: every array created since the engine started
    # (pools, copies in flight, cache, params, small per-step arrays) fits in the whole budget.
    assert max(live_peak) <= budget
    assert res.runtime["counters"]["device_stalls"] == 0


_forward = jax.jit(qwen3_moe.forward, static_argnames=("cfg", "backend"))


def frozen_params(tiny_ckpt, eng, hi_mask):
    """Params of a model whose experts are frozen at the HI set hi_mask [L, E]."""
    pools = DevicePools(eng.store, [set(np.flatnonzero(m)) for m in hi_mask], TINY["num_experts"])
    return attach_experts(eng.dense, dict(zip(tiny_ckpt.config.moe_layers, pools.expert_pools())))


def test_each_step_equals_a_model_frozen_at_its_assignment(tiny_ckpt):
    """Every token equals the one a model frozen at the assignment that served it decodes from the
    same cache (whose earlier positions the earlier assignments wrote): the prompt under the
    prefill's assignment, then each step under its segment's."""
    eng = Engine(tiny_ckpt, budget_bytes=engine_budget(tiny_ckpt, 0.4, batch=1), policy=RandomSwaps(7), batch=1,
                 max_len=MAX_LEN, segment_len=SEG)
    p = prompts(3, n=1)[0]
    res = eng.generate([p], max_new_tokens=20, stop_tokens=())
    toks = res.tokens[0]
    masks = [np.array(t["served_hi_mask"], bool) for t in eng.timeline]
    assert len({m.tobytes() for m in masks}) > 2, "the test needs assignments that change"
    # Token 0 comes from prefill (boundary 0); segment k's tokens 1+k*SEG .. from boundary k+1.
    served = [masks[0] if j == 0 else masks[1 + (j - 1) // SEG] for j in range(len(toks))]
    cache = qwen3_moe.init_cache(tiny_ckpt.config, 1, MAX_LEN)
    for j, ids in enumerate([p] + [[t] for t in toks[:-1]]):
        logits, cache, _ = _forward(frozen_params(tiny_ckpt, eng, served[j]), tiny_ckpt.config,
                                    np.asarray([ids], np.int32), cache)
        assert int(np.argmax(logits[0, -1])) == toks[j], f"token {j} differs from the frozen model's"


def test_scoring_equals_models_frozen_at_each_chunks_assignment(tiny_ckpt):
    """Teacher-forced scoring (Engine.score) with transitions live: every chunk's log-likelihoods
    equal those of a reference that runs the same chunks one by one, each through a model frozen
    at the HI set that served it (carrying the KV cache, restarting it at every window)."""
    window = 4 * SEG
    eng = Engine(tiny_ckpt, budget_bytes=engine_budget(tiny_ckpt, 0.4, batch=1, max_len=window), policy=RandomSwaps(5),
                 batch=1, max_len=window, segment_len=SEG)
    tokens = np.asarray([prompts(9, n=1, length=3 * window + 1)[0]], np.int32)
    res = eng.score(tokens)
    assert res.nll.shape == (1, 3 * window) and np.isfinite(res.nll).all()
    masks = [np.array(t["served_hi_mask"], bool) for t in eng.timeline]
    assert len(masks) == 3 * window // SEG and len({m.tobytes() for m in masks}) > 2
    cfg = tiny_ckpt.config
    for j, mask in enumerate(masks):
        if j * SEG % window == 0:
            cache = qwen3_moe.init_cache(cfg, 1, window)
        logits, cache, _ = _forward(frozen_params(tiny_ckpt, eng, mask), cfg, tokens[:, j * SEG:(j + 1) * SEG], cache)
        logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
        want = -logp[np.arange(SEG), tokens[0, j * SEG + 1:(j + 1) * SEG + 1]]
        np.testing.assert_allclose(res.nll[0, j * SEG:(j + 1) * SEG], want, rtol=1e-5, atol=1e-5, err_msg=f"chunk {j}")
    assert res.runtime["counters"]["device_stalls"] == 0


def test_scoring_with_live_swaps_is_deterministic(tiny_ckpt):
    """Same streams, same decisions -> the same log-likelihoods, bit for bit: a publication must
    never overwrite pool slots that an already dispatched chunk is still reading."""
    def run():
        eng = Engine(tiny_ckpt, budget_bytes=engine_budget(tiny_ckpt, 0.4, max_len=4 * SEG), policy=RandomSwaps(3),
                     batch=BATCH, max_len=4 * SEG, segment_len=SEG)
        tokens = np.asarray(prompts(4, length=24 * SEG + 1), np.int32)
        return eng.score(tokens).nll, [t["published"] for t in eng.timeline]
    (a, pa), (b, pb) = run(), run()
    assert pa == pb and sum(map(len, pa)) > 10
    np.testing.assert_array_equal(a, b)


def test_unarrived_copies_are_never_published(tiny_ckpt, monkeypatch):
    from dynaexq_jax.runtime import engine as engine_mod
    eng = Engine(tiny_ckpt, budget_bytes=engine_budget(tiny_ckpt, 0.5), policy=RandomSwaps(1), batch=BATCH,
                 max_len=MAX_LEN, segment_len=SEG, deterministic=False)
    monkeypatch.setattr(engine_mod.Transition, "ready", property(lambda self: False))
    res = eng.generate(prompts(1), max_new_tokens=16, stop_tokens=())
    c = res.runtime["counters"]
    assert c["promotions"] == 0 and c["publishes_deferred"] > 0
    assert all(t["published"] == [] for t in eng.timeline)
    assert len({np.array(t["hi_mask"]).tobytes() for t in eng.timeline}) == 1


def test_the_drain_before_publish_wait_can_be_switched_off(tiny_ckpt):
    """drain_before_publish=False publishes without waiting for the segment in flight (the GPU
    check measures whether that is safe there); True waits before every publish."""
    waits = {}
    for drain in (True, False):
        eng = Engine(tiny_ckpt, budget_bytes=engine_budget(tiny_ckpt, 0.5), policy=RandomSwaps(1), batch=BATCH,
                     max_len=MAX_LEN, segment_len=SEG, drain_before_publish=drain)
        res = eng.generate(prompts(2), max_new_tokens=16, stop_tokens=())
        assert res.runtime["counters"]["promotions"] > 0
        waits[drain] = res.runtime["counters"]["drain_wait_s"]
    assert waits[True] > 0 and waits[False] == 0


def test_same_trace_same_seed_same_decisions_and_tokens(tiny_ckpt):
    def run():
        eng = Engine(tiny_ckpt, budget_bytes=engine_budget(tiny_ckpt, 0.3), policy="dynaexq", update_period=4,
                     delta=0.0, batch=BATCH, max_len=MAX_LEN, segment_len=SEG)
        from dynaexq_jax.serving.sampling import Sampling
        res = eng.generate(prompts(5), max_new_tokens=32, sampling=Sampling(0.9, 20, 0.95), seed=11, stop_tokens=())
        return res.tokens, [(t["step"], t["published"], t["hi_mask"]) for t in eng.timeline]
    a, b = run(), run()
    assert a == b
    assert any(pub for _, pub, _ in a[1]), "the test needs decisions to compare"


def test_no_recompilation_after_warm_up(tiny_ckpt):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    eng = Engine(tiny_ckpt, budget_bytes=engine_budget(tiny_ckpt, 0.3), policy=RandomSwaps(2), batch=BATCH,
                 max_len=MAX_LEN, segment_len=SEG)
    eng.generate(prompts(1), max_new_tokens=12, stop_tokens=())          # warm-up
    n = len(compiles)
    res = eng.generate(prompts(2), max_new_tokens=40, stop_tokens=())
    assert res.runtime["counters"]["promotions"] > 0
    assert len(compiles) == n, f"{len(compiles) - n} compilations while serving"


def test_hot_set_follows_the_workload(tiny_ckpt):
    """Two kinds of prompts route differently: after serving each kind, the HI set overlaps that
    kind's hottest experts more than the other kind's."""
    kw = dict(budget_bytes=engine_budget(tiny_ckpt, 0.25), batch=BATCH, max_len=MAX_LEN, segment_len=SEG)
    # Two workloads with concentrated, different routing: each prompt repeats one token.
    a, b = [[5] * 40, [17] * 40], [[200] * 40, [230] * 40]

    def hottest(p):
        ref = Engine(tiny_ckpt, policy="static", **kw)
        ref.generate(p, max_new_tokens=48, stop_tokens=())
        return [set(rank(s)[:n].tolist()) for s, n in zip(ref.scores, ref.n_hi)]
    top_a, top_b = hottest(a), hottest(b)
    assert top_a != top_b, "the two kinds must have different hot sets"
    eng = Engine(tiny_ckpt, policy="dynaexq", update_period=8, delta=0.0, **kw)
    eng.generate(a, max_new_tokens=48, stop_tokens=())
    hi_after_a = eng.pools.hi_mask()
    eng.generate(b, max_new_tokens=48, stop_tokens=())
    hi_after_b = eng.pools.hi_mask()
    def overlap(mask, tops):
        return np.mean([len(set(np.flatnonzero(m)) & t) / len(t) for m, t in zip(mask, tops)])
    assert overlap(hi_after_a, top_a) > overlap(hi_after_a, top_b)
    assert overlap(hi_after_b, top_b) > overlap(hi_after_b, top_a)
    assert min(overlap(hi_after_a, top_a), overlap(hi_after_b, top_b)) >= 0.6


# ---- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, err, match", [
    (dict(policy="lru-magic"), RuntimeConfigError, "unknown policy 'lru-magic'"),
    (dict(segment_len=0), RuntimeConfigError, "segment_len"),
    (dict(update_period=0), RuntimeConfigError, "update period"),
    (dict(delta=-1.0), RuntimeConfigError, "delta"),
    (dict(alpha=1.5), RuntimeConfigError, "alpha"),
    (dict(strategy="fancy"), RuntimeConfigError, "strategy 'fancy'"),
    (dict(transfers_in_flight=0), RuntimeConfigError, "transfers_in_flight"),
    (dict(budget_bytes="much"), BudgetError, "cannot parse the budget 'much'"),
    (dict(backend="cuda-magic"), RuntimeConfigError, "backend"),
    (dict(batch=True), RuntimeConfigError, "batch must be an integer >= 1"),
    (dict(rate_limit=0), RuntimeConfigError, "rate limit"),
    (dict(policy="static", update_period=0), RuntimeConfigError, "update period"),   # checked for every policy
    (dict(policy=object()), RuntimeConfigError, "policy must be"),
    (dict(segment=16), RuntimeConfigError, r"unknown engine settings \['segment'\]"),
])
def test_bad_runtime_options(tiny_ckpt, kwargs, err, match):
    kw = dict(budget_bytes=10**9, batch=BATCH, max_len=MAX_LEN) | kwargs
    with pytest.raises(err, match=match):
        Engine(tiny_ckpt, **kw)


def test_engine_settings_one_config_or_keywords(tiny_ckpt):
    """Engine(model, budget_bytes=..., **settings) and Engine(..., settings=EngineConfig(...)) are
    the same engine; keywords change single settings of a given config; bad values fail before
    any checkpoint is read."""
    cfg = EngineConfig(policy="static", batch=BATCH, max_len=MAX_LEN, segment_len=SEG, alpha=0.5)
    a = Engine(tiny_ckpt, budget_bytes=engine_budget(tiny_ckpt, 0.3), settings=cfg)
    b = Engine(tiny_ckpt, budget_bytes=engine_budget(tiny_ckpt, 0.3), policy="static", batch=BATCH, max_len=MAX_LEN,
               segment_len=SEG, alpha=0.5)
    assert a.settings == b.settings == cfg and a.plan == b.plan and a.alpha == 0.5
    c = Engine(tiny_ckpt, budget_bytes=engine_budget(tiny_ckpt, 0.3), settings=cfg, policy="dynaexq", update_period=8)
    assert c.settings == cfg.replace(policy="dynaexq", update_period=8)
    assert (c.policy.name, c.policy.period, c.policy.delta) == ("dynaexq", 8, cfg.delta)
    with pytest.raises(RuntimeConfigError, match="transfers_in_flight"):
        Engine("/nonexistent/checkpoint", budget_bytes=10**9, transfers_in_flight=1)


class Recorder(Controller):
    """Keeps what every hook received: the router mass, the scores, and the segment in flight."""
    def __init__(self):
        self.prefill, self.segments = None, []

    def after_prefill(self, mass, scores):
        self.prefill = (mass, scores)

    def after_segment(self, step, mass, scores, in_flight):
        host = None if in_flight is None else np.asarray(in_flight[0])     # its tokens [steps, B]
        self.segments.append((step, mass, scores, host))


def test_controller_receives_the_segment_in_flight(tiny_ckpt):
    """The pipelining contract: each after_segment gets the outputs of the segment dispatched
    before it (the next one the loop reads), None when nothing is in flight; so does scoring."""
    eng = Engine(tiny_ckpt, budget_bytes=10**9, policy="all-lo", batch=BATCH, max_len=MAX_LEN, segment_len=SEG)
    rec = Recorder()
    res = generate(eng.params(), tiny_ckpt.config, prompts(4), max_new_tokens=1 + 4 * SEG, stop_tokens=(),
                   segment_len=SEG, controller=rec)
    tokens = np.asarray(res.tokens)                                           # [B, 1 + 4 * SEG]
    assert [s[0] for s in rec.segments] == [SEG, 2 * SEG, 3 * SEG, 4 * SEG]
    for k, (*_, in_flight) in enumerate(rec.segments[:-1]):
        np.testing.assert_array_equal(in_flight.T, tokens[:, 1 + (k + 1) * SEG:1 + (k + 2) * SEG])
    assert rec.segments[-1][3] is None
    rec = Recorder()
    score(eng.params(), tiny_ckpt.config, np.asarray(prompts(4, length=4 * SEG + 1)), chunk=SEG, window=4 * SEG,
          controller=rec)
    # Chunk 0 is read like a prefill (nothing in flight), chunks 1 and 2 have their successor in flight.
    assert [s[3] is None for s in rec.segments] == [True, False, False, True]


def test_hotness_ema_is_one_step_per_decode_token(tiny_ckpt):
    """The scores a generation hands the controller are the EMA of hotness.py: one step for the
    prefill's mass, then one per decode step with that step's mass."""
    eng = Engine(tiny_ckpt, budget_bytes=10**9, policy="all-lo", batch=BATCH, max_len=MAX_LEN, segment_len=SEG)
    rec = Recorder()
    rec.alpha = 0.8
    generate(eng.params(), tiny_ckpt.config, prompts(6), max_new_tokens=1 + 3 * SEG, stop_tokens=(), segment_len=SEG,
             controller=rec)
    mass, scores = rec.prefill
    want = ema_update(np.zeros_like(mass), mass, 0.8)
    np.testing.assert_allclose(scores, want, rtol=1e-6)
    for _, mass, scores, _ in rec.segments:
        for m in mass:
            want = ema_update(want, m, 0.8)
        np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-7)


def test_batch_larger_than_the_engine_was_sized_for(tiny_ckpt):
    eng = Engine(tiny_ckpt, budget_bytes=10**9, policy="all-lo", batch=1, max_len=MAX_LEN)
    with pytest.raises(GenerationError, match="sized for batch=1"):
        eng.generate(prompts(0, n=2), max_new_tokens=4)
    # Scoring forwards rows x segment_len positions: at most what the workspace was planned for.
    streams = np.asarray(prompts(0, n=2, length=2 * SEG + 1), np.int32)
    eng = Engine(tiny_ckpt, budget_bytes=10**9, policy="all-lo", batch=2, prefill_batch=1, max_len=MAX_LEN,
                 segment_len=SEG)
    with pytest.raises(GenerationError, match=r"batch <= 1.*prefill_batch=1"):
        eng.score(streams)
    assert eng.score(streams[:1]).nll.shape == (1, 2 * SEG)
    # ... and positions: a scoring chunk longer than the prefill chunk is what the workspace holds.
    plans = [Engine(tiny_ckpt, budget_bytes=10**9, policy="all-lo", batch=2, max_len=MAX_LEN, segment_len=SEG,
                    prefill_chunk=c).plan.fixed.workspace for c in (SEG // 2, SEG, 2 * SEG)]
    assert plans[0] == plans[1] < plans[2]


def test_the_update_period_runs_across_requests(tiny_ckpt):
    """The policy's clock is the steps served since the engine started: three requests of 2 chunks
    each with a period of 4 chunks plan twice (at the first boundary and at step 4 chunks), not
    once per request."""
    eng = Engine(tiny_ckpt, budget_bytes=engine_budget(tiny_ckpt, 0.4, batch=1, max_len=4 * SEG), policy="dynaexq",
                 update_period=4 * SEG, batch=1, max_len=4 * SEG, segment_len=SEG)
    for seed in range(3):
        eng.score(np.asarray([prompts(seed, n=1, length=2 * SEG + 1)[0]], np.int32))
    assert eng.steps_served == 6 * SEG and eng.counters.plans == 2

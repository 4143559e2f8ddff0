"""The offloading baselines: the LRU/prefetch cache policy on hand-made traces, and the engine on a
tiny checkpoint (tokens equal the all-HI model's, byte accounting, budget errors)."""
import numpy as np
import pytest

import dynaexq_jax
from checkpoints_convert import convert
from dynaexq_jax.errors import InfeasibleBudgetError, RuntimeConfigError
from dynaexq_jax.experiments.synthetic import write_random_qwen3_moe
from dynaexq_jax.runtime import offload
from dynaexq_jax.runtime.config import EngineConfig
from dynaexq_jax.runtime.offload import ExpertCache, OffloadEngine, plan_cache
from dynaexq_jax.runtime.pools import tree_nbytes
from dynaexq_jax.serving.checkpoint import load_checkpoint

# Layer 1 is dense, so the engine's dense path and a prediction after a dense layer are covered.
TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, mlp_only_layers=[1], num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            intermediate_size=64)
BATCH, MAX_LEN, NEW = 3, 64, 12
PROMPTS = [np.random.default_rng(i).integers(1, 256, n).tolist() for i, n in enumerate((5, 9, 14))]


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offload")
    hf = write_random_qwen3_moe(tmp / "hf", seed=3, tokenizer=False, **TINY)
    return convert(hf, tmp / "conv", hi="f32", lo="int4:g32", progress=False)


@pytest.fixture(scope="module")
def ckpt(conv):
    return load_checkpoint(conv)


@pytest.fixture(scope="module")
def all_hi_tokens(conv):
    return dynaexq_jax.load(conv, tier="hi").generate(PROMPTS, max_new_tokens=NEW).tokens


def budget_for(ckpt, per_layer):
    plan = plan_cache(ckpt.config, budget=10**9, hi=ckpt.tiers["hi"], lo=ckpt.tiers["lo"],
                      dense_params=tree_nbytes(ckpt.params), batch=BATCH, max_len=MAX_LEN,
                      cache_dtype=np.float32, backend="xla", transfers_in_flight=EngineConfig.transfers_in_flight)
    return plan.budget_for(per_layer)


# ---- the cache policy ----------------------------------------------------------------------------
def test_lru_bookkeeping_on_a_hand_made_trace():
    c = ExpertCache(2, [0, 1])
    assert c.access([0]) == [({0: 0}, [])]
    assert c.access([2]) == [({2: 1}, [2])]                # evicts 1: 0 was used more recently
    assert c.access([1]) == [({1: 0}, [1])]                # evicts 0
    assert c.access([3, 0]) == [({0: 1, 3: 0}, [0, 3])]    # evicts 2, then 1
    assert c.access([2]) == [({2: 1}, [2])]                # evicts 0 (3 was touched after it)
    assert (c.counters.hits, c.counters.misses, c.counters.evictions) == (1, 5, 5)
    assert c.counters.passes_over_capacity == 0
    assert c.slot_of == {3: 0, 2: 1}


def test_a_step_over_capacity_runs_in_passes():
    c = ExpertCache(2, [0, 1])
    # Hits first, then groups of at most `capacity` loads, each evicting experts already run.
    assert c.access([4, 3, 2, 1, 0]) == [({0: 0, 1: 1}, []), ({2: 0, 3: 1}, [2, 3]), ({4: 0}, [4])]
    cnt = c.counters
    assert (cnt.hits, cnt.misses, cnt.evictions, cnt.passes_over_capacity) == (2, 3, 3, 2)


def test_perfect_prefetch_has_more_hits_than_lru():
    rng = np.random.default_rng(0)
    p = np.arange(8, 0, -1) / 36                           # skewed traffic over 8 experts
    trace = [rng.choice(8, 2, replace=False, p=p).tolist() for _ in range(300)]
    lru, pre = ExpertCache(3, range(3)), ExpertCache(3, range(3))
    for needed in trace:
        lru.access(needed)
        pre.prefetch(needed, limit=4)                      # a predictor that is always right
        pre.access(needed)
    assert lru.counters.misses > 0 and pre.counters.misses == 0
    assert pre.counters.hits > lru.counters.hits
    # The same experts move, off the critical path, and every one of them is used.
    assert pre.counters.prefetch_issued == pre.counters.prefetch_useful == lru.counters.misses


def test_prefetch_never_evicts_a_predicted_expert():
    c = ExpertCache(2, [0, 1])
    assert c.prefetch([5, 6, 7], limit=4) == [(5, 0), (6, 1)]   # no room for 7 without evicting 5 or 6
    assert c.prefetch([1, 5], limit=1) == [(1, 1)]               # evicts 6, the LRU outside the prediction
    c.access([1, 5])
    assert (c.counters.hits, c.counters.misses, c.counters.prefetch_useful) == (2, 0, 2)


# ---- the engine ----------------------------------------------------------------------------------
def _compiled():
    return [f._cache_size() for f in (offload._attend_route, offload._dense_layer, offload._run_experts,
                                      offload._predict, offload._sample_next, offload._write_one)]


@pytest.mark.parametrize("mode", ["lru", "prefetch"])
def test_tokens_equal_the_all_hi_model(ckpt, all_hi_tokens, mode):
    budget = budget_for(ckpt, 3)            # 3 of 8 experts per layer; batch 3 x top-2 needs up to 6
    eng = OffloadEngine(ckpt, budget_bytes=budget, mode=mode, batch=BATCH, max_len=MAX_LEN)
    plan = eng.plan
    assert plan.capacity == (3, 3) and plan.total <= budget
    res = eng.generate(PROMPTS, max_new_tokens=NEW)
    assert res.tokens == all_hi_tokens
    assert sum(map(len, res.tokens)) > NEW
    c = res.runtime["counters"]
    assert c["passes_over_capacity"] > 0 and c["misses"] > 0     # prefill needs more than 3 experts
    assert c["bytes_moved"] == (c["misses"] + c["prefetch_issued"]) * plan.m_hi
    assert c["blocking_copy_bytes"] == c["misses"] * plan.m_hi
    if mode == "prefetch":
        assert c["prefetch_issued"] > 0 and 0 <= c["prefetch_useful"] <= c["prefetch_issued"]
    else:
        assert c["prefetch_issued"] == 0
    assert res.runtime["hit_rate"] == c["hits"] / (c["hits"] + c["misses"])
    assert res.runtime["projected_pcie_s"] > 0 and res.stats.decode_tokens_per_s > 0
    # Device-resident experts: the cache pools (fixed) plus at most K staged copies.
    assert sum(tree_nbytes(p) for p in eng.pools) == sum(plan.capacity) * plan.m_hi
    experts_peak = c["max_owned_bytes"] - tree_nbytes(eng.dense) - plan.fixed.kv_cache
    assert experts_peak <= (sum(plan.capacity) + plan.transfers_in_flight) * plan.m_hi
    assert c["max_owned_bytes"] <= eng.budget_for_owned
    # Same input, same tokens; the cache assignment is data: nothing recompiles.
    compiled = _compiled()
    again = eng.generate(PROMPTS, max_new_tokens=NEW)
    assert again.tokens == all_hi_tokens and _compiled() == compiled


def test_budget_and_option_errors(ckpt):
    smallest = budget_for(ckpt, 1)
    with pytest.raises(InfeasibleBudgetError, match=f"smallest feasible budget is .*{smallest:,d} B") as e:
        OffloadEngine(ckpt, budget_bytes=smallest - 1, batch=BATCH, max_len=MAX_LEN)
    shown = str(e.value).split("the smallest feasible budget is ")[1].split(" (")[0]
    OffloadEngine(ckpt, budget_bytes=shown, batch=BATCH, max_len=MAX_LEN)     # as printed: rounded up, feasible
    scores = np.tile(np.arange(8.0), (2, 1))                # expert 7 hottest
    eng = OffloadEngine(ckpt, budget_bytes=smallest, batch=BATCH, max_len=MAX_LEN, calibration=scores)
    assert eng.plan.capacity == (1, 1) and [c.slot_of for c in eng.caches] == [{7: 0}, {7: 0}]
    with pytest.raises(RuntimeConfigError, match="unknown offload mode 'fifo'"):
        OffloadEngine(ckpt, budget_bytes=smallest, mode="fifo")
    with pytest.raises(RuntimeConfigError, match="calibration"):
        OffloadEngine(ckpt, budget_bytes=smallest, batch=BATCH, max_len=MAX_LEN, calibration=scores[:1])

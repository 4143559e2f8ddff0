"""The policy-comparison harness: trace replay sanity with a known hot set, and the whole
`dynaexq compare` run on a tiny trained model (outputs, brackets, gap recovery arithmetic)."""
import csv
import json

import numpy as np
import pytest

from dynaexq_jax.errors import BudgetError, ConfigError, RuntimeConfigError
from dynaexq_jax.experiments.compare import CompareConfig, gap_recovery, workload_tokens
from dynaexq_jax.runtime.config import EngineConfig
from dynaexq_jax.runtime.policies import DynaExqPolicy, OraclePolicy, RandomPolicy, StaticPolicy, swaps_toward
from dynaexq_jax.runtime.replay import replay


def shifting_trace(seed, chunks=120, L=2, E=16, hot=4, shift_every=40, chunk=8):
    """Per-chunk routed mass with a known hot set per phase (plus noise) that changes every
    shift_every chunks."""
    rng = np.random.default_rng(seed)
    trace = rng.random((chunks, L, E)) * 0.01
    for i in range(chunks):
        phase = i // shift_every
        for l in range(L):
            hot_set = np.random.default_rng(1000 * phase + l).choice(E, hot, replace=False)
            trace[i, l, hot_set] += 0.2 * (0.5 + rng.random(hot))
    return trace


@pytest.mark.parametrize("seed", range(3))
def test_replay_oracle_beats_dynaexq_beats_random_on_a_known_hot_set(seed):
    trace = shifting_trace(seed)
    n_hi, chunk, period = [4, 4], 8, 32
    oracle = replay(OraclePolicy(trace, chunk, period, lag=2 * chunk), trace, n_hi, chunk=chunk)
    dyn = replay(DynaExqPolicy(period=period), trace, n_hi, chunk=chunk)
    rand = replay(RandomPolicy(period=period, seed=seed), trace, n_hi, chunk=chunk)
    static = replay(StaticPolicy(), trace, n_hi, chunk=chunk, ranking=trace[:40].mean(0))
    assert oracle["mean_hit_rate"] >= dyn["mean_hit_rate"] >= rand["mean_hit_rate"], (oracle, dyn, rand)
    # After the first shift a frozen calibrated set falls behind the dynamic one.
    assert np.mean(dyn["hit_rate"][40:]) > np.mean(static["hit_rate"][40:]) + 0.2
    assert dyn["mean_hit_rate"] > 0.6 and rand["mean_hit_rate"] < 0.5


def test_swaps_toward_reaches_the_target_set():
    hi = np.zeros((1, 8), bool)
    hi[0, [0, 1, 2]] = True
    swaps = swaps_toward([np.array([5, 1, 7])], hi)[0]
    assert swaps == [(5, 0), (7, 2)]


def test_gap_recovery_and_workload_streams():
    assert gap_recovery(12.0, 10.0, 14.0) == pytest.approx(0.5)
    assert gap_recovery(14.0, 10.0, 14.0) == 0 and gap_recovery(10.0, 10.0, 14.0) == 1
    assert gap_recovery(11.0, 11.0, 11.0) is None
    streams = {"prose": np.arange(100), "code": np.arange(1000, 1100)}
    t = workload_tokens(streams, ("prose", "code", "prose"), rows=2, phase_tokens=10)
    assert t.shape == (2, 31)
    assert t[0, :10].tolist() == list(range(10)) and t[1, :10].tolist() == list(range(10, 20))
    assert t[0, 10:20].tolist() == list(range(1000, 1010))
    assert t[0, 20] == 20 and t[1, 20] == 31          # the second prose phase continues, fresh text
    with pytest.raises(ConfigError, match="fewer than"):
        workload_tokens(streams, ("code",), rows=20, phase_tokens=10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(policies=("dynaexq", "best")), "unknown policies"),
    (dict(workload=("poetry",)), "workload domains"),
    (dict(phase_tokens=100, chunk=16), "multiples of chunk"),
    (dict(sweep=(1.5,)), "sweep fractions"),
    (dict(baselines=("magic",)), "unknown baselines"),
    (dict(budget="150%"), "budget share"),
    (dict(budget="lots%"), "budget share"),
    (dict(rows=0), "rows must be an integer >= 1"),
    (dict(devices=0), "devices must be an integer >= 1"),
    (dict(devices=2), "offloading baselines .* run on one device"),
])
def test_bad_compare_options(kwargs, match):
    """Construction checks every value, so a CLI can reject options before converting a model."""
    with pytest.raises(BudgetError if "budget" in kwargs else ConfigError, match=match):
        CompareConfig(**kwargs)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(budget="lots"), BudgetError, "cannot parse the budget"),
    (dict(transfers=1), RuntimeConfigError, "transfers_in_flight must be an integer >= 2"),
    (dict(alpha=1.0), RuntimeConfigError, "alpha"),
])
def test_compare_options_the_runtime_rejects_fail_on_construction(kwargs, err, match):
    with pytest.raises(err, match=match):
        CompareConfig(**kwargs)


def test_compare_engines_share_the_engine_defaults():
    c = CompareConfig()
    s = c.engine_settings("dynaexq", batch=4)
    assert s == EngineConfig(policy="dynaexq", batch=4, max_len=c.window, segment_len=c.chunk,
                             update_period=c.period, transfers_in_flight=c.transfers)
    assert (c.alpha, c.delta, c.chunk) == (EngineConfig.alpha, EngineConfig.delta, EngineConfig.segment_len)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """The whole harness, CLI included, on the embedded trained model with a tiny configuration.
    LO int2: the largest gap, so that the brackets below can fail."""
    from dynaexq_jax.cli import main
    out = tmp_path_factory.mktemp("compare")
    rc = main(["compare", "--out", str(out), "--lo", "int2:g64", "--budget", "25%",
               "--rows", "2", "--phase-tokens", "64", "--chunk", "8", "--window", "64", "--period", "16",
               "--sweep", "0,0.5", "--throughput-batches", "1,4", "--new-tokens", "16"])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def test_compare_writes_every_output(compared):
    out, res = compared
    for name in ("results.json", "results.csv", "report.md", "traces.npz", "perplexity.png", "hit_rate.png",
                 "routed_mass.png", "sweep.png"):
        assert (out / name).stat().st_size > 0, name
    assert set(res["policies"]) == {"all-hi", "all-lo", "static-calibrated", "dynaexq", "oracle", "random",
                                    "dynaexq-greedy", "sensitivity", "sensitivity-stored"}
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["policy"] for r in rows} == set(res["policies"])
    assert res["budget"]["n_hi"] == [8] * 6              # 25% of 32 experts in each of the 6 layers
    assert {(t["batch"], t["engine"]) for t in res["throughput"]} == {
        (b, e) for b in (1, 4) for e in ("all-lo", "dynaexq", "offload-lru", "offload-prefetch")}
    assert all(t["decode_tokens_per_s"] > 0 for t in res["throughput"])
    assert isinstance(res["workload"]["corpus"]["same_as_training"], bool)
    report = (out / "report.md").read_text()
    assert "| dynaexq |" in report and "projection" in report
    assert "Rank correlation of the two per layer (Spearman)" in report
    assert np.asarray(res["lo_cost_stored"]).shape == np.asarray(res["lo_cost"]).shape == (6, 32)


def test_all_hi_and_all_lo_bracket_every_policy(compared):
    _, res = compared
    p = {n: r["ppl"]["overall"] for n, r in res["policies"].items()}
    assert p["all-hi"] < 0.9 * p["all-lo"], "int2 must cost perplexity on the trained model"
    for name, ppl in p.items():
        assert p["all-hi"] * 0.995 <= ppl <= p["all-lo"] * 1.005, (name, p)
    assert res["policies"]["all-hi"]["gap_recovery"]["overall"] == pytest.approx(1.0)
    assert res["policies"]["all-lo"]["gap_recovery"]["overall"] == pytest.approx(0.0)
    # The sweep's endpoints: no HI slots is all-LO, half the slots recover part of the gap.
    sweep = {(s["hi_fraction"], s["policy"]): s for s in res["sweep"]}
    assert sweep[0.0, "dynaexq"]["ppl"]["overall"] == pytest.approx(p["all-lo"], rel=1e-5)
    assert sweep[0.5, "dynaexq"]["gap_recovery"]["overall"] > 0.2
    for name in ("static-calibrated", "dynaexq", "oracle", "random", "dynaexq-greedy", "sensitivity",
                 "sensitivity-stored"):
        assert res["policies"][name]["counters"]["device_stalls"] == 0
    # The greedy strategies spread the same slots unevenly: the same budget, other layers first.
    greedy = ("dynaexq-greedy", "sensitivity", "sensitivity-stored")
    n_hi = {name: res["policies"][name]["n_hi"] for name in ("dynaexq",) + greedy}
    assert len({sum(n) for n in n_hi.values()}) == 1, n_hi
    assert n_hi["sensitivity"] != n_hi["dynaexq"] and n_hi["sensitivity-stored"] != n_hi["dynaexq"]
    assert all(res["policies"][name]["budget"] == res["policies"]["dynaexq"]["budget"] for name in greedy)


def test_lo_costs_are_zero_where_the_tiers_agree_and_positive_where_they_do_not(tmp_path):
    """experiments.sensitivity.lo_costs on the default model: a checkpoint whose two tiers are
    the same format costs nothing; int4 -> int2 costs every routed expert something, more in
    total than int4 -> int4:g64:mse (a LO copy closer to HI)."""
    from dynaexq_jax.experiments import default_model
    from dynaexq_jax.experiments.compare import domain_streams
    from dynaexq_jax.experiments.sensitivity import lo_costs
    from dynaexq_jax.serving.checkpoint import load_checkpoint
    from dynaexq_jax.serving.tokenizer import TextCodec

    def costs(lo):
        ckpt = load_checkpoint(default_model.converted_model(None, tmp_path / lo.replace(":", "_"), lo=lo,
                                                             progress=False))
        streams = domain_streams(TextCodec(ckpt.path), "calibration")
        return lo_costs(ckpt, [workload_tokens(streams, ("code",), 2, 48)[:, :49]])
    same, int2, mse = costs(default_model.HI), costs("int2:g64"), costs("int4:g64:mse")
    assert same.shape == (6, 32) and np.all(same == 0)
    assert np.all(np.isfinite(int2)) and (int2 > 0).mean() > 0.8         # 96 pairs per layer reach most experts
    assert int2.sum() > 10 * mse.sum() > 0


def test_sensitivity_stored_needs_a_checkpoint_with_lo_costs(tmp_path):
    # A conversion without calibration text stores no LO costs: asked for by name, the policy is
    # an error that says how to get them; in the default list it is left out, and said so.
    from checkpoints_convert import convert
    from dynaexq_jax.experiments import default_model
    from dynaexq_jax.experiments.compare import POLICIES, Harness
    plain = convert(default_model.HF_DIR, tmp_path / "plain", hi=default_model.HI, lo=default_model.LO, dtype="f32",
                    progress=False)
    with pytest.raises(ConfigError, match="sensitivity-stored serves by the LO costs.*--calibration FILE"):
        Harness(plain, CompareConfig(policies=("dynaexq", "sensitivity-stored")))
    said = []
    h = Harness(plain, CompareConfig(), log=said.append)
    assert h.cfg.policies == tuple(p for p in POLICIES if p != "sensitivity-stored")
    assert "sensitivity-stored left out" in said[0]

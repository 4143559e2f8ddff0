"""Benchmark scripts run end to end at toy sizes so that they are known to work on the day they are
needed: benchmarks/gpu_check.py in its reduced CPU mode (every stage must pass), benchmarks/scale.py
at tiny shapes (every phase must report), benchmarks/families_check.py on one drawn config and
benchmarks/expert_parallel.py on 1 and 2 forced CPU devices."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import scale  # noqa: E402

TOY = [f"--set={k}={v}" for k, v in dict(
    hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=512, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    shared_expert_intermediate_size=64).items()]


def run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_gpu_check_reduced_runs_every_stage(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run("gpu_check.py", "--reduced", "--workdir", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    stages = result["stages"]
    assert list(stages) == list(gpu_check.STAGES)
    failed = {s: r.get("error") for s, r in stages.items() if r["status"] != "passed"}
    assert not failed and result["passed"], failed
    assert all(r["passed"] > 0 and r["failed"] == 0 for r in stages["kernels"]["runs"])
    timings = stages["kernel_timings"]["results"]
    assert {r["backend"] for r in timings} >= {"pallas", "xla"}
    assert stages["kernel_timings"]["max_rel_err_vs_reference"] < 1e-2
    for backend in ("pallas", "xla"):
        engine = stages[f"engine_{backend}"]
        assert engine["backend"] == backend and set(engine["runs"]) >= {"drain", "drain_again"}
        for r in engine["runs"].values():
            assert r["counters"]["device_stalls"] == 0 and r["decode_tok_s"] > 0
            assert r["score_counters"]["promotions"] > 0, "the shift workload published no swap"
        assert engine["drain_verdict"].startswith(("reproducible", "same tokens")), engine["drain_verdict"]
    assert not (tmp_path / "work" / "converted").exists(), "the generated checkpoint was kept"


def test_scale_runs_every_phase_at_toy_size(tmp_path):
    out, work = tmp_path / "scale.json", tmp_path / "work"
    proc = run("scale.py", *TOY, "--layers", "2", "--next-layers", "2", "--pairs", "bf16/int4:g32",
               "--batches", "2", "--prompt-len", "8", "--new-tokens", "4", "--phase-positions", "16",
               "--domain-tokens", "4", "--period", "4", "--segment", "4", "--max-len", "64",
               "--shard-gb", "0.0002", "--workdir", str(work), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    models = json.loads(out.read_text())["models"]
    assert list(models) == list(scale.MODELS)
    for name, m in models.items():
        assert name in proc.stdout
        assert "error" not in m["plan"] and len(m["plan"]["full"]) == len(scale.PLAN_SHAPES)
        (row,) = m["depths"]
        assert row["write"]["shards"] > 1 and row["write"]["bytes"] > 0       # sharded, with an index
        conv = row["convert"]["bf16/int4:g32"]
        assert "error" not in conv and conv["mb_per_s"] > 0 and conv["peak_rss"] > 0
        serve = row["serve"]["bf16/int4:g32 b2"]
        assert "error" not in serve, serve["error"]
        # Both toy models are all-MoE: one hit rate per MoE layer, each a share of routed mass.
        for key in ("hit_before", "hit_after", "replay_after", "oracle_after"):
            assert len(serve["shift"][key]) == 2 and all(0 <= h <= 1 for h in serve["shift"][key]), key
        assert serve["budget"] == m["plan"]["depths"][0]["fraction_budgets"]["bf16/int4:g32 b2"]
    assert list(work.iterdir()) == [], "generated checkpoints were left behind"


def test_families_check_runs_one_config(tmp_path):
    out = tmp_path / "families_check.json"
    proc = run("families_check.py", "--families", "qwen3_moe", "--per-family", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["passed"] and [r["family"] for r in result["rows"]] == ["qwen3_moe"]
    row = result["rows"][0]
    assert row["logits_rel_err"] <= 1e-4 and row["greedy_equal"] and row["promotions"] > 0
    assert row["max_owned_bytes"] <= row["budget_for_owned"]


def test_expert_parallel_runs_and_its_all_to_all_equals_the_psum(tmp_path):
    out = tmp_path / "ep.json"
    proc = run("expert_parallel.py", "--devices", "1,2", "--batches", "1", "--new-tokens", "4", "--repeats", "1",
               "--layer-tokens", "1,5", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["same_tokens"] and [r["devices"] for r in res["rows"]] == [1, 2]
    assert [(r["devices"], r["tokens"]) for r in res["layer"]] == [(2, 1), (2, 5)]
    assert all(r["max_abs_diff"] < 1e-5 and r["psum_ms"] > 0 and r["all_to_all_ms"] > 0 for r in res["layer"])
    assert "all-to-all / psum" in proc.stdout

"""Every model family on tiny random configs that are NOT the tests' fixed cases: for each family in
FAMILIES, draw configs (sizes, heads, experts, top-k, layers and the family's own options) from a
seeded RNG, build the transformers model (f32, eval, every parameter perturbed, with the builders
of tests/hf_<family>.py: this script imports from tests/, so run it from the repository root),
save, convert (LO int4 with a group that divides the expert dimensions) and check, against
transformers:

* full-forward logits, max error relative to the logit scale <= 1e-4;
* 16 greedy tokens equal HF generate (explicit attention mask) on 2 prompts (the table also says
  how many distinct tokens they hold: a generation stuck on one token makes the comparison weak);
* the budgeted runtime (about a quarter of each layer's experts HI, dynaexq, update_period 4,
  delta 0, segment 4) generating 16 tokens: promotions > 0, no device stalls, owned bytes
  within budget.

One row per config; writes benchmarks/results/families_check.json; exit status 1 if any fails.
    python benchmarks/families_check.py [--seed 0] [--per-family 2] [--families mixtral,olmoe]"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))           # tests/ (the HF builders)

from common import write_result  # noqa: E402  (benchmarks/common.py)

TOL = 1e-4
NEW_TOKENS = 16
MAX_LEN = 64
FULL, SLIDING, LINEAR = "full_attention", "sliding_attention", "linear_attention"


def pick(rng, options):
    return options[int(rng.integers(len(options)))]


def coin(rng, p: float = 0.5) -> bool:
    return bool(rng.random() < p)


def attention(rng, *, free_head_dim: bool = True) -> dict:
    """Hidden size, layers and (GQA) heads; head_dim drawn where the family lets it differ from
    hidden_size / heads."""
    heads = pick(rng, (2, 4))
    d = dict(hidden_size=pick(rng, (32, 48, 64)), num_hidden_layers=pick(rng, (2, 3, 4)), num_attention_heads=heads,
             num_key_value_heads=pick(rng, [k for k in (1, 2, 4) if heads % k == 0]))
    if free_head_dim:
        d["head_dim"] = pick(rng, (8, 16, 32))
    return d


def experts(rng, top_k: int | None = None) -> tuple[int, int]:
    e = pick(rng, (4, 6, 8, 12, 16))
    return e, top_k or int(rng.integers(1, min(4, e // 2) + 1))


def moe_schedule(rng, layers: int) -> dict:
    """Qwen-style mlp_only_layers / decoder_sparse_step that leave at least one MoE layer."""
    while True:
        step = pick(rng, (1, 1, 2))
        dense = sorted(int(i) for i in np.flatnonzero(rng.random(layers) < 0.3))
        if any((i + 1) % step == 0 and i not in dense for i in range(layers)):
            return dict(decoder_sparse_step=step, mlp_only_layers=dense)


def layout(rng, layouts=("per_expert", "fused")) -> dict:
    d = dict(layout=pick(rng, layouts))
    if coin(rng, 0.3):
        d["max_shard_size"] = "100KB"
    return d


# Each sampler returns the builder's keyword arguments (sizes and options) for one config.

def sample_qwen3_moe(rng) -> dict:
    d = attention(rng)
    d["num_experts"], d["num_experts_per_tok"] = experts(rng)
    d.update(moe_schedule(rng, d["num_hidden_layers"]), moe_intermediate_size=pick(rng, (16, 32, 48)),
             intermediate_size=pick(rng, (32, 64)), norm_topk_prob=coin(rng), tie_word_embeddings=coin(rng),
             attention_bias=coin(rng), **layout(rng))
    return d


def sample_qwen3_next(rng) -> dict:
    d = attention(rng)
    d["num_experts"], d["num_experts_per_tok"] = experts(rng)
    n = d["num_hidden_layers"]
    if coin(rng):
        d["full_attention_interval"] = pick(rng, (2, 3, 4))
    else:   # explicit layer_types, at least one of each mixer
        types = [pick(rng, (LINEAR, FULL)) for _ in range(n)]
        full, linear = rng.choice(n, 2, replace=False)
        types[full], types[linear] = FULL, LINEAR
        d["layer_types"] = types
    keys = pick(rng, (1, 2))
    d.update(moe_schedule(rng, n), moe_intermediate_size=pick(rng, (16, 32)),
             shared_expert_intermediate_size=pick(rng, (16, 48)), intermediate_size=pick(rng, (32, 64)),
             linear_num_key_heads=keys, linear_num_value_heads=keys * pick(rng, (1, 2)),
             linear_key_head_dim=pick(rng, (8, 16)), linear_value_head_dim=pick(rng, (8, 16)),
             linear_conv_kernel_dim=pick(rng, (2, 3, 4)), partial_rotary_factor=pick(rng, (0.25, 0.5, 1.0)),
             norm_topk_prob=coin(rng), attention_bias=coin(rng), tie_word_embeddings=coin(rng), mtp=coin(rng, 0.3),
             **layout(rng))
    return d


def sample_mixtral(rng) -> dict:
    d = attention(rng)
    d["num_local_experts"], d["num_experts_per_tok"] = experts(rng)
    d.update(intermediate_size=pick(rng, (16, 32, 48)), sliding_window=pick(rng, (None, 3, 5, 8)),
             tie_word_embeddings=coin(rng), **layout(rng, ("per_expert", "fused", "in_memory")))
    return d


def sample_olmoe(rng) -> dict:
    d = attention(rng, free_head_dim=False)   # OLMoE's q_norm spans hidden_size: head_dim = hidden / heads
    d["num_experts"], d["num_experts_per_tok"] = experts(rng)
    d.update(intermediate_size=pick(rng, (16, 32, 48)), clip_qkv=pick(rng, (None, 0.5, 1.0, 3.0)),
             norm_topk_prob=coin(rng), attention_bias=coin(rng), tie_word_embeddings=coin(rng), **layout(rng))
    return d


def sample_qwen2_moe(rng) -> dict:
    d = attention(rng, free_head_dim=False)
    d["num_experts"], d["num_experts_per_tok"] = experts(rng)
    d.update(moe_schedule(rng, d["num_hidden_layers"]), moe_intermediate_size=pick(rng, (16, 32, 48)),
             shared_expert_intermediate_size=pick(rng, (16, 48)), intermediate_size=pick(rng, (32, 64)),
             norm_topk_prob=coin(rng), qkv_bias=coin(rng), tie_word_embeddings=coin(rng), **layout(rng))
    return d


def sample_phimoe(rng) -> dict:
    from tests.hf_phimoe import longrope
    d = attention(rng, free_head_dim=False)
    d["num_local_experts"], d["num_experts_per_tok"] = experts(rng, top_k=2)   # sparsemixer: always 2
    if coin(rng):   # a threshold the prompts + 16 generated tokens cross
        d["rope_parameters"] = longrope(pick(rng, (8, 12, 16)), head_dim=d["hidden_size"] // d["num_attention_heads"])
    d.update(intermediate_size=pick(rng, (16, 32, 48)), router_jitter_noise=pick(rng, (0.01, 0.05, 0.1)),
             attention_bias=coin(rng), lm_head_bias=coin(rng), sliding_window=pick(rng, (None, 4, 8)),
             tie_word_embeddings=coin(rng), **layout(rng, ("per_expert", "fused", "in_memory")))
    return d


def sample_deepseek(rng, version: int) -> dict:
    d = attention(rng)
    del d["head_dim"]
    d["num_key_value_heads"] = d["num_attention_heads"]     # MLA: one key/value per head
    e = pick(rng, (4, 8, 16))
    k = int(rng.integers(1, min(4, e // 2) + 1))
    d.update(n_routed_experts=e, num_experts_per_tok=k, n_shared_experts=pick(rng, (1, 2)),
             moe_intermediate_size=pick(rng, (16, 32)), intermediate_size=pick(rng, (32, 64)),
             q_lora_rank=pick(rng, (None, 16, 24)), kv_lora_rank=pick(rng, (16, 32)),
             qk_nope_head_dim=pick(rng, (8, 16)), qk_rope_head_dim=pick(rng, (4, 8)), v_head_dim=pick(rng, (8, 16)),
             first_k_dense_replace=int(rng.integers(0, d["num_hidden_layers"])),
             routed_scaling_factor=pick(rng, (1.0, 1.5, 2.5)), attention_bias=coin(rng),
             tie_word_embeddings=coin(rng), **layout(rng))
    # groups that divide the experts, of at least 2 for noaux_tc (it ranks groups by their top-2),
    # and enough selected groups to hold top-k
    min_size = 2 if version == 3 else 1
    groups = [g for g in (1, 2, 4, 8) if e % g == 0 and e // g >= min_size]
    if version == 2:
        d["topk_method"] = pick(rng, ("greedy", "group_limited_greedy"))
    if version == 3 or d["topk_method"] == "group_limited_greedy":
        g = pick(rng, groups)
        d.update(n_group=g, topk_group=pick(rng, [t for t in range(1, g + 1) if t * (e // g) >= k]))
    else:
        d.update(n_group=1, topk_group=1)
    if version == 3:
        d.update(norm_topk_prob=coin(rng), rope_interleave=coin(rng))
    if coin(rng):
        d["rope_parameters"] = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                    original_max_position_embeddings=128, beta_fast=32, beta_slow=1,
                                    mscale=pick(rng, (0.707, 1.0)), mscale_all_dim=pick(rng, (0.707, 1.0)))
    return d


def sample_gpt_oss(rng) -> dict:
    d = attention(rng)
    d["num_local_experts"], d["num_experts_per_tok"] = experts(rng)
    n = d["num_hidden_layers"]
    d.update(intermediate_size=pick(rng, (16, 32, 64)), sliding_window=pick(rng, (2, 3, 4, 8)),
             swiglu_limit=pick(rng, (7.0, 1.0, 0.3)), attention_bias=coin(rng))
    if coin(rng):   # otherwise GptOssConfig's alternating default
        d["layer_types"] = [pick(rng, (SLIDING, FULL)) for _ in range(n)]
    d["rope_parameters"] = pick(rng, (
        dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=coin(rng),
             original_max_position_embeddings=16, rope_theta=150000.0),
        dict(rope_type="default", rope_theta=10000.0), None))
    if d["rope_parameters"] is None:
        del d["rope_parameters"]       # GptOssConfig's own default YaRN
    # The released checkpoints' MXFP4 experts (blocks of 32 along K)
    d["mxfp4"] = d["hidden_size"] % 32 == 0 and d["intermediate_size"] % 32 == 0 and coin(rng)
    return d


def _builders():
    """family -> (sampler, builder(tmp, seed, **options)), with the tests' builder settings (a
    larger init scale than HF's default keeps greedy generations from collapsing into one token)."""
    from tests.hf_deepseek import make_tiny_deepseek
    from tests.hf_gpt_oss import make_tiny_gpt_oss
    from tests.hf_mixtral import make_tiny_mixtral
    from tests.hf_models import make_tiny_qwen3_moe, make_tiny_qwen3_next
    from tests.hf_olmoe import make_tiny_olmoe
    from tests.hf_phimoe import make_tiny_phimoe
    from tests.hf_qwen2_moe import make_tiny_qwen2_moe

    init = dict(initializer_range=0.08)
    no_eos = dict(init, eos_token_id=None)
    return {
        "qwen3_moe": (sample_qwen3_moe, lambda t, s, **o: make_tiny_qwen3_moe(t, seed=s, **no_eos, **o)),
        "qwen3_next": (sample_qwen3_next, lambda t, s, **o: make_tiny_qwen3_next(t, seed=s, **no_eos, **o)),
        "deepseek_v2": (lambda r: sample_deepseek(r, 2),
                        lambda t, s, **o: make_tiny_deepseek(t, seed=s, version=2, **no_eos, **o)),
        "deepseek_v3": (lambda r: sample_deepseek(r, 3),
                        lambda t, s, **o: make_tiny_deepseek(t, seed=s, version=3, **no_eos, **o)),
        "phimoe": (sample_phimoe, lambda t, s, **o: make_tiny_phimoe(t, seed=s, **no_eos, **o)),
        "mixtral": (sample_mixtral, lambda t, s, **o: make_tiny_mixtral(t, seed=s, **init, **o)),
        "olmoe": (sample_olmoe, lambda t, s, **o: make_tiny_olmoe(t, seed=s, **init, **o)),
        "qwen2_moe": (sample_qwen2_moe, lambda t, s, **o: make_tiny_qwen2_moe(t, seed=s, **init, **o)),
        "gpt_oss": (sample_gpt_oss, lambda t, s, **o: make_tiny_gpt_oss(t, seed=s, **init, **o)),
    }


SHORT = dict(hidden_size="H", num_hidden_layers="L", num_attention_heads="h", num_key_value_heads="kv",
             head_dim="d", num_experts="E", num_local_experts="E", n_routed_experts="E", num_experts_per_tok="k",
             moe_intermediate_size="I", intermediate_size="Id")


def short(options: dict) -> str:
    """The drawn options in short: sizes as H64 L3 h4 kv2 d16 E8 k2, the rest as key=value."""
    parts = [f"{SHORT[k]}{v}" for k, v in options.items() if k in SHORT]
    for k, v in options.items():
        if k in SHORT or v is None or v is False or v == []:
            continue
        if k == "rope_parameters":
            v = v["rope_type"] + (f"@{v['original_max_position_embeddings']}" if v["rope_type"] != "default" else "")
        elif k == "layer_types":
            v = "".join(t[0] for t in v)
        parts.append(k if v is True else f"{k}={v}")
    return " ".join(parts)


def lo_format(cfg) -> str:
    """int4 with the largest group <= 32 dividing both expert input dimensions (H and I)."""
    return f"int4:g{math.gcd(cfg.hidden_size, cfg.moe_intermediate_size, 32)}"


def check(name: str, build, options: dict, seed: int, tmp: Path) -> dict:
    import torch

    import dynaexq_jax
    from checkpoints_convert import convert
    from dynaexq_jax.model.config import load_hf_config
    from dynaexq_jax.runtime.engine import Engine
    from dynaexq_jax.serving.checkpoint import load_checkpoint

    hf_dir, hf = build(tmp, seed, **options)
    lo = lo_format(load_hf_config(hf_dir))
    path = convert(hf_dir, tmp / "conv", lo=lo, progress=False)
    ours = dynaexq_jax.load(path)
    cfg = ours.config
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (3, 17))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.float().numpy()
    err = float(np.abs(ours.logits(ids) - ref).max() / np.abs(ref).max())

    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 11)]
    got = ours.generate(prompts, max_new_tokens=NEW_TOKENS, stop_tokens=(), segment_len=8).tokens
    want = []
    for p in prompts:
        t = torch.tensor([p])
        with torch.no_grad():
            want.append(hf.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(p):].tolist())

    ckpt = load_checkpoint(path)
    probe = Engine(ckpt, budget_bytes=10**9, policy="all-lo", batch=2, max_len=MAX_LEN, segment_len=4).plan
    n_hi = max(1, cfg.num_experts // 4)     # room for about a quarter of each layer's experts in HI
    budget = int((probe.total - probe.fixed.margin + n_hi * len(probe.n_hi) * (probe.m_hi - probe.m_lo)) / 0.98) + 1
    eng = Engine(ckpt, budget_bytes=budget, policy="dynaexq", update_period=4, delta=0.0, batch=2, max_len=MAX_LEN,
                 segment_len=4)
    res = eng.generate([[3, 5, 7, 9, 11], [200, 100]], max_new_tokens=NEW_TOKENS, stop_tokens=())
    c = res.runtime["counters"]
    owned = max(t["owned_bytes"] for t in eng.timeline)
    row = dict(lo=lo, logits_rel_err=err, greedy_equal=got == want, distinct_greedy_tokens=len(set(sum(got, []))),
               hi_slots=list(eng.plan.n_hi), promotions=int(c["promotions"]), device_stalls=int(c["device_stalls"]),
               max_owned_bytes=int(owned), budget_for_owned=int(eng.budget_for_owned),
               runtime_tokens=[len(t) for t in res.tokens])
    row["passed"] = bool(err <= TOL and row["greedy_equal"] and row["promotions"] > 0 and row["device_stalls"] == 0
                         and owned <= eng.budget_for_owned and all(n == NEW_TOKENS for n in row["runtime_tokens"]))
    return row


def main(argv=None) -> int:
    from dynaexq_jax.model.families import FAMILIES

    builders = _builders()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-family", type=int, default=2)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated model types")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "families_check.json"))
    a = ap.parse_args(argv)
    names = [f for f in a.families.split(",") if f]
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown} (known: {', '.join(FAMILIES)})")
    missing = sorted(set(FAMILIES) - set(builders))
    if missing:
        ap.error(f"no sampler for {missing}: add one to this script")

    rows = []
    t_all = time.perf_counter()
    print(f"{'family':<12} {'config':<100} {'rel err':>8} {'greedy':>6} {'distinct':>8} {'promo':>5}  result",
          flush=True)
    for name in names:
        sample, build = builders[name]
        # a family's draws depend on the seed and the family, not on which other families run
        rng = np.random.default_rng([a.seed, list(FAMILIES).index(name)])
        for i in range(a.per_family):
            options = sample(rng)
            row = dict(family=name, index=i, options=options, short=short(options))
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    row.update(check(name, build, options, seed=a.seed * 1000 + i, tmp=Path(tmp)))
                except Exception as e:   # a failing config is a result, reported with its error
                    row.update(passed=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            row["seconds"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            if "error" in row:
                print(f"{name:<12} {row['short']:<100} {'-':>8} {'-':>6} {'-':>8} {'-':>5}  FAIL "
                      f"{row['error'][:300]}", flush=True)
            else:
                print(f"{name:<12} {row['short']:<100} {row['logits_rel_err']:8.1e} {str(row['greedy_equal']):>6} "
                      f"{row['distinct_greedy_tokens']:>8} {row['promotions']:>5}  "
                      f"{'pass' if row['passed'] else 'FAIL'} ({row['seconds']}s)", flush=True)
    failed = [r for r in rows if not r["passed"]]
    total = round(time.perf_counter() - t_all, 1)
    print(f"{len(rows) - len(failed)}/{len(rows)} configs passed in {total}s")
    write_result(a.out, benchmark="families_check", seed=a.seed, per_family=a.per_family, families=names,
                 tolerance=TOL, new_tokens=NEW_TOKENS, seconds=total, passed=not failed, rows=rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The budget's workspace term against what XLA compiles, chunked prefill, the XLA path's bounded
dequantization, and budget planning from a config alone (no weights) or a converted checkpoint's
metadata, with sizes or shares as the budget."""
import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dynaexq_jax
from checkpoints_convert import convert
from dynaexq_jax.cli import main
from dynaexq_jax.errors import BudgetError, InfeasibleBudgetError, RuntimeConfigError
from dynaexq_jax.experiments.synthetic import qwen3_moe_config, write_random_checkpoint
from dynaexq_jax.model.config import parse_hf_config
from dynaexq_jax.model.families import family, schema
from dynaexq_jax.model.moe import (
    ExpertPools,
    TierPool,
    moe_experts_reference,
    moe_experts_xla,
    quantize_experts,
    route,
)
from dynaexq_jax.model.moe import xla as xla_moe
from dynaexq_jax.model.quant import QTensor, parse_format, parse_tier_format
from dynaexq_jax.runtime import budget
from dynaexq_jax.runtime.config import EngineConfig
from dynaexq_jax.runtime.engine import Engine
from dynaexq_jax.runtime.pools import tree_nbytes
from dynaexq_jax.serving import generate as generate_mod
from dynaexq_jax.serving.checkpoint import load_checkpoint
from dynaexq_jax.serving.generate import Controller, generate
from dynaexq_jax.serving.scoring import score_chunk

TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64)
TINY_NEXT = dict(model_type="qwen3_next", vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                 shared_expert_intermediate_size=48, intermediate_size=96, linear_num_key_heads=2,
                 linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8, rope_theta=10000.0,
                 eos_token_id=0, torch_dtype="float32")
LO = "int4:g32"
GiB = 2**30

# The published config.json of each model (values as on the Hugging Face hub), with the totals of
# their model cards: 30.5B parameters, and 80B.
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=151643,
    decoder_sparse_step=1, eos_token_id=151645, head_dim=128, hidden_act="silu", hidden_size=2048,
    initializer_range=0.02, intermediate_size=6144, max_position_embeddings=40960, max_window_layers=48,
    mlp_only_layers=[], model_type="qwen3_moe", moe_intermediate_size=768, norm_topk_prob=True,
    num_attention_heads=32, num_experts=128, num_experts_per_tok=8, num_hidden_layers=48, num_key_value_heads=4,
    output_router_logits=False, rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000.0,
    router_aux_loss_coef=0.001, sliding_window=None, tie_word_embeddings=False, torch_dtype="bfloat16",
    transformers_version="4.51.0", use_cache=True, use_sliding_window=False, vocab_size=151936)
QWEN3_NEXT_80B_A3B = dict(
    architectures=["Qwen3NextForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=151643,
    decoder_sparse_step=1, eos_token_id=151645, full_attention_interval=4, head_dim=256, hidden_act="silu",
    hidden_size=2048, initializer_range=0.02, intermediate_size=5120, linear_conv_kernel_dim=4,
    linear_key_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32, linear_value_head_dim=128,
    max_position_embeddings=262144, mlp_only_layers=[], model_type="qwen3_next", moe_intermediate_size=512,
    norm_topk_prob=True, num_attention_heads=16, num_experts=512, num_experts_per_tok=10, num_hidden_layers=48,
    num_key_value_heads=2, output_router_logits=False, partial_rotary_factor=0.25, rms_norm_eps=1e-06,
    rope_scaling=None, rope_theta=10000000, router_aux_loss_coef=0.001, shared_expert_intermediate_size=512,
    tie_word_embeddings=False, torch_dtype="bfloat16", transformers_version="4.57.0.dev0", use_cache=True,
    use_sliding_window=False, vocab_size=151936)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF directory, converted checkpoint) of a random TINY Qwen3-MoE."""
    tmp = tmp_path_factory.mktemp("budget")
    hf = write_random_checkpoint(tmp / "hf", qwen3_moe_config(**TINY), seed=3, tokenizer=False)
    return hf, load_checkpoint(convert(hf, tmp / "conv", progress=False))      # int4: its group adapts to 32


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---- the workspace term against XLA's memory analysis ----------------------------------------------
MOE = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
           head_dim=64, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256)
NEXT = dict(TINY_NEXT, vocab_size=8192, hidden_size=256, head_dim=64, num_experts=32, num_experts_per_tok=4,
            moe_intermediate_size=128, shared_expert_intermediate_size=128, intermediate_size=256,
            linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64)
# DeepSeek-V3's MLA (its own attention_workspace_bytes) with q LoRA, a dense first layer and a shared expert.
DEEPSEEK = dict(model_type="deepseek_v3", vocab_size=8192, hidden_size=512, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=8, q_lora_rank=96, kv_lora_rank=128, qk_nope_head_dim=32,
                qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=32, num_experts_per_tok=4, n_group=4,
                topk_group=2, moe_intermediate_size=128, n_shared_experts=1, intermediate_size=256,
                first_k_dense_replace=1, rope_theta=10000.0, eos_token_id=0, torch_dtype="float32")


@pytest.mark.parametrize("family_cfg, dtype, batch, chunk, max_len, backend, lo", [
    (qwen3_moe_config(**MOE), np.float32, 1, 64, 1024, "xla", "int4"),
    (qwen3_moe_config(**MOE), ml_dtypes.bfloat16, 4, 128, 2048, "xla", "int4"),
    (qwen3_moe_config(**MOE), ml_dtypes.bfloat16, 1, 128, 2048, "xla", "int4"),
    (NEXT, np.float32, 2, 512, 2048, "xla", "int4"),
    (NEXT, ml_dtypes.bfloat16, 4, 64, 512, "xla", "int4"),
    (qwen3_moe_config(**MOE), np.float32, 1, 512, 4096, "xla-only", "int4"),
    (qwen3_moe_config(**MOE), np.float32, 2, 256, 1024, "xla-only", "int2:g64:hqq+down=int4"),
    (DEEPSEEK, np.float32, 2, 512, 2048, "xla", "int4"),
    (DEEPSEEK, ml_dtypes.bfloat16, 1, 256, 4096, "xla", "int4"),
], ids=["moe-f32-kernel", "moe-bf16-kernel", "moe-bf16-batch1-kernel", "next-f32-kernel", "next-bf16-kernel",
        "moe-f32-xla", "moe-f32-xla-down-own-format", "deepseek-f32-kernel", "deepseek-bf16-kernel"])
def test_the_workspace_term_bounds_what_the_compiled_programs_need(family_cfg, dtype, batch, chunk, max_len,
                                                                   backend, lo):
    """workspace_bytes is never below XLA's memory analysis of the prefill chunk and the decode
    segment (plus, where the CPU kernel serves, its own scratch, which XLA does not see), and on
    the kernel path (the CPU default) within 2x of it (the attention term holds a prefill's f32
    scores and widened probabilities at once, as XLA does at batch 1; at batch 4 its schedule
    reuses one of them). The XLA path's term is an upper bound only: it counts the worst split of
    the experts between the tiers."""
    cfg = parse_hf_config(family_cfg)
    hi, lo = parse_tier_format("bf16"), parse_tier_format(lo)
    dense = sum(math.prod(s.shape) for _, _, s in schema.leaves(family(cfg.model_type).abstract(cfg))
                if isinstance(s, schema.Tensor)) * np.dtype(dtype).itemsize
    measured = budget.measured_workspace(cfg, hi=hi, lo=lo, n_hi=8, dtype=dtype, batch=batch, max_len=max_len,
                                         prefill_len=chunk, backend=backend)
    kernel = budget.cpu_kernel.serves(backend)
    scratch = 2 * budget.cpu_kernel.scratch_bytes(batch * chunk, cfg.num_experts_per_tok, cfg.hidden_size,
                                                  cfg.moe_intermediate_size) if kernel else 0
    need = max(measured["prefill"], measured["decode"], scratch)
    formula = budget.workspace_bytes(cfg, batch, max_len, chunk, backend, hi, lo, dtype, dense)
    assert formula >= need, (formula, measured, scratch)
    if kernel:
        assert formula <= 2 * need, (formula, measured, scratch)


def test_a_one_prompt_prefill_workspace_bounds_the_servers_programs():
    """prefill_batch=1 (the server prefills one joining request while `batch` rows decode): the term
    bounds the batch-1 prefill chunk and the batch-B decode segment, and is far below batch-B prefill's."""
    cfg = parse_hf_config(qwen3_moe_config(**MOE))
    hi, lo = parse_format("bf16"), parse_format("int4")
    batch, chunk, max_len = 9, 256, 1024
    one = budget.measured_workspace(cfg, hi=hi, lo=lo, n_hi=8, dtype=np.float32, batch=1, max_len=max_len,
                                    prefill_len=chunk, backend="xla")
    rows = budget.measured_workspace(cfg, hi=hi, lo=lo, n_hi=8, dtype=np.float32, batch=batch, max_len=max_len,
                                     prefill_len=chunk, backend="xla")
    scratch = 2 * budget.cpu_kernel.scratch_bytes(chunk, cfg.num_experts_per_tok, cfg.hidden_size,
                                                  cfg.moe_intermediate_size)
    formula = budget.workspace_bytes(cfg, batch, max_len, chunk, "xla", hi, lo, np.float32, prefill_batch=1)
    assert formula >= max(one["prefill"], rows["decode"], scratch), (formula, one, rows)
    assert formula < budget.workspace_bytes(cfg, batch, max_len, chunk, "xla", hi, lo, np.float32) / 3
    with pytest.raises(RuntimeConfigError, match="prefill_batch"):
        EngineConfig(batch=2, prefill_batch=3)


def test_scoring_holds_one_chunk_of_logits_and_nothing_vocabulary_sized_besides():
    cfg = parse_hf_config(qwen3_moe_config(**dict(TINY, vocab_size=65536, num_hidden_layers=2)))
    B, C, S = 2, 16, 64
    f32 = parse_format("f32")

    def leaf(spec):
        if isinstance(spec, schema.Experts):
            shapes = ((spec.hidden, spec.inter), (spec.hidden, spec.inter), (spec.inter, spec.hidden))
            pool = TierPool(*(QTensor(jax.ShapeDtypeStruct((spec.num_experts, k, n), np.float32), None, f32)
                              for k, n in shapes))
            ids = jax.ShapeDtypeStruct((spec.num_experts,), np.int32)
            return ExpertPools((pool,), ids, ids)
        return jax.ShapeDtypeStruct(spec.shape, np.float32)
    params = jax.tree.map(leaf, family("qwen3_moe").abstract(cfg))
    cache = jax.eval_shape(lambda: family("qwen3_moe").init_cache(cfg, B, S, np.float32))
    tokens = jax.ShapeDtypeStruct((B, C), np.int32)
    scores = jax.ShapeDtypeStruct((len(cfg.moe_layers), cfg.num_experts), np.float32)
    valid = jax.ShapeDtypeStruct((B, C), np.bool_)
    temp = score_chunk.lower(params, cfg, cache, tokens, tokens, valid, scores, backend="xla",
                             alpha=0.9).compile().memory_analysis().temp_size_in_bytes
    logits = B * C * cfg.vocab_size * 4
    assert logits <= temp < 1.1 * logits


# ---- the XLA path dequantizes a group of experts at a time --------------------------------------------
def test_the_xla_path_dequantizes_one_group_of_experts_at_a_time(monkeypatch):
    """With room for about two experts per group, the routed, dense and grouped paths run as loops
    over groups: the output (and on the grouped path, which training takes, the gradients) of the
    dense reference, and far less than the dequantized pools in memory."""
    monkeypatch.setattr(xla_moe, "GROUP_BYTES", 400 * 2**10)
    r = np.random.default_rng(0)
    E, H, I, k = 32, 128, 64, 4
    raw = [r.standard_normal(s).astype(np.float32) * 0.1 for s in [(E, H, I), (E, H, I), (E, I, H)]]
    sets = np.split(r.permutation(E), [12])
    pools = tuple(quantize_experts(*[w[s] for w in raw], spec) for s, spec in zip(sets, ("bf16", "int4:g32")))
    tier, slot = np.zeros(E, np.int32), np.zeros(E, np.int32)
    for t, s in enumerate(sets):
        tier[s], slot[s] = t, np.arange(len(s))
    experts = jax.device_put(ExpertPools(pools, jnp.asarray(tier), jnp.asarray(slot)))
    dequantized = sum(3 * H * I * 4 * p.size for p in pools)
    router = jnp.asarray(r.standard_normal((H, E)), jnp.float32)
    for T, strategy in ((2, "routed"), (12, "dense"), (512, "grouped")):
        assert {xla_moe.xla_strategy(T, k, p.size, E) for p in pools} == {strategy}
        x = jnp.asarray(r.standard_normal((T, H)), jnp.float32)
        ids, w, _ = route(x, router, k, True)
        op = jax.jit(lambda x, w, ids=ids: moe_experts_xla(x, ids, w, experts, use_kernel=False))
        ref = jax.jit(lambda x, w, ids=ids: moe_experts_reference(x, ids, w, experts))
        np.testing.assert_allclose(op(x, w), ref(x, w), rtol=2e-4, atol=2e-4)
        temp = op.lower(x, w).compile().memory_analysis().temp_size_in_bytes
        bound = xla_moe.workspace_bytes(*(p.fmt for p in pools), T, k, E, H, I, np.float32, layers=1)
        assert temp <= bound and temp < dequantized / 2, (strategy, temp, bound, dequantized)
    grads = [jax.grad(lambda x, w, f=f: (f(x, w) ** 2).sum(), argnums=(0, 1))(x, w) for f in (op, ref)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


# ---- chunked prefill -------------------------------------------------------------------------------
class PrefillMass(Controller):
    def after_prefill(self, mass, scores):
        self.mass = mass


@pytest.mark.parametrize("config", [qwen3_moe_config(**TINY), TINY_NEXT], ids=["qwen3_moe", "qwen3_next"])
def test_long_prompts_are_prefilled_chunk_by_chunk_with_the_same_result(config, tmp_path, monkeypatch):
    """Prompts of 70, 13 and 40 tokens in chunks of 16 positions: every chunk but the last shares one
    shape, and the tokens (and the prefill's router mass) are those of one prefill forward."""
    model = dynaexq_jax.load(convert(write_random_checkpoint(tmp_path / "hf", config, seed=5, tokenizer=False),
                                     tmp_path / "conv", lo=LO, progress=False))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, config["vocab_size"], n).tolist() for n in (70, 13, 40)]
    shapes, step = [], generate_mod.prefill_chunk

    def recorded(params, cfg, tokens, *args, **kw):
        shapes.append(tokens.shape)
        return step(params, cfg, tokens, *args, **kw)
    monkeypatch.setattr(generate_mod, "prefill_chunk", recorded)
    runs = {}
    for chunk in (16, 512):
        ctl = PrefillMass()
        runs[chunk] = generate(model.params, model.config, prompts, max_new_tokens=12, stop_tokens=(),
                               prefill_chunk=chunk, controller=ctl).tokens, ctl.mass
    assert shapes == [(3, 16)] * 5 + [(3, 80)]               # 80 = the prompts padded to 16 tokens
    assert runs[16][0] == runs[512][0]
    np.testing.assert_allclose(runs[16][1], runs[512][1], rtol=1e-5, atol=1e-6)


# ---- budget planning from a config alone ----------------------------------------------------------------
@pytest.mark.parametrize("config, params_b, budget_text, slots", [
    (QWEN3_30B_A3B, 30.5, "32GiB", (38, 46)),
    (QWEN3_NEXT_80B_A3B, 80, "64GiB", (80, 110)),
], ids=["qwen3-30b-a3b", "qwen3-next-80b-a3b"])
def test_budget_from_a_published_config_alone(config, params_b, budget_text, slots, tmp_path, capsys):
    """The published config.json and nothing else: the schema's parameter count matches the model
    card, and `dynaexq budget --json` (bf16/int4, batch 1, 4096 tokens, the GPU kernels) keeps the
    workspace under 1 GiB and gives about 40 HI slots per layer to Qwen3-30B-A3B at 32 GiB. The
    smallest feasible budget it names is feasible, one byte less is not."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    info = budget.model_info(tmp_path / "config.json")
    cfg = info.config
    experts = len(cfg.moe_layers) * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert info.dense_format.name == "bf16" and info.tiers["hi"].name == "bf16" and info.tiers["lo"].name == "int4:g128"
    assert abs(info.dense_nbytes / 2 + experts - params_b * 1e9) < 0.5e9
    common = ("--max-len", 4096, "--backend", "pallas", "--json")
    rc, out, err = run(capsys, "budget", tmp_path, "--budget", budget_text, *common)
    assert rc == 0, err
    report = json.loads(out)
    assert report["feasible"] and report["workspace_bytes"] < GiB and report["dense_bytes"] == info.dense_nbytes
    assert len(set(report["hi_slots_per_layer"])) == 1 and slots[0] <= report["hi_slots_per_layer"][0] <= slots[1]
    assert report["total_bytes"] <= report["budget_bytes"] == budget.parse_bytes(budget_text)
    assert report["expert_bytes"] == sum(n * report["expert_hi_bytes"] + (cfg.num_experts - n) * report[
        "expert_lo_bytes"] for n in report["hi_slots_per_layer"])
    smallest = report["min_feasible_bytes"]
    for b, feasible in ((smallest, True), (smallest - 1, False)):
        rc, out, _ = run(capsys, "budget", tmp_path / "config.json", "--budget", b, *common)
        assert rc == 0 and json.loads(out)["feasible"] is feasible
    rc, _, err = run(capsys, "budget", tmp_path, "--budget", smallest - 1, "--max-len", 4096, "--backend", "pallas")
    assert rc == 2 and err.count("\n") == 1 and "the smallest feasible budget is" in err


def test_planning_before_conversion_predicts_the_converted_checkpoint(tiny):
    """The plan from the HF config is the plan of the checkpoint the conversion (with the same,
    default, formats: the LO group shrinks to divide the expert dimensions) wrote, whose dense
    bytes, from its metadata, are those of the restored arrays."""
    hf, ckpt = tiny
    planned, converted = budget.model_info(hf), budget.model_info(ckpt.path)
    assert converted.metadata and not planned.metadata
    assert planned.tiers == converted.tiers and converted.tiers["lo"].name == LO
    assert planned.dense_format == converted.dense_format
    assert planned.dense_nbytes == converted.dense_nbytes == tree_nbytes(ckpt.params)
    settings = EngineConfig(batch=2, max_len=128)
    for b in ("8MiB", "40%"):
        assert budget.plan_for(planned, budget.resolve_budget(b, planned, settings), settings) == \
            budget.plan_for(converted, budget.resolve_budget(b, converted, settings), settings)


def test_the_budget_command_reads_metadata_and_takes_shares(tiny, capsys):
    hf, ckpt = tiny
    rc, out, err = run(capsys, "budget", ckpt.path, "--budget", "25%", "--batch", 2, "--max-len", 128, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["feasible"] and report["hi_slots_per_layer"] == [2] * 3
    engine = Engine(ckpt, budget_bytes="25%", batch=2, max_len=128)
    assert report["budget_bytes"] == engine.plan.budget and tuple(report["hi_slots_per_layer"]) == engine.plan.n_hi
    rc, out, _ = run(capsys, "budget", ckpt.path, "--budget", "1KiB", "--json")
    report = json.loads(out)
    assert rc == 0 and not report["feasible"] and report["hi_slots_per_layer"] is None
    assert "the smallest feasible budget is" in report["error"] and report["min_feasible_bytes"] > 1024
    rc, out, _ = run(capsys, "budget", ckpt.path, "--budget", "25%", "--batch", 2, "--max-len", 128)
    assert rc == 0 and "converted checkpoint" in out and "HI slots per MoE layer" in out
    rc, _, err = run(capsys, "budget", ckpt.path, "--budget", "1GiB", "--hi", "int8")
    assert rc == 2 and "is a converted checkpoint" in err and "--hi" in err
    rc, out, err = run(capsys, "budget", hf / "config.json", "--budget", "1GiB", "--lo", LO, "--json")
    assert rc == 0 and json.loads(out)["lo"] == LO, err


def test_budget_shares(tiny):
    _, ckpt = tiny
    settings = EngineConfig(batch=2, max_len=128)
    assert budget.resolve_budget("25%", ckpt, settings) == budget.budget_for_fraction(ckpt, 0.25, settings)
    assert budget.resolve_budget("1MiB", ckpt, settings) == 2**20
    assert Engine(ckpt, budget_bytes="50%", settings=settings).plan.n_hi == (4,) * 3
    for bad, message in (("abc%", "cannot read the budget share"), ("150%", "between 0% and 100%")):
        with pytest.raises(BudgetError, match=message):
            budget.resolve_budget(bad, ckpt, settings)


def test_a_plan_per_device_of_an_expert_parallel_mesh(tiny, capsys):
    """devices=N: each device holds the dense parameters, cache and workspace and E / N experts of
    every layer under its own budget; shares count its own experts."""
    _, ckpt = tiny
    settings = EngineConfig(batch=2, max_len=128)
    one = budget.plan_for(ckpt, "1GiB", settings)
    two = budget.plan_for(ckpt, "1GiB", settings, devices=2)
    E = ckpt.config.num_experts
    assert two.num_experts == E // 2 and two.fixed == one.fixed and two.devices == 2
    assert two.resident == sum(n * two.m_hi + (E // 2 - n) * two.m_lo for n in two.n_hi)
    quarter = budget.plan_for(ckpt, budget.resolve_budget("50%", ckpt, settings, devices=2), settings, devices=2)
    assert quarter.n_hi == (E // 4,) * len(ckpt.config.moe_layers)            # half of each device's E / 2
    assert quarter.total < budget.plan_for(ckpt, budget.resolve_budget("50%", ckpt, settings), settings).total
    with pytest.raises(RuntimeConfigError, match="do not split evenly across 3 devices"):
        budget.plan_for(ckpt, "1GiB", settings, devices=3)
    rc, out, err = run(capsys, "budget", ckpt.path, "--budget", "50%", "--batch", 2, "--max-len", 128, "--devices", 2,
                       "--json")
    report = json.loads(out)
    assert rc == 0 and report["devices"] == 2 and report["hi_slots_per_layer"] == list(quarter.n_hi), err
    rc, out, _ = run(capsys, "budget", ckpt.path, "--budget", "50%", "--devices", 2)
    assert rc == 0 and "each of 2 devices" in out
    rc, _, err = run(capsys, "budget", ckpt.path, "--budget", "50%", "--devices", 0)
    assert rc == 2 and "--devices must be an integer >= 1" in err


def test_a_policy_that_fixes_every_tier_is_planned_whole(tiny):
    """all-hi needs every expert HI: a budget short of it is infeasible and names the smallest that
    holds it; at that budget every slot is HI."""
    _, ckpt = tiny
    settings = EngineConfig(policy="all-hi", batch=2, max_len=128)
    enough = budget.budget_for_fraction(ckpt, 1.0, settings)
    assert budget.plan_for(ckpt, enough, settings).n_hi == (8,) * 3
    with pytest.raises(InfeasibleBudgetError, match=budget.smallest_budget_text(enough).split(" (")[0]):
        budget.plan_for(ckpt, enough - 1, settings)
    with pytest.raises(RuntimeConfigError, match="converted checkpoint"):
        budget.model_info(ckpt.path, lo="int2")

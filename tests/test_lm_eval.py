"""The lm-eval model `dynaexq` (dynaexq_jax.lm_eval): the same loglikelihoods and greedy generations
as lm-eval's own `hf` model (transformers, f32) on the same weights and tasks; padding and batching
change no score; the budgeted runtime runs live under it; `dynaexq eval`; the local task suite;
bad options and requests are typed errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

# Nothing is downloaded: the local suite reads its JSONL, the hf reference a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from dynaexq_jax.cli import main  # noqa: E402
from dynaexq_jax.errors import EvaluationError, GenerationError  # noqa: E402
from dynaexq_jax.experiments import corpus, default_model  # noqa: E402
from dynaexq_jax.lm_eval import TASKS_DIR, DynaexqLM  # noqa: E402
from dynaexq_jax.lm_eval.suite import DATA_DIR  # noqa: E402

SUITE = ["dynaexq_prose_choice", "dynaexq_code_choice", "dynaexq_code_line", "dynaexq_prose_word",
         "dynaexq_prose_ppl", "dynaexq_code_ppl"]
# A subset of each kind of request: choices (loglikelihood), generations, documents (rolling; the
# code documents are longer than max_len=512 tokens, so they are scored in several windows).
LIMITS = {"dynaexq_prose_choice": 6, "dynaexq_code_line": 6, "dynaexq_prose_word": 4, "dynaexq_code_ppl": 2}


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """The default model converted with its HI tier in the source dtype (the weights HF runs)."""
    return default_model.converted_model(None, tmp_path_factory.mktemp("conv") / "m", hi="source", progress=False)


@pytest.fixture(scope="module")
def manager():
    return TaskManager(include_path=str(TASKS_DIR))


def _evaluate(model, manager, tasks, limit, **kw):
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit, log_samples=True,
                                   bootstrap_iters=0, **kw)


def _responses(res, task):
    return [r[0] for s in res["samples"][task] for r in s["resps"]]


def test_the_suite_loads_and_holds_held_out_documents_only(manager):
    assert set(SUITE) <= set(manager.all_tasks) and "dynaexq_suite" in manager.all_groups
    for f in DATA_DIR.glob("*.jsonl"):
        items = [json.loads(line) for line in f.read_text().splitlines()]
        assert items, f
        # The split is a pure function of the document's name: never a training document.
        assert all(corpus.split_of(x["source"]) == "validation" for x in items), f
        for x in items:
            if "choices" in x:
                assert len(set(x["choices"])) == 4 and 0 <= x["label"] < 4 and x["context"]
            elif "target" in x:
                assert x["context"] and x["target"].strip()
            else:
                assert x["text"]


def test_loglikelihoods_and_generations_equal_lm_evals_hf_model(exact, manager):
    """Every request of a few documents of each task kind: loglikelihoods within 1e-3 relative
    (the greedy flags equal), generations identical."""
    ours = {t: _evaluate(DynaexqLM(pretrained=str(exact), batch_size=4, max_len=512), manager, [t], n)
            for t, n in LIMITS.items()}
    hf = {t: _evaluate("hf", manager, [t], n, model_args=f"pretrained={default_model.HF_DIR},dtype=float32,"
                       "max_length=512", batch_size=4, device="cpu") for t, n in LIMITS.items()}
    for task in LIMITS:
        a, b = _responses(ours[task], task), _responses(hf[task], task)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            if isinstance(y, str):
                assert x == y, task
            else:
                x, y = (x, y) if isinstance(y, (list, tuple)) else ((x,), (y,))
                assert abs(x[0] - y[0]) <= 1e-3 * abs(y[0]), (task, x, y)
                assert x[1:] == tuple(y[1:]) or list(x[1:]) == list(y[1:]), (task, x, y)


def test_a_score_does_not_depend_on_its_batch(exact):
    """Alone, or padded into a batch beside longer and shorter requests: the same loglikelihood."""
    lm = DynaexqLM(pretrained=str(exact), batch_size=4, max_len=256)
    reqs = [Instance("loglikelihood", {}, (ctx, cont), 0) for ctx, cont in
            [("def read(path):\n    with open(path) as f:", "\n        return f.read()"),
             ("The quick brown fox", " jumps"), ("", "import os"),
             ("Return the class to be used when instantiating a logger." * 3, " It is")]]
    together = lm.loglikelihood(reqs, disable_tqdm=True)
    for r, t in zip(reqs, together):
        alone = lm.loglikelihood([r], disable_tqdm=True)[0]
        assert alone[0] == pytest.approx(t[0], rel=1e-5, abs=1e-5) and alone[1] == t[1]


def test_the_budgeted_runtime_serves_the_harness(tmp_path, manager):
    """Under a 20% budget, dynaexq swaps experts while lm-eval runs; the summary reaches the results."""
    lm = DynaexqLM(budget="20%", policy="dynaexq", batch_size=4, max_len=256, period=32, calibration="none")
    res = _evaluate(lm, manager, ["dynaexq_code_choice", "dynaexq_code_line"], 6)
    rt = res["config"]["dynaexq"]
    assert rt["policy"] == "dynaexq" and rt["n_hi"] == [6] * 6 and rt["calls"] > 3
    assert 0 < rt["hi_hit_rate"] < 1 and rt["counters"]["promotions"] > 0 and rt["counters"]["device_stalls"] == 0
    assert rt["counters"]["max_owned_bytes"] <= rt["budget_bytes"]
    assert 0 <= res["results"]["dynaexq_code_choice"]["acc,none"] <= 1


def test_dynaexq_eval_runs_policies_side_by_side_with_the_oracle(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--tasks", "dynaexq_prose_choice", "--limit", "4", "--budget", "20%", "--batch-size", "4",
                 "--max-len", "256", "--policies", "all-lo,oracle,static-calibrated", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for row in ("| all-hi |", "| all-lo |", "| oracle |", "| static-calibrated |"):
        assert row in table
    res = json.loads((out / "results.json").read_text())
    assert res["runs"]["all-hi"]["runtime"]["hi_hit_rate"] == 1.0
    assert res["runs"]["all-lo"]["runtime"]["hi_hit_rate"] == 0.0
    assert res["runs"]["oracle"]["runtime"]["counters"]["promotions"] > 0
    assert (out / "report.md").read_text().strip() in table


def test_on_tokens_can_end_a_generation(exact):
    import dynaexq_jax
    m = dynaexq_jax.load(exact)
    res = m.generate(["def f(x):", "import"], max_new_tokens=40, segment_len=8, stop_tokens=(),
                     on_tokens=lambda toks: True)
    assert [len(t) for t in res.tokens] == [1, 1]
    seen = []
    res = m.generate(["def f(x):"], max_new_tokens=40, segment_len=8, stop_tokens=(),
                     on_tokens=lambda toks: seen.append(len(toks)) or len(seen) == 2)
    assert len(res.tokens[0]) == 9 and seen == [1, 8]


@pytest.mark.parametrize("args, message", [
    (dict(colour="blue"), "unknown dynaexq model args"),
    (dict(policy="dynaexq"), "only with a budget"),
    (dict(strategy="uniform"), "only with a budget"),
    (dict(budget="20%", tier="lo"), "tier applies only without a budget"),
    (dict(tier="mid"), "tier must be hi or lo"),
    (dict(budget="20%", policy="lru"), "unknown policy 'lru'"),
    (dict(budget="20%", policy="oracle"), "needs trace=FILE"),
    (dict(budget="20%", policy="random", calibration="prose"), "calibration applies to"),
    (dict(budget="20%", policy="dynaexq", calibration="poetry"), "calibration must be"),
    (dict(batch_size="auto"), "batch_size=auto"),
    (dict(max_batch_size=64), "max_batch_size"),
    (dict(record_trace="x.npz", budget="20%"), "record_trace applies"),
    (dict(device="tpu"), "JAX runs on"),
    (dict(devices=0), "devices must be an integer >= 1"),
])
def test_bad_model_args_are_typed_errors(args, message, exact):
    with pytest.raises(EvaluationError, match=message):
        DynaexqLM(pretrained=str(exact), **args)


def test_more_devices_than_jax_sees_is_the_runtimes_error(exact):
    from dynaexq_jax.errors import RuntimeConfigError
    with pytest.raises(RuntimeConfigError, match="devices=2, but JAX sees 1 cpu device"):
        DynaexqLM(pretrained=str(exact), devices=2)


def test_bad_requests_and_generation_kwargs_are_typed_errors(exact):
    lm = DynaexqLM(pretrained=str(exact), max_len=128)
    with pytest.raises(EvaluationError, match="does not take: \\['num_beams'\\]"):
        lm.generate_until([Instance("generate_until", {}, ("x = ", {"until": ["\n"], "num_beams": 4}), 0)])
    with pytest.raises(EvaluationError, match="leaves no room"):
        lm.generate_until([Instance("generate_until", {}, ("x = ", {"max_gen_toks": 200}), 0)])
    with pytest.raises(EvaluationError, match="longer than max_len"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("x", " y" * 300), 0)], disable_tqdm=True)
    with pytest.raises(EvaluationError, match="hi/lo apply only"):
        DynaexqLM(pretrained=str(exact), hi="bf16")


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "no_such_task"], "unknown tasks"),
    (["--tasks", "dynaexq_prose_choice", "--tier", "lo", "--budget", "20%"], "--tier applies only"),
    (["--tasks", "dynaexq_prose_choice", "--policy", "dynaexq", "--policies", "all-hi"], "not both"),
    (["--tasks", "dynaexq_prose_choice", "--strategy", "uniform"], "needs --budget"),
    (["--tasks", "dynaexq_prose_choice", "--policies", "all-hi,dynaexq"], "needs --budget"),
    (["--tasks", "dynaexq_prose_choice", "--budget", "20%", "--policies", "best"], "unknown policies"),
    (["--tasks", "dynaexq_prose_choice", "--include-path", "/no/such/dir"], "not a directory"),
])
def test_eval_cli_errors(argv, message, tmp_path, capsys):
    assert main(["eval", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


QWEN_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
             "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def test_chat_templates_render_as_transformers_does(tmp_path, exact):
    from transformers import PreTrainedTokenizerFast

    from dynaexq_jax.serving.tokenizer import TextCodec
    (tmp_path / "tokenizer.json").write_bytes((exact / "tokenizer.json").read_bytes())
    config = {"chat_template": QWEN_LIKE, "eos_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), chat_template=QWEN_LIKE)
    codec = TextCodec(tmp_path)
    for options in ({}, {"enable_thinking": False}):
        assert codec.render_chat(chat, **options) == hf.apply_chat_template(chat, tokenize=False,
                                                                             add_generation_prompt=True, **options)
    lm = DynaexqLM(pretrained=str(exact), max_len=128, enable_thinking=False)
    with pytest.raises(EvaluationError, match="no chat template"):
        lm.chat_template(True)
    assert lm.chat_template(False) is None
    lm.codec = codec
    assert lm.apply_chat_template(chat).endswith("<think>\n\n</think>\n\n")
    with pytest.raises(GenerationError, match="no chat template"):
        TextCodec(exact).render_chat(chat)


def test_the_oracle_reads_the_recorded_traffic_on_the_engines_clock(tmp_path, exact):
    """record_trace keeps every boundary's routed mass at its step of the engine's clock (across
    requests); the oracle reads it per chunk of that clock, and only with the same chunk."""
    from dynaexq_jax.lm_eval.model import _read_trace
    f = tmp_path / "t.npz"
    lm = DynaexqLM(pretrained=str(exact), batch_size=2, max_len=128, record_trace=str(f))
    reqs = [Instance("loglikelihood", {}, ("x = 1\n" * n, " y"), 0) for n in (1, 3, 9)]
    lm.loglikelihood(reqs, disable_tqdm=True)
    assert not f.exists()
    lm.get_model_info()                     # what lm-eval calls once every request has run
    with np.load(f) as z:
        clock, mass = z["clock"], z["mass"]
    assert len(lm.calls) == 2 and lm.engine.steps_served == clock.max()
    assert (np.diff(clock) > 0).all() and clock.max() > lm.calls[1]["clock0"] > 0
    trace = _read_trace(f, 16)
    assert trace.shape[0] == clock.max() // 16 + 1 and np.allclose(trace.sum(0), mass.sum(0))
    with pytest.raises(EvaluationError, match="segment=16, this run has segment=8"):
        _read_trace(f, 8)


def test_a_long_context_is_cut_to_what_the_cache_holds(exact):
    """Contexts longer than the cache are cut on the left, the padded prompt and the generation
    included (here max_len=100: 96 context tokens for one new one)."""
    lm = DynaexqLM(pretrained=str(exact), max_len=100)
    context = "def f(x):\n    return x + 1\n" * 40
    assert len(lm.tok_encode(context)) > 300
    for n in (1, 8, 40):
        out = lm.generate_until([Instance("generate_until", {}, (context, {"max_gen_toks": n, "until": []}), 0)])
        assert isinstance(out[0], str)

"""`dynaexq eval`: lm-eval's simple_evaluate with the `dynaexq` model, one run per policy on the
same budget and tasks, side by side in one table (like the method's accuracy tables).

all-hi and all-lo are the references and run without a budget (every expert in one tier); every
other policy runs under the budget. oracle replays the all-hi run's recorded traffic of the same
requests (that run is made first, with record_trace). Outputs in --out: results.json (each run's
lm-eval results and the runtime's summary: HI hit rate, swaps, bytes moved, stalls), report.md
(the table) and, per run, lm-eval's own results file."""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from dynaexq_jax.errors import EvaluationError

REFERENCES = {"all-hi": "hi", "all-lo": "lo"}     # policy -> the tier it runs in without a budget
# lm-eval's bootstrap resamples for the standard errors of metrics without a closed form
# (perplexities); means (accuracies) get theirs in closed form.
BOOTSTRAP = 1000


def model_args(policy: str, budget, options: dict, trace: Path | None = None,
               record_trace: Path | None = None) -> dict:
    """The DynaexqLM arguments of one run: a reference policy as a tier without a budget (the
    runtime's options, which it does not use, left out), any other under the budget. options:
    the other model args (pretrained, batch_size, ...)."""
    args = {k: v for k, v in options.items() if v is not None}
    if policy in REFERENCES:
        from dynaexq_jax.lm_eval.model import RUNTIME_ARGS
        args = {k: v for k, v in args.items() if k not in (*RUNTIME_ARGS, "calibration")} | {"tier": REFERENCES[policy]}
    else:
        if budget is None:
            raise EvaluationError(f"policy '{policy}' needs a budget (--budget); only all-hi and all-lo run without")
        args |= {"budget": budget, "policy": policy}
    if trace is not None:
        args["trace"] = str(trace)
    if record_trace is not None:
        args["record_trace"] = str(record_trace)
    return args


def evaluate(tasks, policies, *, budget=None, options: dict | None = None, include_path=None,
             limit=None, num_fewshot=None, apply_chat_template: bool = False, confirm_run_unsafe_code: bool = False,
             out: str | Path | None = None, log=print) -> dict:
    """Run the tasks once per policy (all-hi / all-lo: without a budget) and return {"runs":
    {policy: {...}}, "table": markdown}; with `out`, write results.json and report.md.
    options: the other DynaexqLM args (pretrained, batch_size, max_len, strategy, ...);
    apply_chat_template, confirm_run_unsafe_code: lm-eval's (chat models; code-executing tasks
    such as humaneval)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from dynaexq_jax.lm_eval import POLICIES, TASKS_DIR
    from dynaexq_jax.lm_eval.model import DynaexqLM

    options = dict(options or {})
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise EvaluationError(f"unknown policies {unknown} (use {', '.join(POLICIES)})")
    if not tasks:
        raise EvaluationError("no tasks given (e.g. --tasks dynaexq_suite)")
    paths = [str(TASKS_DIR)] + [str(Path(p)) for p in ([include_path] if isinstance(include_path, (str, Path))
                                                        else include_path or [])]
    for p in paths[1:]:
        if not Path(p).is_dir():
            raise EvaluationError(f"--include-path {p} is not a directory")
    manager = TaskManager(include_path=paths)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise EvaluationError(f"unknown tasks {missing} (lm-eval's, or the local suite: "
                              f"{', '.join(sorted(t for t in manager.all_tasks if t.startswith('dynaexq_')))})")
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    scratch = out or Path.home() / ".cache" / "dynaexq-jax" / "eval"
    scratch.mkdir(parents=True, exist_ok=True)
    trace = scratch / "all-hi.trace.npz"
    order = list(dict.fromkeys(policies))
    if "oracle" in order:            # its reference run first, recording the traffic it replays
        order = ["all-hi"] + [p for p in order if p != "all-hi"]
    runs = {}
    for key in order:
        args = model_args(key, budget, options, trace=trace if key == "oracle" else None,
                          record_trace=trace if key == "all-hi" and "oracle" in order else None)
        if log:
            log(f"eval: {key}: {', '.join(f'{k}={v}' for k, v in args.items())}")
        t0 = time.perf_counter()
        lm = DynaexqLM(**args)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=BOOTSTRAP,
                                      apply_chat_template=apply_chat_template,
                                      confirm_run_unsafe_code=confirm_run_unsafe_code)
        run = {"policy": key, "model_args": args, "seconds": time.perf_counter() - t0,
               "results": res["results"], "runtime": lm.runtime_summary(),
               "n_samples": res.get("n-samples"), "versions": res.get("versions")}
        runs[key] = json.loads(json.dumps(run, default=handle_non_serializable))
        if out is not None:
            (out / f"lm_eval_{key}.json").write_text(json.dumps(res, indent=1, default=handle_non_serializable))
    table = report(runs)
    result = {"date": datetime.date.today().isoformat(), "tasks": list(tasks), "limit": limit, "budget": budget,
              "runs": runs, "table": table}
    if out is not None:
        (out / "results.json").write_text(json.dumps(result, indent=1))
        (out / "report.md").write_text(table + "\n")
    return result


# Left out of the table (results.json keeps them): they restate bits_per_byte.
_RESTATED = ("word_perplexity", "byte_perplexity")


def metrics(results: dict) -> dict[str, tuple[float, float | None]]:
    """'task metric[ (filter)]' -> (value, standard error or None), for every reported metric but
    the restated ones."""
    out = {}
    for task, values in results.items():
        for key, v in values.items():
            if "," not in key or "_stderr" in key or not isinstance(v, (int, float)):
                continue
            name, filt = key.split(",", 1)
            if name in _RESTATED:
                continue
            err = values.get(f"{name}_stderr,{filt}")
            out[f"{task.removeprefix('dynaexq_')} {name}" + ("" if filt == "none" else f" ({filt})")] = \
                (float(v), float(err) if isinstance(err, (int, float)) else None)
    return out


def _cell(value: float, err: float | None) -> str:
    return f"{value:.4g}" if err is None else f"{value:.4g} ± {err:.2g}"


def report(runs: dict) -> str:
    """One markdown table: a row per policy, a column per task metric, then the runtime's."""
    cols = list(dict.fromkeys(c for r in runs.values() for c in metrics(r["results"])))
    head = ["policy", *cols, "HI hit rate", "swaps", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in runs.items():
        m, rt = metrics(r["results"]), r["runtime"]
        hit = rt["hi_hit_rate"]
        lines.append("| " + " | ".join([key, *(_cell(*m[c]) if c in m else "" for c in cols),
                                        "" if hit is None else f"{hit:.3f}", str(int(rt["counters"]["promotions"])),
                                        f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines)

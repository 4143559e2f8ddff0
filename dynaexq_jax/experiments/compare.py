"""The policy-comparison harness (`dynaexq compare`).

Every policy runs on the same runtime, the same device budget and the same token streams: rows
of real text whose domain shifts between workload phases (e.g. prose, code, prose), taken from the
validation split of the standard-library corpus. Perplexity is teacher-forced through the
runtime's live mixed-precision forward (Engine.score: hotness, policy updates and transitions run
while the text is scored). Decode throughput is measured side by side against the offloading
baselines at the same budget. Outputs: results.json, results.csv, report.md and PNG plots.

Policies: all-hi and all-lo (the references: every expert HI, every expert LO), static-calibrated
(the top of a ranking measured on the calibration split of one domain with the all-LO model, then
frozen), dynaexq (starting from the same ranking), oracle (the best HI set for each period from
the all-HI run's future trace of these very streams) and random (a new random HI set every period);
and two that spread the HI slots unevenly across layers (the greedy capacity strategy), to show
where a gain comes from: dynaexq-greedy (by the calibration ranking: traffic alone) and
sensitivity (traffic x the cost of each expert's LO copy, experiments.sensitivity, measured on the
same calibration domain; the sensitivity policy ranks by it at run time too), and
sensitivity-stored, the same on the costs the converter stored (CheckpointInfo.lo_costs: output
changes on its calibration text, no gradient), as `--policy sensitivity` serves.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
from pathlib import Path

import numpy as np

from dynaexq_jax.errors import ConfigError, check_int
from dynaexq_jax.experiments import corpus
from dynaexq_jax.experiments.sensitivity import lo_costs
from dynaexq_jax.runtime.budget import budget_for_fraction, parse_bytes, parse_share, plan_for
from dynaexq_jax.runtime.config import EngineConfig
from dynaexq_jax.runtime.engine import Engine
from dynaexq_jax.runtime.policies import OraclePolicy, Policy, RandomPolicy, SensitivityPolicy
from dynaexq_jax.serving.checkpoint import Checkpoint, load_checkpoint
from dynaexq_jax.serving.tokenizer import TextCodec

POLICIES = ("all-hi", "all-lo", "static-calibrated", "dynaexq", "oracle", "random", "dynaexq-greedy", "sensitivity",
            "sensitivity-stored")
BASELINES = ("lru", "prefetch")


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """A comparison run. Every value is checked on construction (ConfigError, or the runtime's
    RuntimeConfigError for the engine settings), before any model is loaded or converted."""
    policies: tuple[str, ...] = POLICIES
    workload: tuple[str, ...] = ("prose", "code", "prose")
    budget: str = "20%"              # a share of HI slots per layer ("20%") or bytes ("3MiB")
    rows: int = 8                    # streams scored side by side (the batch)
    phase_tokens: int = 512          # positions per row in each workload phase
    chunk: int = EngineConfig.segment_len   # positions per jitted chunk (= a decode segment)
    window: int = 256                # positions per scoring window (the cache length)
    period: int = 64                 # policy update period, in steps (positions)
    delta: float = EngineConfig.delta
    alpha: float = EngineConfig.alpha
    transfers: int = 8               # K: copies in flight
    calibration_domain: str | None = None   # default: the first workload domain
    calibration_tokens: int = 2048   # positions per row of the calibration stream
    cost_tokens: int = 256           # positions per row that measure the LO costs (at most one window)
    sweep: tuple[float, ...] = ()    # HI fractions for the budget sweep (dynaexq, static-calibrated)
    throughput_batches: tuple[int, ...] = (1, 32)
    baselines: tuple[str, ...] = BASELINES
    new_tokens: int = 64
    prompt_tokens: int = 32
    seed: int = 0                    # the random policy's HI sets
    devices: int = 1                 # an expert-parallel mesh of this many devices, the budget each one's

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise ConfigError (or the runtime's RuntimeConfigError, BudgetError) for a bad value;
        runs on construction."""
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown:
            raise ConfigError(f"unknown policies {unknown} (use {', '.join(POLICIES)})")
        bad = [d for d in self.workload + ((self.calibration_domain,) if self.calibration_domain else ())
               if d not in corpus.DOMAINS]
        if bad or not self.workload:
            raise ConfigError(f"workload domains must be among {', '.join(corpus.DOMAINS)}, got {list(self.workload)}")
        if [b for b in self.baselines if b not in BASELINES]:
            raise ConfigError(f"unknown baselines {list(self.baselines)} (use {', '.join(BASELINES)})")
        for name in ("rows", "phase_tokens", "chunk", "window", "period", "transfers", "calibration_tokens",
                     "cost_tokens", "new_tokens", "prompt_tokens", "devices"):
            check_int(name, getattr(self, name), ConfigError)
        if self.devices > 1 and self.baselines and self.throughput_batches:
            raise ConfigError(f"the offloading baselines ({', '.join(self.baselines)}) run on one device: with "
                              f"devices={self.devices} leave them out (baselines=(), --baselines '')")
        if self.phase_tokens % self.chunk or self.window % self.chunk or self.calibration_tokens % self.chunk:
            raise ConfigError(f"phase_tokens ({self.phase_tokens}), window ({self.window}) and calibration_tokens "
                              f"({self.calibration_tokens}) must be multiples of chunk ({self.chunk})")
        if any(not 0 <= r <= 1 for r in self.sweep):
            raise ConfigError(f"sweep fractions must be in [0, 1], got {list(self.sweep)}")
        for b in self.throughput_batches:
            check_int("a throughput batch", b, ConfigError)
        if self.hi_fraction is None:        # (a share is checked as it is read)
            parse_bytes(self.budget)
        self.engine_settings("dynaexq")        # the runtime's own checks (alpha, K >= 2, ...)

    @property
    def hi_fraction(self) -> float | None:
        """The budget as a share of HI slots per layer, or None when it is a byte size."""
        return parse_share(self.budget)

    def engine_settings(self, policy: str | Policy, batch: int | None = None, max_len: int | None = None
                        ) -> EngineConfig:
        """The runtime settings of every engine of the run (batch default rows, max_len default window)."""
        return EngineConfig(policy=policy, batch=batch or self.rows, max_len=max_len or self.window,
                            segment_len=self.chunk, update_period=self.period, delta=self.delta, alpha=self.alpha,
                            transfers_in_flight=self.transfers, devices=self.devices)


# ---- token streams ---------------------------------------------------------------------------------
def domain_streams(codec, split: str) -> dict[str, np.ndarray]:
    """domain -> the split's documents encoded with the model's tokenizer, each followed by eos."""
    docs = corpus.documents()
    out = {}
    for d in corpus.DOMAINS:
        ids = []
        for enc in codec.tokenizer.encode_batch([x.text for x in corpus.select(docs, d, split)]):
            ids.extend(enc.ids + [0])
        out[d] = np.asarray(ids, np.int32)
    return out


def workload_tokens(streams: dict[str, np.ndarray], workload, rows: int, phase_tokens: int) -> np.ndarray:
    """[rows, len(workload) * phase_tokens + 1]: phase i of every row is fresh text of domain
    workload[i] (later phases of a domain continue where earlier ones stopped; rows differ)."""
    cursor = dict.fromkeys(streams, 0)
    phases = []
    for i, d in enumerate(workload):
        n = phase_tokens + (i == len(workload) - 1)        # the last phase also holds the final target
        need = cursor[d] + rows * n
        if need > len(streams[d]):
            raise ConfigError(f"the {d} stream has {len(streams[d])} tokens, fewer than the {need} this workload "
                              f"needs: lower --rows or --phase-tokens")
        phases.append(streams[d][cursor[d]:need].reshape(rows, n))
        cursor[d] = need
    return np.concatenate(phases, axis=1)


def corpus_check(model_dir: Path) -> dict:
    """The digest of the evaluation documents (validation + calibration) on this machine, and
    whether they are the very documents the model was trained beside (its training.json)."""
    docs = [d for d in corpus.documents() if d.split != "train"]
    out = {"eval_digest": corpus.manifest(docs)["digest"], "documents": len(docs), "same_as_training": None}
    record = Path(model_dir) / "training.json"
    if record.is_file():
        trained = json.loads(record.read_text())["corpus"]["documents"]
        out["same_as_training"] = all(trained.get(d.name, {}).get("sha256") == d.sha256 for d in docs) and \
            sum(e["split"] != "train" for e in trained.values()) == len(docs)
    return out


# ---- calibration -----------------------------------------------------------------------------------
def calibration_ranking(ckpt: Checkpoint, codec, domains, *, rows: int = CompareConfig.rows,
                        positions: int = CompareConfig.calibration_tokens, chunk: int = CompareConfig.chunk,
                        window: int = CompareConfig.window, devices: int = 1) -> np.ndarray:
    """Mean token-normalised routed mass per expert [L_moe, E] of the all-LO model on the
    calibration split of the given domains (the method's offline initial HI set): rows streams per domain
    of up to `positions` positions, scored through the runtime (on `devices` devices)."""
    streams = domain_streams(codec, "calibration")
    settings = EngineConfig(policy="all-lo", batch=rows, max_len=window, segment_len=chunk, transfers_in_flight=2,
                            devices=devices)
    masses = []
    for d in domains:
        n = min(positions, (len(streams[d]) // rows - 1) // chunk * chunk)
        tokens = workload_tokens(streams, (d,), rows, n)
        eng = Engine(ckpt, budget_bytes=budget_for_fraction(ckpt, 0.0, settings), settings=settings)
        eng.score(tokens)
        masses += [t["mass"] for t in eng.timeline]
    return np.mean(masses, axis=0)


# ---- the runs --------------------------------------------------------------------------------------
def _phase_slices(cfg: CompareConfig):
    return [slice(i * cfg.phase_tokens, (i + 1) * cfg.phase_tokens) for i in range(len(cfg.workload))]


def perplexities(nll: np.ndarray, cfg: CompareConfig) -> dict:
    phases = [float(np.exp(nll[:, s].mean())) for s in _phase_slices(cfg)]
    domains = {d: float(np.exp(np.mean([nll[:, s].mean() for s, w in zip(_phase_slices(cfg), cfg.workload) if w == d])))
               for d in dict.fromkeys(cfg.workload)}
    after = [nll[:, s] for s in _phase_slices(cfg)[1:]]
    return {"overall": float(np.exp(nll.mean())), "per_domain": domains, "per_phase": phases,
            "after_first_shift": float(np.exp(np.concatenate(after, axis=1).mean())) if after else None}


def gap_recovery(ppl: float, ppl_hi: float, ppl_lo: float) -> float | None:
    """(ppl_LO - ppl) / (ppl_LO - ppl_HI): 0 = no better than all-LO, 1 = as good as all-HI."""
    return (ppl_lo - ppl) / (ppl_lo - ppl_hi) if abs(ppl_lo - ppl_hi) > 1e-9 else None


def _recoveries(ppl: dict, hi: dict, lo: dict) -> dict:
    out = {"overall": gap_recovery(ppl["overall"], hi["overall"], lo["overall"]),
           "per_domain": {d: gap_recovery(p, hi["per_domain"][d], lo["per_domain"][d])
                          for d, p in ppl["per_domain"].items()},
           "per_phase": [gap_recovery(p, h, lo_)
                         for p, h, lo_ in zip(ppl["per_phase"], hi["per_phase"], lo["per_phase"])]}
    if ppl["after_first_shift"] is not None:
        out["after_first_shift"] = gap_recovery(ppl["after_first_shift"], hi["after_first_shift"],
                                                lo["after_first_shift"])
    return out


class Harness:
    def __init__(self, model: str | Path, cfg: CompareConfig, log=print):
        self.cfg, self.log = cfg, log
        self.ckpt = load_checkpoint(Path(model))
        if self.ckpt.config.model_type != "qwen3_moe":
            raise ConfigError(f"compare supports qwen3_moe models, not {self.ckpt.config.model_type}")
        self.codec = TextCodec(self.ckpt.path)
        if self.codec.tokenizer is None:
            raise ConfigError(f"{model}: compare needs the model's tokenizer.json")
        if "sensitivity-stored" in cfg.policies and self.ckpt.lo_costs is None:
            if cfg.policies != POLICIES:
                raise ConfigError(f"{model}: sensitivity-stored serves by the LO costs that a conversion with "
                                  "calibration text stores, and this checkpoint has none: convert it with "
                                  "--calibration FILE, or leave sensitivity-stored out of the policies")
            if log is not None:
                log(f"{model}: converted without calibration text, so no LO costs: sensitivity-stored left out")
            self.cfg = cfg = dataclasses.replace(cfg, policies=tuple(p for p in POLICIES if p != "sensitivity-stored"))
        self.E = self.ckpt.config.num_experts
        self.fraction = cfg.hi_fraction
        self.budget = parse_bytes(cfg.budget) if self.fraction is None else self._budget(self.fraction, cfg.rows)
        self.n_hi = list(plan_for(self.ckpt, self.budget, cfg.engine_settings("dynaexq")).n_hi)
        self.validation = domain_streams(self.codec, "validation")
        self.corpus = corpus_check(self.ckpt.path)
        self.tokens = workload_tokens(self.validation, cfg.workload, cfg.rows, cfg.phase_tokens)

    def _budget(self, r: float, batch: int) -> int:
        return budget_for_fraction(self.ckpt, r, self.cfg.engine_settings("dynaexq", batch))

    def engine(self, policy, budget: int, calibration=None, batch=None, max_len=None, **settings) -> Engine:
        return Engine(self.ckpt, budget_bytes=budget,
                      settings=self.cfg.engine_settings(policy, batch, max_len).replace(**settings),
                      calibration=calibration)

    @property
    def calibration_domain(self) -> str:
        return self.cfg.calibration_domain or self.cfg.workload[0]

    def calibration(self) -> np.ndarray:
        c = self.cfg
        return calibration_ranking(self.ckpt, self.codec, (self.calibration_domain,), rows=c.rows,
                                   positions=c.calibration_tokens, chunk=c.chunk, window=c.window, devices=c.devices)

    def lo_cost(self) -> np.ndarray:
        """[L_moe, E]: each expert's LO cost (experiments.sensitivity) on the calibration domain's
        split, rows streams of cost_tokens positions (at most one window)."""
        c = self.cfg
        n = min(c.cost_tokens, c.window)
        streams = domain_streams(self.codec, "calibration")
        return lo_costs(self.ckpt, [workload_tokens(streams, (self.calibration_domain,), c.rows, n)[:, :n + 1]])

    def run_policy(self, name: str, budget: int, ranking: np.ndarray, oracle_trace: np.ndarray | None,
                   cost: np.ndarray | None = None) -> dict:
        c = self.cfg
        if name == "all-hi":
            eng = self.engine("all-hi", self._budget(1.0, c.rows))
        elif name == "all-lo":
            eng = self.engine("all-lo", budget)
        elif name == "static-calibrated":
            eng = self.engine("static", budget, calibration=ranking)
        elif name == "dynaexq":
            eng = self.engine("dynaexq", budget, calibration=ranking)
        elif name == "dynaexq-greedy":
            eng = self.engine("dynaexq", budget, calibration=ranking, strategy="greedy")
        elif name in ("sensitivity", "sensitivity-stored"):
            # Traffic x cost ranks the experts at start, spreads the slots (greedy) and drives the swaps.
            cost = cost if name == "sensitivity" else self.ckpt.lo_costs
            eng = self.engine(SensitivityPolicy(period=c.period, delta=c.delta, cost=cost), budget,
                              calibration=ranking, strategy="greedy")
        elif name == "oracle":
            # A decision after chunk b serves from chunk b + 3 on (replay.py): 2 chunks after its step.
            eng = self.engine(OraclePolicy(oracle_trace, c.chunk, c.period, lag=2 * c.chunk), budget)
        else:
            eng = self.engine(RandomPolicy(period=c.period, seed=c.seed), budget)
        res = eng.score(self.tokens)
        rt = res.runtime
        tl = rt["timeline"]
        return {"policy": name, "budget": eng.plan.budget, "n_hi": eng.n_hi, "ppl": perplexities(res.nll, c),
                "hi_hit_rate": rt["hi_hit_rate"], "counters": rt["counters"], "seconds": res.seconds,
                "timeline": {"step": [t["step"] for t in tl], "hit_rate": [t["hit_rate"] for t in tl],
                             "swaps": [len(t["published"]) for t in tl]},
                "trace": np.asarray([t["mass"] for t in tl], np.float32)}

    def run(self, out_dir: str | Path) -> dict:
        from tqdm import tqdm

        c = self.cfg
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        names = list(dict.fromkeys(("all-hi", "all-lo") + tuple(c.policies)))
        steps = len(names) + 2 * len(c.sweep) + len(c.throughput_batches)
        bar = tqdm(total=steps, desc="compare", unit="run", disable=self.log is None)
        bar.set_postfix_str("calibration")
        ranking = self.calibration()
        cost = self.lo_cost() if "sensitivity" in names else None
        stored = self.ckpt.lo_costs if "sensitivity-stored" in names else None
        runs = {}
        for name in names:
            bar.set_postfix_str(name)
            runs[name] = self.run_policy(name, self.budget, ranking, runs.get("all-hi", {}).get("trace"), cost)
            bar.update()
        hi, lo = runs["all-hi"]["ppl"], runs["all-lo"]["ppl"]
        for r in runs.values():
            r["gap_recovery"] = _recoveries(r["ppl"], hi, lo)
        sweep = []
        for frac in c.sweep:
            budget = self._budget(frac, c.rows)
            for name in ("static-calibrated", "dynaexq"):
                bar.set_postfix_str(f"sweep r={frac:.2f} {name}")
                r = self.run_policy(name, budget, ranking, None)
                sweep.append({"hi_fraction": frac, "n_hi": r["n_hi"], "policy": name, "ppl": r["ppl"],
                              "gap_recovery": _recoveries(r["ppl"], hi, lo), "hi_hit_rate": r["hi_hit_rate"]})
                bar.update()
        throughput = []
        for b in c.throughput_batches:
            bar.set_postfix_str(f"throughput batch {b}")
            throughput += self.throughput(b, ranking)
            bar.update()
        bar.close()
        traces = {n: r.pop("trace") for n, r in runs.items()}
        results = {"date": datetime.date.today().isoformat(), "machine": machine(), "config": dataclasses.asdict(c),
                   "model": {"path": str(self.ckpt.path), "tiers": {t: f.name for t, f in self.ckpt.tiers.items()},
                             "config": self.ckpt.hf_config},
                   "budget": {"bytes": self.budget, "n_hi": self.n_hi, "num_experts": self.E,
                              "requested": c.budget},
                   "workload": {"phases": list(c.workload), "rows": c.rows, "phase_tokens": c.phase_tokens,
                                "corpus": self.corpus},
                   "policies": runs, "sweep": sweep, "throughput": throughput,
                   "traffic": traffic(traces["all-hi"], c, self.E),
                   "lo_cost": None if cost is None else cost.tolist(),
                   "lo_cost_stored": None if stored is None else stored.tolist()}
        np.savez_compressed(out / "traces.npz", **{n.replace("-", "_"): t for n, t in traces.items()})
        write_outputs(results, out)
        return results

    def throughput(self, batch: int, ranking: np.ndarray) -> list[dict]:
        """Decode tokens/s at one batch size, every engine at the same byte budget, measured side
        by side: each engine runs once to compile, then twice, keeping the faster run."""
        from dynaexq_jax.runtime.offload import OffloadEngine
        c = self.cfg
        r = self.fraction if self.fraction is not None else 0.2
        max_len = c.prompt_tokens + c.new_tokens + 16
        settings = c.engine_settings("dynaexq", batch, max_len)
        budget = budget_for_fraction(self.ckpt, r, settings)
        prompts = workload_tokens(self.validation, c.workload[:1], batch, c.prompt_tokens)[:, :c.prompt_tokens].tolist()
        engines = {"all-lo": self.engine("all-lo", budget, batch=batch, max_len=max_len),
                   "dynaexq": self.engine("dynaexq", budget, ranking, batch=batch, max_len=max_len)}
        for mode in c.baselines:
            engines[f"offload-{mode}"] = OffloadEngine(self.ckpt, budget_bytes=budget, mode=mode, batch=settings.batch,
                                                       max_len=settings.max_len, backend=settings.backend,
                                                       transfers_in_flight=settings.transfers_in_flight,
                                                       calibration=ranking)
        best = {}
        for eng in engines.values():
            eng.generate(prompts, max_new_tokens=2 * c.chunk + 1, stop_tokens=())
        for _ in range(2):
            for name, eng in engines.items():
                res = eng.generate(prompts, max_new_tokens=c.new_tokens, stop_tokens=())
                tps = res.stats.decode_tokens_per_s
                if name not in best or tps > best[name]["decode_tokens_per_s"]:
                    rt = res.runtime
                    best[name] = {"batch": batch, "engine": name, "budget": budget, "decode_tokens_per_s": tps,
                                  "hit_rate": rt.get("hi_hit_rate", rt.get("hit_rate")),
                                  "bytes_moved": rt["counters"]["bytes_moved"],
                                  "projected_pcie_decode_tokens_per_s": rt.get("projected_decode_tokens_per_s", tps)}
        base = best["all-lo"]["decode_tokens_per_s"]
        for row in best.values():
            row["share_of_all_lo"] = row["decode_tokens_per_s"] / base if base else None
        dyn = best["dynaexq"]["decode_tokens_per_s"]
        for row in best.values():
            row["dynaexq_speedup"] = dyn / row["decode_tokens_per_s"] if row["decode_tokens_per_s"] else None
        return list(best.values())


def traffic(trace: np.ndarray, cfg: CompareConfig, E: int) -> dict:
    """How the router's traffic looks in the all-HI run: per domain and layer the share of routed
    mass carried by the top 20% of experts, and per layer the overlap of the domains' top-20% sets."""
    chunks_per_phase = cfg.phase_tokens // cfg.chunk
    per_domain = {}
    for i, d in enumerate(cfg.workload):
        part = trace[i * chunks_per_phase:(i + 1) * chunks_per_phase]
        per_domain.setdefault(d, []).append(part)
    mass = {d: np.concatenate(v).mean(0) for d, v in per_domain.items()}       # [L, E]
    n = max(1, int(round(0.2 * E)))
    top = {d: [set(np.argsort(-m[l])[:n].tolist()) for l in range(m.shape[0])] for d, m in mass.items()}
    share = {d: [float(np.sort(m[l])[::-1][:n].sum() / m[l].sum()) for l in range(m.shape[0])] for d, m in mass.items()}
    doms = list(mass)
    overlap = ([len(top[doms[0]][l] & top[doms[1]][l]) / n for l in range(len(top[doms[0]]))]
               if len(doms) > 1 else None)
    return {"top20_share": share, "top20_overlap": overlap, "top_n": n,
            "mass": {d: np.round(m, 6).tolist() for d, m in mass.items()}}


def machine() -> dict:
    import jax
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "jax": jax.__version__, "device": str(jax.devices()[0].device_kind)}


# ---- outputs ---------------------------------------------------------------------------------------
def write_outputs(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "scope", "ppl", "gap_recovery", "hi_hit_rate", "swaps", "bytes_moved"])
        for name, r in results["policies"].items():
            rows = [("overall", r["ppl"]["overall"], r["gap_recovery"]["overall"])]
            rows += [(f"domain:{d}", p, r["gap_recovery"]["per_domain"][d]) for d, p in r["ppl"]["per_domain"].items()]
            rows += [(f"phase:{i}:{results['workload']['phases'][i]}", p, r["gap_recovery"]["per_phase"][i])
                     for i, p in enumerate(r["ppl"]["per_phase"])]
            for scope, ppl, rec in rows:
                w.writerow([name, scope, f"{ppl:.4f}", "" if rec is None else f"{rec:.4f}", f"{r['hi_hit_rate']:.4f}",
                            r["counters"]["promotions"], r["counters"]["bytes_moved"]])
    plots = plot_results(results, out)
    (out / "report.md").write_text(report(results, plots))


def _fmt(x, pct=False):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{100 * x:.0f}%" if pct else f"{x:.3f}"


def _yes_no(flag) -> str:
    if flag is None:
        return "unknown (no training.json)"
    return "yes" if flag else "NO (other files: numbers not comparable)"


def _rank_correlation(a, b) -> float:
    ra, rb = (np.argsort(np.argsort(np.asarray(x))) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def report(results: dict, plots: list[Path]) -> str:
    b, m = results["budget"], results["machine"]
    n = results["config"].get("devices", 1)
    each = f" on each of {n} devices (experts split across them)" if n > 1 else ""
    phases = results["workload"]["phases"]
    doms = list(dict.fromkeys(phases))
    lines = [f"# Policy comparison ({results['date']})", "",
             f"Model `{results['model']['path']}`, tiers HI {results['model']['tiers']['hi']} / LO "
             f"{results['model']['tiers']['lo']}; budget {b['requested']} = {b['bytes']:,d} B{each}, HI slots per "
             f"layer {b['n_hi']} of {b['num_experts'] // n}. Workload {' -> '.join(phases)} "
             f"({results['workload']['phase_tokens']} positions per phase, {results['workload']['rows']} streams). "
             f"Machine: {m['processor']}, {m['cpus']} CPUs, jax {m['jax']}, device {m['device']}.", "",
             f"Evaluation text: {results['workload']['corpus']['documents']} validation/calibration documents of "
             f"this machine's standard library (digest {results['workload']['corpus']['eval_digest'][:12]}), "
             f"the model's own held-out documents: {_yes_no(results['workload']['corpus']['same_as_training'])}.", "",
             "Gap recovery = (ppl_LO - ppl) / (ppl_LO - ppl_HI).", "",
             "| policy | ppl overall | " + " | ".join(f"ppl {d}" for d in doms)
             + " | recovery overall | " + " | ".join(f"recovery {d}" for d in doms)
             + " | recovery after first shift | HI hit rate | swaps | MiB moved | HI slots per layer |",
             "|" + " --- |" * (8 + 2 * len(doms))]
    for name, r in results["policies"].items():
        g = r["gap_recovery"]
        lines.append(f"| {name} | {r['ppl']['overall']:.3f} | "
                     + " | ".join(f"{r['ppl']['per_domain'][d]:.3f}" for d in doms)
                     + f" | {_fmt(g['overall'], True)} | " + " | ".join(_fmt(g['per_domain'][d], True) for d in doms)
                     + f" | {_fmt(g.get('after_first_shift'), True)} | {_fmt(r['hi_hit_rate'], True)} | "
                     f"{r['counters']['promotions']} | {r['counters']['bytes_moved'] / 2**20:.2f} | "
                     f"{', '.join(map(str, r['n_hi']))} |")
    if results["sweep"]:
        lines += ["", "## Budget sweep", "", "| HI fraction | policy | ppl | recovery | HI hit rate |",
                  "| --- | --- | --- | --- | --- |"]
        for s in results["sweep"]:
            lines.append(f"| {s['hi_fraction']:.2f} | {s['policy']} | {s['ppl']['overall']:.3f} | "
                         f"{_fmt(s['gap_recovery']['overall'], True)} | {_fmt(s['hi_hit_rate'], True)} |")
    if results["throughput"]:
        lines += ["", "## Decode throughput (same byte budget, measured side by side)", "",
                  "| batch | engine | decode tok/s | share of all-LO | dynaexq speed-up | HI/cache hit rate "
                  "| MiB moved | projected tok/s over PCIe 4.0 x16 (projection) |", "|" + " --- |" * 8]
        for t in results["throughput"]:
            lines.append(f"| {t['batch']} | {t['engine']} | {t['decode_tokens_per_s']:.1f} | "
                         f"{_fmt(t['share_of_all_lo'], True)} | {_fmt(t['dynaexq_speedup'])}x | "
                         f"{_fmt(t['hit_rate'], True)} | "
                         f"{t['bytes_moved'] / 2**20:.2f} | {t['projected_pcie_decode_tokens_per_s']:.1f} |")
    if results.get("lo_cost") and results.get("lo_cost_stored"):
        rho = [_rank_correlation(g, s) for g, s in zip(results["lo_cost"], results["lo_cost_stored"])]
        lines += ["", "## LO costs: the gradient's (sensitivity) against the converter's (sensitivity-stored)", "",
                  "Rank correlation of the two per layer (Spearman): " + ", ".join(f"{r:.2f}" for r in rho) + "."]
    tr = results["traffic"]
    lines += ["", "## Router traffic (all-HI run)", "",
              f"Share of routed mass carried by the top {tr['top_n']} experts (20%) per layer: "
              + "; ".join(f"{d} {', '.join(f'{100 * s:.0f}%' for s in v)}" for d, v in tr["top20_share"].items()) + "."]
    if tr["top20_overlap"] is not None:
        lines.append(f"Overlap of the domains' top-{tr['top_n']} sets per layer: "
                     + ", ".join(f"{100 * o:.0f}%" for o in tr["top20_overlap"]) + ".")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def result_figures(results: dict) -> dict:
    """{file stem: Figure} of a results dict: perplexity, hit_rate, routed_mass, and sweep when the
    results hold a budget sweep."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    pols = results["policies"]
    phases = results["workload"]["phases"]
    doms = list(dict.fromkeys(phases))
    scopes = doms + ["overall"]
    fig, ax = plt.subplots(figsize=(8, 3.6), layout="constrained")
    width = 0.8 / len(pols)
    for i, (name, r) in enumerate(pols.items()):
        vals = [r["ppl"]["per_domain"][d] for d in doms] + [r["ppl"]["overall"]]
        ax.bar(np.arange(len(scopes)) + i * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(scopes)) + 0.4 - width / 2, scopes)
    ax.set_ylabel("perplexity (teacher-forced)")
    ax.set_ylim(bottom=0)          # bar lengths compare as ratios only from zero
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("perplexity per policy and domain (lower is better)")
    figures["perplexity"] = fig

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True, layout="constrained")
    phase_steps = results["workload"]["phase_tokens"]
    for name, r in pols.items():
        if name in ("all-hi", "all-lo"):
            continue
        tl = r["timeline"]
        a1.plot(tl["step"], tl["hit_rate"], label=name, lw=1)
        a2.plot(tl["step"], np.cumsum(tl["swaps"]), label=name, lw=1)
    for a in (a1, a2):
        for i in range(1, len(phases)):
            a.axvline(i * phase_steps, color="k", ls=":", lw=0.8)
    a1.set_ylabel("HI hit rate")
    a2.set_ylabel("swaps (cumulative)")
    a2.set_xlabel("step (positions per stream); dotted: workload shifts " + " -> ".join(phases))
    a1.legend(fontsize=7, ncol=4)
    figures["hit_rate"] = fig

    # The all-HI run's mean routed mass per expert (what a hotness EMA tracks), one shared scale.
    mass = {d: np.asarray(m) for d, m in results["traffic"]["mass"].items()}
    vmax = max(float(m.max()) for m in mass.values())
    fig, axes = plt.subplots(1, len(mass), figsize=(4.5 * len(mass) + 1, 3), squeeze=False, layout="constrained")
    for ax, (d, m) in zip(axes[0], mass.items()):
        im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0, vmax=vmax)
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
    fig.colorbar(im, ax=axes, fraction=0.03).set_label("mean routed mass per token")
    fig.suptitle("routed mass per expert and domain (all-HI run)")
    figures["routed_mass"] = fig

    if results["sweep"]:
        fig, ax = plt.subplots(figsize=(5, 3.4), layout="constrained")
        for name in dict.fromkeys(s["policy"] for s in results["sweep"]):
            pts = [(s["hi_fraction"], s["gap_recovery"]["overall"]) for s in results["sweep"] if s["policy"] == name]
            ax.plot([100 * f for f, _ in pts], [np.nan if g is None else 100 * g for _, g in pts], "o-", label=name)
        ax.set_xlabel("HI slots per layer (% of experts)")
        ax.set_ylabel("perplexity gap recovered (%)")
        ax.axhline(100, color="k", lw=0.5)
        ax.legend(fontsize=8)
        ax.set_title("all-LO to all-HI perplexity gap recovered vs budget", fontsize=10)
        figures["sweep"] = fig
    return figures


def plot_results(results: dict, out: Path) -> list[Path]:
    """Write result_figures(results) as PNGs into out."""
    import matplotlib.pyplot as plt

    written = []
    for stem, fig in result_figures(results).items():
        fig.savefig(out / f"{stem}.png", dpi=110)
        plt.close(fig)
        written.append(out / f"{stem}.png")
    return written

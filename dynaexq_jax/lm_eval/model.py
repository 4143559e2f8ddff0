"""The lm-evaluation-harness model `dynaexq`: every request is served by the budgeted runtime
(runtime.engine.Engine), so the policy runs live while the harness evaluates.

* loglikelihood: requests are tokenized as lm-eval's own `hf` model does (trailing context
  whitespace moved into the continuation; an empty context conditioned on the prefix token),
  sorted longest first, right-padded into batches of `batch_size` rows (short batches filled
  with rows of padding, so nothing recompiles) and teacher-forced through Engine.score, the same
  path that measures perplexity: the log-probability of a continuation is the sum of its tokens'
  -nll, greedy when each of them is the argmax. Padding is left out of the hotness.
* loglikelihood_rolling: a document in disjoint windows of max_length tokens (lm-eval's rolling
  windows), each scored as above, summed.
* generate_until: requests grouped by their generation kwargs, longest first, generated in
  batches through Engine.generate (greedy, or sampled per do_sample/temperature/top_k/top_p),
  stopped as soon as every row has met a stop string or eos, cut at the first stop string.

Model args (lm-eval `--model_args k=v,...`): see DynaexqLM. Every option is checked; one that does
not apply (a runtime option without a budget, hi/lo with a converted checkpoint, ...) is an error.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from dynaexq_jax.errors import EvaluationError, check_int
from dynaexq_jax.experiments import corpus, default_model
from dynaexq_jax.runtime.budget import budget_for_fraction
from dynaexq_jax.runtime.config import RUNTIME_OPTIONS, EngineConfig
from dynaexq_jax.runtime.engine import Engine
from dynaexq_jax.runtime.policies import POLICIES as ENGINE_POLICIES
from dynaexq_jax.runtime.policies import OraclePolicy
from dynaexq_jax.serving.checkpoint import load_checkpoint
from dynaexq_jax.serving.sampling import Sampling
from dynaexq_jax.serving.tokenizer import TextCodec

# The policies an evaluation can name: the engine's, plus the comparison harness's two that need
# more than a name: static-calibrated (the static policy from a calibration ranking) and oracle
# (the best HI set for each period from an all-hi run's traffic of the same requests, recorded on
# the engine's clock).
POLICIES = tuple(ENGINE_POLICIES) + ("static-calibrated", "oracle")
# The options of the budgeted path besides the policy (model arg -> EngineConfig field): an error
# without a budget.
RUNTIME_ARGS = {k: v for k, v in RUNTIME_OPTIONS.items() if k != "policy"}
_USES_RANKING = ("static-calibrated", "dynaexq")


@register_model("dynaexq")
class DynaexqLM(TemplateLM):
    """pretrained: a converted checkpoint, or a Hugging Face directory converted on the fly with
    tiers hi/lo (default: the embedded model). Without `budget` every expert runs in `tier` (hi or
    lo); with it (a size such as 2GiB, or a share of HI slots per layer such as 20%) the runtime
    runs `policy` (default dynaexq) with strategy/period/delta/rate_limit/alpha/transfers. calibration: the
    corpus domains ('prose', 'code' or 'all') whose calibration split ranks the experts for the
    initial HI set (default 'all' for static-calibrated and dynaexq). trace: an all-hi run's
    recorded traffic (record_trace=FILE), which the oracle policy needs. backend: the MoE backend.
    batch_size: rows per forward (the engine's batch); max_len: the cache length (default: the
    model's context, at most 2048); segment: positions per chunk / decode steps per segment;
    max_gen_toks: the default generation length; seed: sampling seed of generate_until; devices:
    an expert-parallel mesh of that many devices (each layer's experts split across them, the
    budget each device's);
    enable_thinking: the chat template's switch of that name (Qwen3), with --apply_chat_template."""

    def __init__(self, pretrained=None, tier=None, budget=None, policy=None, strategy=None, period=None,
                 delta=None, rate_limit=None, alpha=None, transfers=None, calibration=None, trace=None,
                 record_trace=None,
                 backend=EngineConfig.backend, batch_size=1, max_len=None, segment=EngineConfig.segment_len,
                 max_gen_toks=256, hi=None, lo=None, seed=0, enable_thinking=None, device=None, max_batch_size=None,
                 devices=1, **unknown):
        super().__init__()
        if unknown:
            raise EvaluationError(f"unknown dynaexq model args {sorted(unknown)}")
        if device is not None:
            import jax
            platform = "gpu" if str(device).split(":")[0] in ("cuda", "gpu") else str(device)
            if platform != jax.default_backend():
                raise EvaluationError(f"device '{device}': JAX runs on {jax.default_backend()} here (the model is "
                                      f"placed on JAX's default device; leave device out)")
        if max_batch_size is not None:
            raise EvaluationError("max_batch_size applies to batch_size=auto, which dynaexq does not take "
                                  "(the engine's batch is fixed): give batch_size=N")
        runtime = dict(strategy=strategy, period=period, delta=delta, rate_limit=rate_limit, alpha=alpha,
                       transfers=transfers)
        self._setup(pretrained, tier, budget, policy, runtime, calibration, trace, record_trace, backend,
                    batch_size, max_len, segment, max_gen_toks, hi, lo, seed, devices)
        # The chat template's switches (lm-eval's --apply_chat_template), as the hf model passes them.
        self.chat_options = {} if enable_thinking is None else {"enable_thinking": bool(enable_thinking)}

    def _setup(self, pretrained, tier, budget, policy, options, calibration, trace, record_trace, backend,
               batch_size, max_len, segment, max_gen_toks, hi, lo, seed, devices):
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            raise EvaluationError("batch_size=auto is not supported: the engine's batch is fixed, give batch_size=N")
        check_int("batch_size", batch_size, EvaluationError)
        check_int("max_gen_toks", max_gen_toks, EvaluationError)
        check_int("devices", devices, EvaluationError)
        given = {k: v for k, v in options.items() if v is not None}
        if budget is None:
            if policy is not None or given:
                names = ", ".join(["policy"] * (policy is not None) + sorted(given))
                raise EvaluationError(f"{names} appl{'ies' if len(given) + (policy is not None) == 1 else 'y'} "
                                      f"only with a budget; without one every expert runs in one tier (tier=hi|lo)")
            tier = tier or "hi"
            if tier not in ("hi", "lo"):
                raise EvaluationError(f"tier must be hi or lo, got {tier!r}")
            policy = "all-hi" if tier == "hi" else "all-lo"
        elif tier is not None:
            raise EvaluationError("tier applies only without a budget; with one the policy chooses each expert's tier")
        policy = policy or EngineConfig.policy
        if policy not in POLICIES:
            raise EvaluationError(f"unknown policy '{policy}' (use one of {', '.join(POLICIES)})")
        if calibration is not None and policy not in _USES_RANKING:
            raise EvaluationError(f"calibration applies to {' and '.join(_USES_RANKING)}, not to policy '{policy}'")
        if (trace is None) != (policy != "oracle"):
            raise EvaluationError("the oracle policy needs trace=FILE (an all-hi run's record_trace) and only it "
                                  "takes one")
        if record_trace is not None and policy != "all-hi":
            raise EvaluationError("record_trace applies to the all-hi policy (the oracle's reference run)")

        ckpt = load_checkpoint(default_model.cached_conversion(pretrained, hi, lo, EvaluationError))
        cfg = ckpt.config
        max_len = max_len or min(cfg.max_position_embeddings, 2048)
        self.settings = settings = EngineConfig(
            policy="static" if policy == "static-calibrated" else "all-hi" if policy == "oracle" else policy,
            batch=batch_size, max_len=max_len, segment_len=segment, backend=backend, devices=devices,
            **{RUNTIME_ARGS[k]: v for k, v in given.items()})
        if policy == "oracle":
            # The best HI set of each period from the all-hi run's traffic at the same steps of the
            # engine's clock. A decision after chunk b serves from chunk b + 3 on (replay.py).
            settings = settings.replace(policy=OraclePolicy(_read_trace(trace, segment), segment,
                                                            settings.update_period, lag=2 * segment))
        ranking = None
        if policy in _USES_RANKING and calibration != "none":
            ranking = _calibration(ckpt, calibration or "all", devices)
        if budget is None:
            budget = budget_for_fraction(ckpt, 1.0 if tier == "hi" else 0.0, settings)
        self.engine = Engine(ckpt, budget_bytes=budget, settings=settings, calibration=ranking)
        self.policy_name = policy
        self.codec = self.engine.codec
        if self.codec.tokenizer is None:
            raise EvaluationError(f"{ckpt.path} has no tokenizer.json: lm-eval passes text")
        self.eos = list(cfg.eos_token_ids)
        if not self.eos:
            raise EvaluationError(f"{ckpt.path}: the config names no eos token, which lm-eval conditions on")
        # The scoring window: the longest multiple of the chunk the cache holds.
        self.max_length = max_len - max_len % segment
        self.max_gen_toks, self.seed = max_gen_toks, seed
        self.record_trace = Path(record_trace) if record_trace is not None else None
        self.calls: list[dict] = []          # one entry per engine call: what it served, its runtime

    # ---- tokens ----------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.eos[0]

    @property
    def tokenizer_name(self) -> str:
        return str(self.engine.checkpoint.path)

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.codec.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens) -> str:
        return self.codec.decode(tokens)

    def chat_template(self, chat_template=False) -> str | None:
        """The checkpoint's chat template when lm-eval is asked to apply one (None otherwise)."""
        if not chat_template:
            return None
        if self.codec.chat_template is None:
            raise EvaluationError(f"{self.engine.checkpoint.path} has no chat template: run without "
                                  "--apply_chat_template")
        return self.codec.chat_template

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.codec.render_chat(chat_history, add_generation_prompt, **self.chat_options)

    # ---- engine calls ---------------------------------------------------------------------------------
    def _after_call(self, kind: str, requests: int, tokens: int, runtime: dict, clock0: int):
        """clock0: the engine's clock when the call began (Engine.steps_served)."""
        self.calls.append(dict(kind=kind, requests=requests, tokens=tokens, runtime=runtime, clock0=clock0))

    def save_trace(self) -> None:
        """Write record_trace: every boundary's routed mass on the engine's clock (lm-eval calls
        get_model_info, which calls this, once it has run every request)."""
        boundaries = [(c["clock0"] + t["step"], t["mass"]) for c in self.calls for t in c["runtime"]["timeline"]]
        np.savez(self.record_trace, chunk=self.settings.segment_len,
                 clock=np.asarray([b[0] for b in boundaries], np.int64),
                 mass=np.asarray([b[1] for b in boundaries], np.float32))

    def _score_rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """rows: (tokens, n): a token sequence of at most max_length + 1 tokens whose last n are
        scored -> (sum of their log-probabilities, whether each is the greedy choice)."""
        chunk, B = self.settings.segment_len, self.settings.batch
        longest = max(len(t) for t, _ in rows) - 1
        positions = -(-longest // chunk) * chunk
        # The cache: a power of two of at least 64 (few compiled shapes), in whole chunks, at most max_length.
        window = min(self.max_length, -(-max(64, 1 << (positions - 1).bit_length()) // chunk) * chunk)
        tokens = np.zeros((B, positions + 1), np.int32)
        valid = np.zeros((B, positions), bool)
        for b, (t, _) in enumerate(rows):
            tokens[b, :len(t)] = t
            valid[b, :len(t) - 1] = True
        clock0 = self.engine.steps_served
        res = self.engine.score(tokens, valid=valid, window=window)
        self._after_call("loglikelihood", len(rows), int(valid.sum()), res.runtime, clock0)
        out = []
        for b, (t, n) in enumerate(rows):
            scored = slice(len(t) - 1 - n, len(t) - 1)      # the positions whose targets are the last n
            out.append((-float(res.nll[b, scored].astype(np.float64).sum()), bool(res.greedy[b, scored].all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context tokens, continuation tokens), as
        TemplateLM.loglikelihood encodes them."""
        rows = []
        for _, ctx, cont in requests:
            if not cont:
                raise EvaluationError("a loglikelihood request with an empty continuation")
            if len(cont) > self.max_length:
                raise EvaluationError(f"a continuation of {len(cont)} tokens is longer than max_len "
                                      f"({self.max_length}) can score")
            rows.append(((ctx + cont)[-(self.max_length + 1):], len(cont)))
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), rows[i][0]))
        out: list = [None] * len(rows)
        B = self.settings.batch
        for i in tqdm(range(0, len(order), B), desc="dynaexq loglikelihood", disable=disable_tqdm):
            batch = order[i:i + B]
            for j, r in zip(batch, self._score_rows([rows[j] for j in batch])):
                out[j] = r
                self.cache_hook.add_partial("loglikelihood", requests[j][0], r)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(((None, None), ctx, cont))
                owner.append(i)
        totals = np.zeros(len(requests))
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(t) for t in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="dynaexq generate_until", disable=disable_tqdm)
        for members in groups.values():
            until, max_gen, sampling = self._generation_options(requests[members[0]].args[1])
            contexts = {i: self.tok_encode(requests[i].args[0]) for i in members}
            members.sort(key=lambda i: (-len(contexts[i]), requests[i].args[0]))
            room = self._context_room(max_gen)
            for k in range(0, len(members), self.settings.batch):
                batch = members[k:k + self.settings.batch]
                prompts = [(contexts[i] or [self.prefix_token_id])[-room:] for i in batch]
                for i, text in zip(batch, self._generate(prompts, until, max_gen, sampling, len(self.calls))):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out

    def _generation_options(self, gen_kwargs: dict):
        if not isinstance(gen_kwargs, dict):
            raise EvaluationError(f"generation kwargs must be a dict, got {gen_kwargs!r}")
        kw = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kw.pop("until", None), eos=None)
        max_gen = kw.pop("max_gen_toks")
        check_int("max_gen_toks", max_gen, EvaluationError)
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 0.0))     # 0 unless do_sample (normalize_gen_kwargs)
        top_k, top_p = kw.pop("top_k", None), kw.pop("top_p", None)
        top_k, top_p = int(top_k or 0), 1.0 if top_p is None else float(top_p)
        if kw:
            raise EvaluationError(f"generation kwargs dynaexq does not take: {sorted(kw)} (it takes until, "
                                  "max_gen_toks, do_sample, temperature, top_k, top_p)")
        if do_sample and temperature <= 0:
            raise EvaluationError("do_sample=True needs a temperature > 0")
        return until, max_gen, Sampling(temperature, top_k, top_p)

    def _context_room(self, max_gen: int) -> int:
        """Context tokens a prompt may keep (the rest is cut on the left, as lm-eval's hf model
        does): the cache holds the prompt, its first token and whole decode segments."""
        s, max_len = self.settings.segment_len, self.settings.max_len
        # Prompts are padded to a multiple of 16 (generate.bucket), which the cache holds too.
        room = min(max_len - 1 - -(-(max_gen - 1) // s) * s, max_len // 16 * 16)
        if room < 1:
            raise EvaluationError(f"max_gen_toks={max_gen} leaves no room for a prompt in max_len="
                                  f"{self.settings.max_len}")
        return room

    def _generate(self, prompts, until, max_gen, sampling, call: int) -> list[str]:
        """Generate for one batch, stopping once every row met eos or a stop string."""
        rows = [[] for _ in prompts]

        def finished(row) -> bool:
            return any(t in self.eos for t in row) or any(u and u in self.codec.decode(row) for u in until)

        def on_tokens(toks):
            for r, col in zip(rows, np.asarray(toks).T):
                r.extend(col.tolist())
            return all(finished(r) for r in rows)

        clock0 = self.engine.steps_served
        res = self.engine.generate(prompts, max_new_tokens=max_gen, sampling=sampling, seed=self.seed + call,
                                   on_tokens=on_tokens)
        self._after_call("generate_until", len(prompts), sum(map(len, res.tokens)), res.runtime, clock0)
        return [postprocess_generated_text(self.codec.decode(t), until, None) for t in res.tokens]

    # ---- what the run did -----------------------------------------------------------------------------
    def runtime_summary(self) -> dict:
        """The runtime over the whole evaluation: policy, budget, HI slots, the HI hit rate (routed
        mass served by HI copies, over every boundary), swaps, bytes moved, stalls, calls."""
        counters: dict[str, float] = {}
        served = total = 0.0
        for c in self.calls:
            for k, v in c["runtime"]["counters"].items():
                counters[k] = max(counters.get(k, 0), v) if k == "max_owned_bytes" else counters.get(k, 0) + v
            for t in c["runtime"]["timeline"]:
                if t["routed_mass"] > 0:
                    served += t["hit_rate"] * t["routed_mass"]
                    total += t["routed_mass"]
        plan = self.engine.plan
        return dict(policy=self.policy_name, budget_bytes=plan.budget, n_hi=list(self.engine.n_hi),
                    num_experts=self.engine.config.num_experts, hi_hit_rate=served / total if total else None,
                    counters=counters, calls=len(self.calls),
                    tokens={k: sum(c["tokens"] for c in self.calls if c["kind"] == k)
                            for k in ("loglikelihood", "generate_until")},
                    checkpoint=str(self.engine.checkpoint.path),
                    tiers={t: f.name for t, f in self.engine.checkpoint.tiers.items()})

    def get_model_info(self) -> dict:
        if self.record_trace is not None:
            self.save_trace()
        return {"dynaexq": self.runtime_summary()}


def _read_trace(path, chunk: int) -> np.ndarray:
    """A recorded all-hi trace as the oracle reads it: routed mass f32 [chunks, L_moe, E] by
    chunk of the engine's clock (boundaries of one chunk summed)."""
    f = Path(path)
    if not f.is_file():
        raise EvaluationError(f"oracle trace {f} does not exist (write it with policy=all-hi,record_trace={f})")
    try:
        with np.load(f) as z:
            recorded, clock, mass = int(z["chunk"]), z["clock"], z["mass"]
    except (OSError, ValueError, KeyError) as e:
        raise EvaluationError(f"{f}: not an oracle trace written by record_trace ({e})") from None
    if recorded != chunk or mass.ndim != 3 or len(clock) != len(mass):
        raise EvaluationError(f"{f}: recorded with segment={recorded}, this run has segment={chunk}: record it "
                              "again with the same settings")
    trace = np.zeros((int(clock.max()) // chunk + 1, *mass.shape[1:]), np.float32)
    np.add.at(trace, clock // chunk, mass)
    return trace


def _calibration(ckpt, domains: str, devices: int) -> np.ndarray:
    """The comparison harness's ranking (compare.calibration_ranking, its defaults) on the
    calibration split of the given corpus domains (computed once per checkpoint and domains)."""
    names = corpus.DOMAINS if domains == "all" else tuple(str(domains).split("+"))
    if [d for d in names if d not in corpus.DOMAINS]:
        raise EvaluationError(f"calibration must be none, all or corpus domains joined by '+' "
                              f"({', '.join(corpus.DOMAINS)}), got {domains!r}")
    key = (str(Path(ckpt.path).resolve()), names)
    if key not in _RANKINGS:
        from dynaexq_jax.experiments.compare import calibration_ranking
        _RANKINGS[key] = calibration_ranking(ckpt, TextCodec(ckpt.path), names, devices=devices)
    return _RANKINGS[key]


_RANKINGS: dict[tuple, np.ndarray] = {}

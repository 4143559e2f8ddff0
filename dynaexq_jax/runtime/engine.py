"""The budgeted serving engine: pools fixed by the budget, a hotness-driven policy, and
asynchronous promotion/demotion published only between jitted decode segments.

At every segment boundary (generate.Controller hooks) the engine
  1. publishes the swap pairs whose host-to-device copies have arrived (is_ready): in the default
     deterministic mode every pair started at the previous boundary (waiting on the host, while
     the already-dispatched next segment runs), otherwise only those that arrived, deferring
     the rest. The forward pass never waits for a copy;
  2. asks the policy for new swaps when its period has elapsed, against the HI sets as they will
     be once the swaps in flight are published; the transfer schedule (runtime.transfers) ranks
     them by benefit across all layers, replacing what was queued;
  3. starts copies for the queue's best swaps, as many as fit in the staging bytes the budget
     reserves (budget.BudgetPlan.staging).
Copies are plain async device_puts of one expert's packed tier from the host store; the
publication is a jitted, donated scatter into the pool slots plus a new assignment.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from dynaexq_jax.errors import GenerationError, RuntimeConfigError
from dynaexq_jax.model.moe import HI, LO, sharded
from dynaexq_jax.runtime.budget import BudgetPlan, plan_for, resolve_budget
from dynaexq_jax.runtime.config import EngineConfig
from dynaexq_jax.runtime.pools import DevicePools, HostStore, tree_nbytes
from dynaexq_jax.runtime.transfers import PlannedSwap, TransferSchedule
from dynaexq_jax.serving.checkpoint import Checkpoint, attach_experts, load_checkpoint
from dynaexq_jax.serving.generate import Controller, GenerationResult, generate
from dynaexq_jax.serving.sampling import Sampling
from dynaexq_jax.serving.scoring import ScoreResult, score
from dynaexq_jax.serving.tokenizer import TextCodec

# Host-to-device copies are issued from one background thread: on a GPU device_put is already an
# asynchronous DMA, but on the CPU backend it is a synchronous memcpy that would otherwise run on
# the controller's critical path.
_COPIER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynaexq-copy")


@dataclasses.dataclass
class Transition:
    """One swap pair in flight: both copies are futures of device arrays that may not have arrived."""
    swap: PlannedSwap
    job: concurrent.futures.Future   # -> a list of (hi_copy, lo_copy) one-slot TierPools on the device
                                     #    (None: a shard of another process's device, copied there)
    index: int                       # this pair's entry in the job's list
    nbytes: int

    @property
    def copies(self):
        return self.job.result()[self.index]

    @property
    def ready(self) -> bool:
        return self.job.done() and all(x.is_ready() for x in jax.tree.leaves(self.copies))


@dataclasses.dataclass
class RuntimeCounters:
    promotions: int = 0
    demotions: int = 0
    bytes_moved: int = 0
    publishes_deferred: int = 0     # boundaries at which a pair in flight had not arrived yet
    copy_wait_s: float = 0.0        # deterministic mode: host time spent waiting for copies
    drain_wait_s: float = 0.0       # host time waiting for the dispatched segment before a publish
    device_stalls: int = 0          # publishes of copies that had not arrived (must stay 0)
    plans: int = 0
    swaps_planned: int = 0
    max_owned_bytes: int = 0


class Engine(Controller):
    """Serve a converted checkpoint under a device-memory budget.

    model: a path or a loaded Checkpoint. budget_bytes: int, '20GiB' or '25%' (of
    each layer's experts in HI; budget.resolve_budget). settings: an EngineConfig
    (policy, segment length, the batch and max_len that size the KV cache, ...); keyword
    arguments change single settings, e.g. Engine(model, budget_bytes="2GiB", policy="static",
    batch=8). calibration: optional ranking scores [L_moe, E] for the initial HI set (and the
    greedy capacity strategy, through the policy's slot_priority); policy 'sensitivity' defaults
    to the traffic the conversion measured with its LO costs (CheckpointInfo.routed_mass).

    deterministic (default): the copies started at a boundary are published at the next one,
    the host waiting for them if they have not arrived; generation is pipelined, so that wait
    overlaps the segment already dispatched and the device keeps computing. Decisions and tokens
    then depend only on the inputs. deterministic=False publishes only the copies that have
    arrived and defers the rest (never waits), at the price of timing-dependent decisions."""

    def __init__(self, model, *, budget_bytes, settings: EngineConfig | None = None,
                 calibration: np.ndarray | None = None, **overrides):
        self.settings = settings = (settings or EngineConfig()).replace(**overrides)
        ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(Path(model))
        self.policy = settings.make_policy(ckpt)
        calibration = settings.default_ranking(ckpt) if calibration is None else calibration
        self.checkpoint, self.config = ckpt, ckpt.config
        self.codec = TextCodec(ckpt.path)
        cfg = self.config
        E, L = cfg.num_experts, len(cfg.moe_layers)

        # Planned before anything is copied, so an infeasible budget fails fast (an all-hi / all-lo
        # policy's budget is checked to hold every expert in its tier).
        self.plan: BudgetPlan = plan_for(ckpt, resolve_budget(budget_bytes, ckpt, settings), settings,
                                         layer_priority=self.policy.slot_priority(calibration))
        # On an expert-parallel mesh every device runs this plan for its own E / N experts of each
        # layer: the policy, the residency and the transfers work on shards (DevicePools), and every
        # [L_moe, E] array reads as [L_moe * N, E / N] shards by a reshape (self.shards).
        n = settings.devices
        if n > 1:
            self.policy = self.policy.on_shards(self.shards)
        if jax.process_count() > 1 and not settings.deterministic:
            # Every process plans alone from the same scores: their assignments agree only if
            # they publish the same swaps at the same boundaries.
            raise RuntimeConfigError("across processes the engine must be deterministic (each process publishes "
                                     "at the same boundaries as the others)")
        self.mesh = sharded.expert_mesh(n) if n > 1 else None
        self.dense = jax.device_put(ckpt.params) if self.mesh is None else sharded.replicated(ckpt.params, self.mesh)
        self.cache_dtype = np.dtype(ckpt.params.embed.dtype)
        self.n_hi = list(self.plan.n_hi)                      # per layer, on each device
        self._shard_hi = [k for k in self.n_hi for _ in range(n)]
        self.store = HostStore(ckpt.experts, cfg.moe_layers)
        ranking = None if calibration is None else self.shards(np.asarray(calibration))
        hi_sets = self.policy.initial_hi(self._shard_hi, E // n, ranking)
        self.pools = DevicePools(self.store, hi_sets, E // n, self.mesh)
        self.pools.warm_up()
        # Dense params and pools never change size (swaps rewrite slots in place).
        self._resident_bytes = self.plan.fixed.dense_params + self.pools.nbytes
        self.counters = RuntimeCounters()
        self.scores = np.zeros((L, E), np.float32)   # hotness EMA, carried across requests
        self.transitions: list[Transition] = []      # swap pairs whose copies are in flight
        self.schedule = TransferSchedule(self.plan.staging, self.plan.m_hi + self.plan.m_lo, groups=n)
        # The policy's clock: decode steps (scored positions) of earlier requests, so that its update
        # period runs across requests (many short ones must not each start a plan).
        self.steps_served = 0
        self._last_update: int | None = None
        self._reset_timeline()

    # The Controller settings the jitted steps read.
    @property
    def alpha(self) -> float:
        return self.settings.alpha

    @property
    def hotness_in_prefill(self) -> bool:
        return self.settings.hotness_in_prefill

    # ---- accounting -------------------------------------------------------------------------
    def shards(self, a: np.ndarray) -> np.ndarray:
        """[..., L_moe, E] -> [..., L_moe * N, E / N]: every layer's experts by device (a view)."""
        n = self.settings.devices
        return a.reshape(*a.shape[:-2], a.shape[-2] * n, a.shape[-1] // n)

    def owned_bytes(self) -> int:
        """Device bytes the runtime owns now, on the device that owns the most: dense params,
        pools + assignment, copies in flight, the KV cache and the hotness scores (every device
        holds the dense params, the cache and equal pools). Workspace and margin are reserved in
        the plan."""
        kv = self.plan.fixed.kv_cache
        scores = 4 * len(self.config.moe_layers) * self.config.num_experts
        copies = np.zeros(self.settings.devices, np.int64)
        for t in self.transitions:
            copies[t.swap.pos % self.settings.devices] += t.nbytes
        return self._resident_bytes + int(copies.max()) + kv + scores

    @property
    def budget_for_owned(self) -> int:
        return self.plan.budget - self.plan.fixed.reserved

    def params(self):
        return attach_experts(self.dense, dict(zip(self.config.moe_layers, self.pools.expert_pools())))

    # ---- controller hooks -------------------------------------------------------------------
    def _reset_timeline(self):
        self.timeline: list[dict] = []
        self._masks = []            # HI mask after each hook call (call 0 = after prefill)

    def take_boundaries(self) -> list[dict]:
        """The boundaries recorded since the timeline began or this was last called, removed from
        it: a server that never ends a generation reads them as it goes, keeping the timeline
        bounded (_boundary needs only the last two HI masks)."""
        taken, self.timeline = self.timeline, []
        del self._masks[:-2]
        return taken

    def initial_scores(self, num_layers, num_experts):
        return self.scores

    def after_prefill(self, mass, scores):
        return self._boundary(0, mass[None], scores, None, prefill=True)

    def after_segment(self, step, mass, scores, in_flight):
        return self._boundary(step, mass, scores, in_flight, prefill=False)

    def _boundary(self, step, mass, scores, in_flight, prefill):
        t0 = time.perf_counter()
        self.scores = scores
        # Segment k was dispatched with the params returned by hook call max(0, k - 1) (generate
        # dispatches one segment ahead), so that is the HI set that served its routed mass.
        seg = len(self._masks) - 1
        used = self._masks[max(0, seg - 1)] if self._masks else self.hi_mask()
        total = float(mass.sum())
        hit = float((mass * used[None]).sum() / total) if total > 0 else float("nan")
        published = self._publish_ready(in_flight)
        clock = self.steps_served + step
        if self.policy.wants_update(clock, self._last_update):
            self._last_update = clock
            self._plan(clock, scores)
        self._start_transfers()
        owned = self.owned_bytes()
        self.counters.max_owned_bytes = max(self.counters.max_owned_bytes, owned)
        mask = self.hi_mask()
        self._masks.append(mask)
        self.timeline.append(dict(step=int(step), prefill=prefill, hit_rate=hit, routed_mass=total,
                                  published=published, in_flight=len(self.transitions),
                                  queued=len(self.schedule.queue), owned_bytes=owned,
                                  served_hi_mask=used.astype(np.int8).tolist(),
                                  hi_mask=mask.astype(np.int8).tolist(), scores=np.round(scores, 6).tolist(),
                                  mass=np.round(mass.mean(0), 6).tolist(),
                                  controller_s=time.perf_counter() - t0))
        return self.params() if published else None

    def _publish_ready(self, in_flight) -> list:
        """Publish the transitions whose copies have arrived (all of them in deterministic mode).
        in_flight: the outputs of the segment dispatched with the current slots, or None."""
        published, waiting = [], []
        if self.transitions and in_flight is not None and self.settings.drain_before_publish:
            # Publishing rewrites pool slots in place (donated buffers). The segment already
            # dispatched still reads the old slots, and on the CPU backend an in-place write was
            # observed to overtake such an earlier reader (nondeterministic results), so let it
            # finish first. The device then idles only while the host publishes and dispatches.
            t0 = time.perf_counter()
            jax.block_until_ready(in_flight)
            self.counters.drain_wait_s += time.perf_counter() - t0
        for t in self.transitions:
            if self.settings.deterministic and not t.ready:
                t0 = time.perf_counter()
                jax.block_until_ready(t.copies)
                self.counters.copy_wait_s += time.perf_counter() - t0
            if t.ready:
                s = t.swap
                self.pools.publish(s.pos, s.promote, s.demote, *(t.copies or (None, None)))
                self.schedule.published(s)
                self.counters.promotions += 1
                self.counters.demotions += 1
                self.counters.bytes_moved += t.nbytes
                first = self.pools.first_expert(s.pos)
                published.append((s.pos // self.settings.devices, first + s.promote, first + s.demote))
            else:
                waiting.append(t)
        if waiting:
            self.counters.publishes_deferred += 1
        self.transitions = waiting
        return published

    def hi_mask(self) -> np.ndarray:
        """bool [L_moe, E]: which experts are HI now."""
        return self.pools.hi_mask().reshape(len(self.config.moe_layers), self.config.num_experts)

    def _plan(self, step, scores):
        scores = self.shards(np.asarray(scores))
        swaps = self.policy.plan(step, scores, self.schedule.target_hi(self.pools.hi_mask()), self._shard_hi)
        self.counters.plans += 1
        self.counters.swaps_planned += sum(map(len, swaps))
        self.schedule.replan(swaps, scores)

    def _start_transfers(self):
        """Start copies for the schedule's best queued swaps that fit in the staging bytes. All
        copies started at one boundary go to the copier thread as one job (one thread hand-off
        per boundary)."""
        p, n = self.pools, self.settings.devices
        starts = [(s, (self.store.expert(s.pos // n, HI, p.first_expert(s.pos) + s.promote),
                       self.store.expert(s.pos // n, LO, p.first_expert(s.pos) + s.demote)))
                  for s in self.schedule.start(p.hi_mask())]
        if not starts:
            return
        job = _COPIER.submit(self._copy, [(s.pos, copies) for s, copies in starts])
        for i, (s, copies) in enumerate(starts):
            self.transitions.append(Transition(s, job, i, tree_nbytes(copies)))

    def _copy(self, jobs: list[tuple[int, tuple]]) -> list:
        """(shard, copies) pairs -> the copies on their shards' devices, in order, None for a
        shard of another process: one transfer per device (the copier thread's work)."""
        n, out = self.settings.devices, [None] * len(jobs)
        for d in sorted({v % n for v, _ in jobs if self.pools.local(v)}):
            mine = [i for i, (v, _) in enumerate(jobs) if v % n == d]
            for i, moved in zip(mine, self.store.to_device([jobs[i][1] for i in mine], self.pools.device(d))):
                out[i] = moved
        return out

    # ---- serving ----------------------------------------------------------------------------
    def generate(self, prompts, *, max_new_tokens: int = 32, sampling: Sampling = Sampling(), seed: int = 0,
                 stop_tokens=None, on_tokens=None) -> GenerationResult:
        """prompts: text(s) or token-id lists. Returns GenerationResult with .texts and .runtime
        (counters, per-boundary timeline, budget plan)."""
        s = self.settings
        prompts = self.codec.prompts(prompts)
        if len(prompts) > (s.prefill_batch or s.batch):
            raise GenerationError(f"{len(prompts)} prompts but the engine was sized for batch={s.batch}"
                                  + (f", prefill_batch={s.prefill_batch}" if s.prefill_batch else ""))
        self._reset_timeline()
        before = dataclasses.replace(self.counters)
        res = generate(self.params(), self.config, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                       key=jax.random.PRNGKey(seed), stop_tokens=stop_tokens, max_len=s.max_len,
                       segment_len=s.segment_len, prefill_chunk=s.prefill_chunk, backend=s.backend,
                       cache_dtype=self.cache_dtype, on_tokens=on_tokens, controller=self)
        res.texts = self.codec.texts(res.tokens)
        res.runtime = self._summary(before, self.timeline[1:])   # boundary 0 reports the prefill
        self.steps_served += max(map(len, res.tokens))
        return res

    def score(self, tokens, *, valid=None, window: int | None = None) -> ScoreResult:
        """Teacher-forced scoring of token streams int [B, N + 1] (B <= batch, N a multiple of
        segment_len) in chunks of segment_len positions and windows of `window` positions (default
        and at most max_len, a multiple of segment_len; each window from an empty cache), with the
        policy and transitions live. valid: bool [B, N] marks real positions (default all; padding
        is left out of the hotness). Returns ScoreResult (.nll [B, N], .greedy, .perplexity, .runtime)."""
        s = self.settings
        tokens = np.asarray(tokens)
        # A chunk is one forward of rows x segment_len positions: the budget's workspace holds
        # prefill_batch rows (of max(prefill_chunk, segment_len) positions: plan_options).
        rows = s.prefill_batch or s.batch
        if tokens.ndim != 2 or tokens.shape[0] > rows:
            raise GenerationError(f"score takes [batch <= {rows}, length] token streams (the engine was sized for "
                                  f"batch={s.batch}" + (f", prefill_batch={s.prefill_batch}" if s.prefill_batch else "")
                                  + f"), got {tokens.shape}")
        longest = s.max_len - s.max_len % s.segment_len
        window = longest if window is None else window
        if not (0 < window <= longest and window % s.segment_len == 0):
            raise GenerationError(f"the scoring window ({window}) must be a multiple of segment_len "
                                  f"({s.segment_len}) of at most max_len ({s.max_len})")
        self._reset_timeline()
        before = dataclasses.replace(self.counters)
        res = score(self.params(), self.config, tokens, chunk=s.segment_len, window=window,
                    backend=s.backend, cache_dtype=self.cache_dtype, controller=self, valid=valid)
        res.runtime = self._summary(before, self.timeline)
        self.steps_served += tokens.shape[1] - 1
        return res

    def _summary(self, before: RuntimeCounters, boundaries: list[dict]) -> dict:
        counters = {k: getattr(self.counters, k) - (getattr(before, k) if k != "max_owned_bytes" else 0)
                    for k in dataclasses.asdict(self.counters)}
        hits = [t["hit_rate"] for t in boundaries if t["routed_mass"] > 0]
        # Host time in the hooks: controller work, and waits for the device (the dispatched
        # segment before a publish, copies in deterministic mode), which are not controller work.
        controller_s = sum(t["controller_s"] for t in self.timeline)
        device_wait_s = counters["drain_wait_s"] + counters["copy_wait_s"]
        return dict(policy=self.policy.name, budget=self.plan.budget, n_hi=self.n_hi,
                    counters=counters, hi_hit_rate=float(np.mean(hits)) if hits else float("nan"),
                    controller_s=controller_s, controller_work_s=controller_s - device_wait_s,
                    device_wait_s=device_wait_s, budget_rows=self.plan.rows(), timeline=self.timeline)

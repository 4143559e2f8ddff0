"""Offloading baselines at the same device budget as DynaExq: only the HI tier, a per-layer cache
of HI experts on the device, the rest in host memory, copied in on demand.

  lru       a blocking LRU expert cache (the authors' baseline): a routed expert that is not
            resident is a miss; it evicts the least recently used resident expert of its layer
            and the layer waits for its host-to-device copy.
  prefetch  MoE-Infinity/ProMoE style: before layer j runs, its experts are predicted and
            copied in asynchronously (not waited on) while its attention runs; correct predictions
            are hits, mispredictions block as in lru. The predictor applies layer j's router to
            layer j's input (the residual stream after layer j-1) normalised with layer j's
            post_norm, since layer j's own post-attention input does not exist yet. Prefetches use
            only free staging buffers (at most K copies in flight) and never evict a predicted expert.

Execution is layer by layer, with a host round trip per MoE layer: one jitted function for
attention + router returns the top-k ids, the host (ExpertCache) decides hits, misses and
evictions and issues the copies, then one jitted function runs the layer's experts with the
mixed-tier op on one pool (the layer's cache slots; the slot of each resident expert is data,
so nothing recompiles). When a step needs more distinct experts than a layer's cache holds
(prefill, large batches), the layer runs in passes: load up to capacity, run with the routing
weights of the experts not loaded zeroed, accumulate, load the next group.

Timing on this machine is not a PCIe link: the runtime reports measured compute time without
copy waits plus the copies' time on an assumed link (projected_pcie_s, a projection).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import GenerationError, InfeasibleBudgetError, PromptTooLongError, RuntimeConfigError, check_int
from dynaexq_jax.model.config import ModelConfig
from dynaexq_jax.model.families.decoder import attention_block, final_logits, init_cache
from dynaexq_jax.model.layers import dense_mlp, moe_route, rms_norm
from dynaexq_jax.model.moe import HI, ExpertPools, moe_experts
from dynaexq_jax.model.quant import Format, expert_nbytes
from dynaexq_jax.runtime.budget import (
    FixedCosts,
    checkpoint_sizes,
    fixed_costs,
    format_bytes,
    parse_bytes,
    smallest_budget,
    smallest_budget_text,
)
from dynaexq_jax.runtime.config import EngineConfig, check_backend
from dynaexq_jax.runtime.policies import rank
from dynaexq_jax.runtime.pools import HostStore, tree_nbytes, write_slot
from dynaexq_jax.serving.checkpoint import Checkpoint, load_checkpoint
from dynaexq_jax.serving.generate import (
    GenerationResult,
    GenerationStats,
    check_prompts,
    pad_prompts,
    stop_ids,
    trim_at_stop,
)
from dynaexq_jax.serving.sampling import Sampling, sample
from dynaexq_jax.serving.tokenizer import TextCodec

MODES = ("lru", "prefetch")
# Assumption: effective host-to-device bandwidth of a PCIe 4.0 x16 link (32 GB/s raw), used only
# for the projected time.
PCIE_BYTES_PER_S = 25e9


# ---- budget ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CachePlan:
    """The same fixed costs as the DynaExq engine's BudgetPlan, K staging slots of one HI expert,
    and what is left as HI cache slots, split evenly over the MoE layers."""
    budget: int
    fixed: FixedCosts
    m_hi: int                       # bytes of one expert in the HI tier
    transfers_in_flight: int        # K
    capacity: tuple[int, ...]       # HI cache slots per MoE layer (cfg.moe_layers order)

    @property
    def staging(self) -> int:
        return self.transfers_in_flight * self.m_hi

    @property
    def total(self) -> int:
        return self.fixed.total + sum(self.capacity) * self.m_hi + self.staging

    def budget_for(self, per_layer: int) -> int:
        """The smallest budget that gives every MoE layer per_layer cache slots (same margin fraction)."""
        return smallest_budget(dataclasses.replace(self, capacity=(per_layer,) * len(self.capacity)))

    def rows(self) -> list[tuple[str, int]]:
        return self.fixed.rows() + [
            (f"HI expert cache ({sum(self.capacity)} x {format_bytes(self.m_hi)})", sum(self.capacity) * self.m_hi),
            (f"transfer staging (K={self.transfers_in_flight})", self.staging),
            ("total", self.total), ("budget", self.budget), ("unused", self.budget - self.total)]


def plan_cache(cfg: ModelConfig, *, budget: int, hi: Format, lo: Format, dense_params: int, batch: int,
               max_len: int, cache_dtype, backend: str, transfers_in_flight: int) -> CachePlan:
    L, E = len(cfg.moe_layers), cfg.num_experts
    fixed = fixed_costs(cfg, budget=budget, dense_params=dense_params, batch=batch, max_len=max_len,
                        prefill_len=None, cache_dtype=cache_dtype, backend=backend, hi=hi, lo=lo)
    m_hi = expert_nbytes(hi, cfg.hidden_size, cfg.moe_intermediate_size)
    plan = CachePlan(budget, fixed, m_hi, transfers_in_flight, (0,) * L)
    per_layer = min(E, (budget - plan.total) // m_hi // L)
    if per_layer < 1:
        smallest = plan.budget_for(1)
        raise InfeasibleBudgetError(
            f"budget {format_bytes(budget)} ({budget:,d} B) cannot hold one HI expert per MoE layer besides "
            f"the fixed costs and {transfers_in_flight} staging slots; the smallest feasible budget is "
            f"{smallest_budget_text(smallest)}")
    return dataclasses.replace(plan, capacity=(int(per_layer),) * L)


# ---- cache policy (pure Python) ---------------------------------------------------------------
@dataclasses.dataclass
class OffloadCounters:
    hits: int = 0                     # distinct (layer, step) expert uses found resident
    misses: int = 0                   # blocking loads
    evictions: int = 0
    passes_over_capacity: int = 0     # extra passes of a layer whose step needed more experts than slots
    prefetch_issued: int = 0
    prefetch_useful: int = 0          # prefetched experts used by the step they were fetched for
    bytes_moved: int = 0              # host-to-device expert bytes, blocking and prefetched
    blocking_copy_bytes: int = 0
    copy_wait_s: float = 0.0          # host time in copy calls: waits, and issues (a memcpy on CPU)
    prefetch_exposed_s: float = 0.0   # projected: prefetch link time not hidden behind attention
    max_owned_bytes: int = 0          # not a difference: the peak since start-up


class ExpertCache:
    """One MoE layer's HI expert cache: `capacity` slots, least-recently-used replacement. It only
    decides; the engine copies. Experts a step uses are touched in expert-id order."""

    def __init__(self, capacity: int, initial, counters: OffloadCounters | None = None):
        initial = [int(e) for e in initial]
        if capacity < 1 or len(initial) > capacity:
            raise RuntimeConfigError(f"an expert cache of {capacity} slots cannot start with {len(initial)} experts")
        self.capacity = capacity
        self.slot_of = {e: s for s, e in enumerate(initial)}
        self._lru = collections.OrderedDict.fromkeys(initial)     # least recently used first
        self._free = list(range(len(initial), capacity))
        self._prefetched: set[int] = set()
        self.counters = counters if counters is not None else OffloadCounters()

    def _load(self, e: int, protected: set[int]) -> int | None:
        """Make e resident in a free slot or the slot of the LRU expert outside `protected`."""
        if self._free:
            slot = self._free.pop(0)
        else:
            victim = next((v for v in self._lru if v not in protected), None)
            if victim is None:
                return None
            slot = self.slot_of.pop(victim)
            del self._lru[victim]
            self._prefetched.discard(victim)
            self.counters.evictions += 1
        self.slot_of[e] = slot
        self._lru[e] = None
        return slot

    def access(self, needed) -> list[tuple[dict[int, int], list[int]]]:
        """One step of this layer needs experts `needed`. Returns its passes, each ({expert: slot}
        of the experts it runs, [experts to load before it]). The first pass runs the hits and as
        many misses as fit without evicting an expert of the pass; each further pass is over
        capacity and may evict experts that earlier passes ran."""
        needed = sorted({int(e) for e in needed})
        hits = [e for e in needed if e in self.slot_of]
        misses = [e for e in needed if e not in self.slot_of]
        c = self.counters
        c.hits += len(hits)
        c.misses += len(misses)
        c.prefetch_useful += len(self._prefetched.intersection(needed))
        self._prefetched.clear()
        passes, group, room = [], hits, self.capacity - len(hits)
        while True:
            new, misses = misses[:room], misses[room:]
            group = sorted(group + new)
            protected = set(group)
            for e in new:
                self._load(e, protected)
            passes.append(({e: self.slot_of[e] for e in group}, new))
            for e in group:
                self._lru.move_to_end(e)
            if not misses:
                return passes
            c.passes_over_capacity += 1
            group, room = [], self.capacity

    def prefetch(self, predicted, limit: int) -> list[tuple[int, int]]:
        """Start loading up to `limit` predicted experts (in priority order) that are not resident,
        never evicting a predicted expert. Returns [(expert, slot)]. Predictions are not uses:
        resident predicted experts keep their place in the LRU order."""
        protected = {int(e) for e in predicted}
        loads = []
        for e in (int(e) for e in predicted if e not in self.slot_of):
            if len(loads) == limit:
                break
            slot = self._load(e, protected)
            if slot is None:
                break
            loads.append((e, slot))
            self._prefetched.add(e)
        self.counters.prefetch_issued += len(loads)
        return loads


# ---- jitted pieces (shapes fixed per batch and token count; the cache assignment is data) ------
@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("k_cache", "v_cache"))
def _attend_route(layer, cfg: ModelConfig, x, positions, start, k_cache, v_cache):
    """-> (residual x [B, T, H], router input h [B*T, H], ids int32 [B*T, k], weights [B*T, k], caches)."""
    x, h, k_cache, v_cache = attention_block(layer, cfg, x, positions, k_cache, v_cache, start)
    h = h.reshape(-1, h.shape[-1])
    ids, w, _ = moe_route(layer.mlp, cfg, h)
    return x, h, ids, w, k_cache, v_cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("k_cache", "v_cache"))
def _dense_layer(layer, cfg: ModelConfig, x, positions, start, k_cache, v_cache):
    x, h, k_cache, v_cache = attention_block(layer, cfg, x, positions, k_cache, v_cache, start)
    return x + dense_mlp(layer.mlp, h), k_cache, v_cache


@functools.partial(jax.jit, static_argnames=("backend",), donate_argnames=("acc",))
def _run_experts(acc, h, ids, w, loaded, active, pool, slot, *, backend: str):
    """acc [B, T, H] + the layer's MoE output from the loaded experts (bool [E]) over the active
    tokens (bool [B*T]); every other routing weight is zeroed. pool: the layer's cache slots."""
    w = jnp.where(loaded[ids] & active[:, None], w, jnp.zeros_like(w))
    experts = ExpertPools((pool,), jnp.zeros_like(slot), slot)
    return acc + moe_experts(h, ids, w, experts, backend).reshape(acc.shape)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _predict(layer, x, cfg: ModelConfig):
    """MoE layer j's experts guessed from its input x [B, T, H] (its post-attention input is not
    computed yet): normalised with layer j's post_norm, routed with layer j's router."""
    h = rms_norm(x, layer.post_norm, cfg.rms_norm_eps).reshape(-1, x.shape[-1])
    return moe_route(layer.mlp, cfg, h)[0]


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"))
def _sample_next(params, x, at, key, *, cfg: ModelConfig, sampling: Sampling):
    """The next token of each sequence from x [B, T, H] (after the last layer) at index at [B]."""
    return sample(final_logits(params, cfg, x, at), key, sampling)


_write_one = jax.jit(write_slot, donate_argnums=0)


# ---- the engine --------------------------------------------------------------------------------
class OffloadEngine:
    """Serve a converted qwen3_moe checkpoint from its HI tier alone, under a device-memory budget,
    with a per-layer expert cache (mode 'lru' or 'prefetch'). The initial cache of each layer
    holds the lowest expert ids, or the top of a calibration ranking [L_moe, E] when given."""

    def __init__(self, model, *, budget_bytes, mode: str = "lru", batch: int = EngineConfig.batch,
                 max_len: int = EngineConfig.max_len, backend: str = EngineConfig.backend,
                 transfers_in_flight: int = EngineConfig.transfers_in_flight, calibration: np.ndarray | None = None):
        if mode not in MODES:
            raise RuntimeConfigError(f"unknown offload mode '{mode}' (use one of {', '.join(MODES)})")
        check_backend(backend)
        for name, v in (("batch", batch), ("max_len", max_len), ("transfers_in_flight", transfers_in_flight)):
            check_int(name, v, RuntimeConfigError)
        ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(Path(model))
        cfg = self.config = ckpt.config
        if cfg.model_type != "qwen3_moe":
            raise RuntimeConfigError(f"the offload baselines support model_type 'qwen3_moe', not '{cfg.model_type}'")
        E, L = cfg.num_experts, len(cfg.moe_layers)
        if calibration is not None and np.shape(calibration) != (L, E):
            raise RuntimeConfigError(f"calibration must be [L_moe, E] = [{L}, {E}], got {np.shape(calibration)}")
        self.mode, self.batch, self.max_len, self.backend = mode, batch, max_len, backend
        self.codec = TextCodec(ckpt.path)
        self.dense = jax.device_put(ckpt.params)
        self.cache_dtype = np.dtype(ckpt.params.embed.dtype)
        self.plan = plan_cache(cfg, budget=parse_bytes(budget_bytes), **checkpoint_sizes(ckpt), batch=batch,
                               max_len=max_len, backend=backend, transfers_in_flight=transfers_in_flight)
        self.store = HostStore(ckpt.experts, cfg.moe_layers)
        self.counters = OffloadCounters()
        self.caches, self.pools = [], []
        for pos, cap in enumerate(self.plan.capacity):
            initial = range(cap) if calibration is None else rank(np.asarray(calibration[pos], float))[:cap]
            self.caches.append(ExpertCache(cap, initial, self.counters))
            self.pools.append(self.store.pool(pos, HI, list(initial)))
        self._resident_bytes = tree_nbytes(self.dense) + sum(tree_nbytes(p) for p in self.pools)
        self._in_flight: list = []     # staged one-expert copies that may not have arrived (<= K)

    # ---- accounting ---------------------------------------------------------------------------
    def owned_bytes(self) -> int:
        """Device bytes the runtime owns now: dense params, cache pools, staged copies, KV cache."""
        return self._resident_bytes + len(self._in_flight) * self.plan.m_hi + self.plan.fixed.kv_cache

    @property
    def budget_for_owned(self) -> int:
        return self.plan.budget - self.plan.fixed.reserved

    # ---- copies ---------------------------------------------------------------------------------
    def _retire(self) -> None:
        """Forget staged copies that have arrived: their staging buffers are free again."""
        self._in_flight = [s for s in self._in_flight if not all(a.is_ready() for a in jax.tree.leaves(s))]

    def _copy_in(self, pos: int, e: int, slot: int) -> None:
        """Copy expert e of MoE layer pos from host memory into its cache slot, through one of K
        staging buffers (waiting for the oldest copy when all K are in flight)."""
        self._retire()
        while len(self._in_flight) >= self.plan.transfers_in_flight:
            jax.block_until_ready(self._in_flight.pop(0))
        staged = self.store.to_device(self.store.expert(pos, HI, e))
        self._in_flight.append(staged)
        self.pools[pos] = _write_one(self.pools[pos], np.int32(slot), staged)
        self.counters.bytes_moved += self.plan.m_hi
        self.counters.max_owned_bytes = max(self.counters.max_owned_bytes, self.owned_bytes())

    def _prefetch(self, pos: int, layer, x, active: np.ndarray) -> int:
        """Predict MoE layer pos's experts from its input x and start copies of the missing ones,
        most-demanded first, into free staging buffers only (never waited on). Returns bytes issued."""
        pred = np.asarray(_predict(layer, x, cfg=self.config))
        counts = np.bincount(pred[active].ravel(), minlength=self.config.num_experts)
        order = [e for e in rank(counts) if counts[e] > 0]
        t0 = time.perf_counter()
        self._retire()
        loads = self.caches[pos].prefetch(order, self.plan.transfers_in_flight - len(self._in_flight))
        for e, slot in loads:
            self._copy_in(pos, e, slot)
        self.counters.copy_wait_s += time.perf_counter() - t0
        return len(loads) * self.plan.m_hi

    # ---- forward ----------------------------------------------------------------------------------
    def _moe_layer(self, pos: int, x, h, ids, w, active: np.ndarray):
        """Run MoE layer pos's experts for this step, pass by pass, loading misses (blocking)."""
        act = jnp.asarray(active)
        needed = np.unique(np.asarray(ids)[active])
        for slots, loads in self.caches[pos].access(needed):
            if loads:
                t0 = time.perf_counter()
                for e in loads:
                    self._copy_in(pos, e, slots[e])
                jax.block_until_ready(self._in_flight)
                self._in_flight = []
                self.counters.copy_wait_s += time.perf_counter() - t0
                self.counters.blocking_copy_bytes += len(loads) * self.plan.m_hi
            # Experts outside this pass get slot 0 and zero routing weights.
            loaded, slot = np.zeros(self.config.num_experts, bool), np.zeros(self.config.num_experts, np.int32)
            loaded[list(slots)], slot[list(slots)] = True, list(slots.values())
            x = _run_experts(x, h, ids, w, jnp.asarray(loaded), act, self.pools[pos], jnp.asarray(slot),
                             backend=self.backend)
        return x

    def _step(self, tokens: np.ndarray, start: np.ndarray, active: np.ndarray, at: np.ndarray, key,
              sampling: Sampling) -> np.ndarray:
        """One forward of tokens [B, T] continuing each sequence at start [B], layer by layer;
        active bool [B, T]: the tokens whose experts count (not padding, not finished rows).
        Returns the next token of each sequence (int32 [B], sampled at index at [B])."""
        cfg, T = self.config, tokens.shape[1]
        positions = jnp.asarray(start[:, None] + np.arange(T, dtype=np.int32))
        start_d, active = jnp.asarray(start), active.reshape(-1)
        x = self.dense.embed[jnp.asarray(tokens)]
        for i, layer in enumerate(self.dense.layers):
            kv = (self._k[i], self._v[i])
            if not cfg.is_moe_layer(i):
                x, self._k[i], self._v[i] = _dense_layer(layer, cfg, x, positions, start_d, *kv)
                continue
            pos = cfg.moe_layers.index(i)
            issued = self._prefetch(pos, layer, x, active) if self.mode == "prefetch" else 0
            t0 = time.perf_counter()
            x, h, ids, w, self._k[i], self._v[i] = _attend_route(layer, cfg, x, positions, start_d, *kv)
            ids.block_until_ready()
            # The prefetch copies overlap this layer's attention; what they take beyond it is exposed.
            self.counters.prefetch_exposed_s += max(0.0, issued / PCIE_BYTES_PER_S - (time.perf_counter() - t0))
            x = self._moe_layer(pos, x, h, ids, w, active)
        return np.asarray(_sample_next(self.dense, x, jnp.asarray(at), key, cfg=cfg, sampling=sampling))

    def generate(self, prompts, *, max_new_tokens: int = 32, sampling: Sampling = Sampling(), seed: int = 0,
                 stop_tokens=None) -> GenerationResult:
        """prompts: text(s) or token-id lists. Prefill runs all prompt tokens through the cache
        logic at once; decode runs one token per step for the whole batch. Returns a
        GenerationResult with .texts and .runtime (counters, hit rate, projected PCIe time)."""
        cfg = self.config
        prompts = self.codec.prompts(prompts)
        if len(prompts) > self.batch:
            raise GenerationError(f"{len(prompts)} prompts but the engine was sized for batch={self.batch}")
        check_prompts(prompts, max_new_tokens, self.max_len, cfg.vocab_size)
        tokens, lengths = pad_prompts(prompts)
        B, T = tokens.shape
        if T > self.max_len:
            raise PromptTooLongError(f"the longest prompt ({int(lengths.max())} tokens) is padded to {T}, more than "
                                     f"max_len={self.max_len}")
        stop = stop_ids(cfg, stop_tokens)
        key = jax.random.PRNGKey(seed)
        cache = init_cache(cfg, B, self.max_len, self.cache_dtype)
        self._k, self._v = list(cache.k), list(cache.v)
        stats = GenerationStats(prompt_tokens=int(lengths.sum()))
        before = dataclasses.replace(self.counters)

        t0 = time.perf_counter()
        last = self._step(tokens, np.zeros(B, np.int32), np.arange(T)[None, :] < lengths[:, None], lengths - 1,
                          jax.random.fold_in(key, 0), sampling)
        stats.time_to_first_token_s = time.perf_counter() - t0
        at_decode = dataclasses.replace(self.counters)
        done, out, n = np.isin(last, stop), [last], 1
        t_dec = time.perf_counter()
        while n < max_new_tokens and not done.all():
            tok = self._step(last[:, None], lengths + n - 1, ~done[:, None], np.zeros(B, np.int32),
                             jax.random.fold_in(key, n), sampling)
            last = np.where(done, last, tok)
            done = done | np.isin(last, stop)
            out.append(last)
            n += 1
        stats.decode_s = time.perf_counter() - t_dec
        stats.decode_tokens = B * (n - 1)

        result = trim_at_stop(np.stack(out, axis=1), stop)
        stats.generated_tokens = sum(len(r) for r in result)
        res = GenerationResult(result, stats, texts=self.codec.texts(result))
        counters = _since(self.counters, before)
        decode_projected = _projected_s(_since(self.counters, at_decode), stats.decode_s)
        res.runtime = dict(
            mode=self.mode, budget=self.plan.budget, capacity=list(self.plan.capacity), counters=counters,
            hit_rate=counters["hits"] / max(1, counters["hits"] + counters["misses"]),
            compute_s=stats.time_to_first_token_s + stats.decode_s - counters["copy_wait_s"],
            projected_pcie_s=_projected_s(counters, stats.time_to_first_token_s + stats.decode_s),
            projected_decode_tokens_per_s=stats.decode_tokens / decode_projected if decode_projected > 0 else 0.0,
            pcie_bytes_per_s_assumed=PCIE_BYTES_PER_S, budget_rows=self.plan.rows())
        return res


def _since(now: OffloadCounters, before: OffloadCounters) -> dict:
    return {k: v - getattr(before, k) if k != "max_owned_bytes" else v for k, v in dataclasses.asdict(now).items()}


def _projected_s(counters: dict, wall_s: float) -> float:
    """A projection of the wall time on a PCIe 4.0 x16 link: measured time without the host's copy
    calls, plus blocking copies at PCIE_BYTES_PER_S, plus prefetch time not hidden by attention."""
    return (wall_s - counters["copy_wait_s"] + counters["blocking_copy_bytes"] / PCIE_BYTES_PER_S
            + counters["prefetch_exposed_s"])

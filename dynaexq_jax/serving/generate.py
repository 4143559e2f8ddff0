"""Batched generation: prefill of right-padded prompts of different lengths into a preallocated
KV cache, chunk by chunk, then jitted decode segments of `segment_len` steps in one lax.scan with
the cache donated. Between segments the host may run a controller (the DynaExq runtime does)."""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import GenerationError, PromptTooLongError, check_int
from dynaexq_jax.model.config import ModelConfig
from dynaexq_jax.model.families import family
from dynaexq_jax.serving.hotness import ALPHA, ema_update, selected_mass
from dynaexq_jax.serving.sampling import Sampling, sample

# Decode steps per jitted segment unless a caller chooses another (the engine's default too).
SEGMENT_LEN = 16
# Prompt positions per prefill forward unless a caller chooses another (the engine's default too):
# a longer prompt is prefilled chunk after chunk into the cache, so activation memory (above all
# the attention scores, [B, heads, chunk, max_len] f32) follows the chunk, not the prompt.
PREFILL_CHUNK = 512


def bucket(n: int, quantum: int = 16) -> int:
    """Round lengths up so that prompts of nearby lengths share one compiled prefill."""
    return max(quantum, -(-n // quantum) * quantum)


# ---- prompts and stop tokens (shared with the offloading baselines) ------------------------------
def pad_prompts(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad prompts to one bucketed length: -> (tokens int32 [B, T], lengths int32 [B])."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), bucket(int(lengths.max()))), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return tokens, lengths


def stop_ids(cfg: ModelConfig, stop_tokens: Sequence[int] | None) -> np.ndarray:
    """int32 [n_stop]: the given stop tokens, or the model's eos tokens when None (an empty
    sequence: never stop)."""
    return np.asarray(cfg.eos_token_ids if stop_tokens is None else [int(t) for t in stop_tokens], np.int32)


def trim_at_stop(tokens: np.ndarray, stop: np.ndarray) -> list[list[int]]:
    """tokens int [B, n] generated per sequence -> each row up to and including its first stop
    token (rows without one are kept whole)."""
    out = []
    for row, hit in zip(tokens.tolist(), np.isin(tokens, stop)):
        first = np.flatnonzero(hit)
        out.append(row[: first[0] + 1] if len(first) else row)
    return out


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_len: int | None,
                  vocab_size: int) -> None:
    if not prompts:
        raise GenerationError("no prompts given")
    check_int("max_new_tokens", max_new_tokens, GenerationError)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty")
        bad = [t for t in p if not (0 <= int(t) < vocab_size)]
        if bad:
            raise GenerationError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        if max_len is not None and len(p) + max_new_tokens > max_len:
            raise PromptTooLongError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{len(p) + max_new_tokens} cache positions but the cache holds max_len={max_len}")


# ---- the jitted steps ------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "backend"), donate_argnames=("cache",))
def prefill_chunk(params, cfg: ModelConfig, tokens, lengths, start, cache, last_logits, mass_sum, *,
                  backend: str = "xla"):
    """One chunk of a prefill: tokens int32 [B, C], prompt positions start .. start + C - 1
    (start int32) of right-padded prompts of lengths int32 [B]. Returns (cache advanced by each
    row's real tokens in the chunk; last_logits f32 [B, V]: the logits of each prompt's last token
    once the chunk holding it has run, else as given; mass_sum f32 [L_moe, E] plus the chunk's
    router mass summed over its real tokens)."""
    C = tokens.shape[1]
    valid = jnp.clip(lengths - start, 0, C)
    last = lengths - 1 - start                                    # the last real token, in chunk positions
    logits, cache, info = family(cfg.model_type).forward(params, cfg, tokens, cache, backend=backend,
                                                         logits_at=jnp.clip(last, 0, C - 1), valid=valid)
    mask = jnp.arange(C)[None, :] < valid[:, None]
    mass = selected_mass(info.ids, info.probs, cfg.num_experts, mask) * mask.sum()   # a mean, back to a sum
    here = (last >= 0) & (last < C)
    return cache, jnp.where(here[:, None], logits, last_logits), mass_sum + mass


@functools.partial(jax.jit, static_argnames=("sampling", "alpha"))
def _first_token(last_logits, mass_sum, n_tokens, key, scores, *, sampling: Sampling, alpha: float | None):
    mass = mass_sum / jnp.maximum(n_tokens, 1).astype(jnp.float32)
    first = sample(last_logits, jax.random.fold_in(key, 0), sampling)
    return first, mass, scores if alpha is None else ema_update(scores, mass, alpha)


def prefill(params, cfg: ModelConfig, tokens, lengths, cache, key, scores, *, sampling: Sampling,
            backend: str = "xla", alpha: float | None = None, chunk: int = PREFILL_CHUNK):
    """tokens int32 [B, T] right-padded, lengths int32 [B], cache empty (donated), scores f32
    [L_moe, E] -> (first sampled token [B], cache, router mass f32 [L_moe, E] over the real prompt
    tokens, scores: the hotness EMA after one step with that mass, or unchanged when alpha is None).
    The prompt runs in chunks of `chunk` positions (the last one shorter; every full chunk shares
    one compiled step), each writing its part of the cache; only each prompt's last position
    gets logits."""
    last_logits, cache, mass_sum = prefill_logits(params, cfg, tokens, lengths, cache, backend=backend, chunk=chunk)
    first, mass, scores = _first_token(last_logits, mass_sum, jnp.sum(lengths), key, scores, sampling=sampling,
                                       alpha=alpha)
    return first, cache, mass, scores


def prefill_logits(params, cfg: ModelConfig, tokens, lengths, cache, *, backend: str = "xla",
                   chunk: int = PREFILL_CHUNK):
    """prefill's forward: tokens int32 [B, T] right-padded, lengths int32 [B], cache empty (donated)
    -> (logits f32 [B, V] at each prompt's last token, cache, router mass f32 [L_moe, E] summed
    over the real prompt tokens)."""
    B, T = tokens.shape
    # Sliced on the host: a device slice would compile once per prompt length.
    tokens, lengths = np.asarray(tokens, np.int32), jnp.asarray(lengths, jnp.int32)
    last_logits = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    mass_sum = jnp.zeros((len(cfg.moe_layers), cfg.num_experts), jnp.float32)
    for start in range(0, T, chunk):
        cache, last_logits, mass_sum = prefill_chunk(params, cfg, tokens[:, start:start + chunk], lengths,
                                                     jnp.int32(start), cache, last_logits, mass_sum, backend=backend)
    return last_logits, cache, mass_sum


def decode_step(params, cfg: ModelConfig, cache, last, done, backend: str):
    """One decode forward (traced inside a segment's scan): last int32 [B] the previous token of
    each sequence, done bool [B] -> (logits f32 [B, V], cache, selected mass f32 [L_moe, E] over
    the unfinished sequences)."""
    logits, cache, info = family(cfg.model_type).forward(params, cfg, last[:, None], cache, backend=backend)
    return logits[:, -1], cache, selected_mass(info.ids, info.probs, cfg.num_experts, ~done[:, None])


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "sampling", "backend", "alpha"),
                   donate_argnames=("cache",))
def decode_segment(params, cfg: ModelConfig, cache, last, done, step0, key, stop_ids, scores, *,
                   steps: int, sampling: Sampling, alpha: float, backend: str = "xla"):
    """Run `steps` decode steps. last: int32 [B] the previous token of each sequence; done: bool [B];
    step0: int32 index of the first token generated here (the sampling key is fold_in(key, step),
    so tokens do not depend on how generation is cut into segments); stop_ids: int32 [n_stop];
    scores: f32 [L_moe, E] hotness EMA, one step per decode step (hotness.py).
    Returns (tokens int32 [steps, B], done-after-token bool [steps, B], cache,
    mass f32 [steps, L_moe, E], scores)."""

    def step(carry, i):
        cache, last, done, scores = carry
        logits, cache, mass = decode_step(params, cfg, cache, last, done, backend)
        tok = sample(logits, jax.random.fold_in(key, step0 + i), sampling)
        tok = jnp.where(done, last, tok)
        done = done | jnp.isin(tok, stop_ids)
        scores = ema_update(scores, mass, alpha)
        return (cache, tok, done, scores), (tok, done, mass)

    (cache, _, _, scores), (toks, dones, mass) = jax.lax.scan(
        step, (cache, last, done, scores), jnp.arange(steps))
    return toks, dones, cache, mass, scores


# ---- results and the controller interface -------------------------------------------------------
@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0
    segments: list[dict] = dataclasses.field(default_factory=list)

    decode_tokens: int = 0           # tokens produced by decode segments (the first comes from prefill)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "decode_tokens_per_s": self.decode_tokens_per_s}


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]          # generated tokens per prompt (stop token included if hit)
    stats: GenerationStats
    texts: list[str] | None = None   # decoded tokens, when a tokenizer is at hand
    runtime: dict | None = None      # the budgeted runtime's counters and timeline (Engine)


class Controller:
    """Runs on the host between jitted segments (the DynaExq runtime is one). Each hook receives
    host copies of the router statistics and returns new params (e.g. with experts swapped
    between tiers) for the segments dispatched after it, or None to keep the current ones.

    Pipelining contract: the loop dispatches one segment ahead, so when after_segment runs the
    next segment may already be on the device, reading the params the hook is about to replace.
    Its device outputs arrive as `in_flight` (None when nothing is in flight): new params take
    effect from the segment after it, and a hook that rewrites buffers in place must first wait
    for it (jax.block_until_ready(in_flight)). Nothing is in flight during after_prefill."""
    alpha: float = ALPHA             # hotness EMA factor used inside the jitted steps
    hotness_in_prefill: bool = True  # whether the prefill forward counts as a hotness step

    def initial_scores(self, num_layers: int, num_experts: int) -> np.ndarray:
        """The hotness EMA a generation starts from, f32 [L_moe, E] (a serving engine carries
        it over from earlier requests)."""
        return np.zeros((num_layers, num_experts), np.float32)

    def after_prefill(self, mass: np.ndarray, scores: np.ndarray):
        """mass, scores: f32 [L_moe, E]."""
        return None

    def after_segment(self, step: int, mass: np.ndarray, scores: np.ndarray, in_flight):
        """step: decode steps done so far; mass f32 [steps, L_moe, E]; scores f32 [L_moe, E];
        in_flight: the dispatched segment's outputs (a pytree of device arrays) or None."""
        return None


# ---- generation ----------------------------------------------------------------------------------
def cache_len(lengths: np.ndarray, padded: int, max_new_tokens: int, segment_len: int, max_len: int | None) -> int:
    """Cache positions a generation needs: the longest prompt, then whole segments (the last
    may run past max_new_tokens), and at least the padded prompt length. max_len given: check
    it holds that many, else round the need up."""
    n_segments = -(-(max_new_tokens - 1) // segment_len)
    need = max(int(lengths.max()) + 1 + n_segments * segment_len, padded)
    if max_len is None:
        return bucket(need, 64)
    if need > max_len:
        raise PromptTooLongError(
            f"the cache (max_len={max_len}) cannot hold the longest prompt ({int(lengths.max())} tokens, padded "
            f"to {padded}) plus {max_new_tokens} new tokens in segments of {segment_len}: needs {need}")
    return max_len


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: Sampling = Sampling(), key: jax.Array | None = None,
             stop_tokens: Sequence[int] | None = None, max_len: int | None = None,
             segment_len: int = SEGMENT_LEN, backend: str = "xla", cache_dtype=jnp.float32,
             on_tokens: Callable[[np.ndarray], bool | None] | None = None,
             controller: Controller | None = None, prefill_chunk: int = PREFILL_CHUNK) -> GenerationResult:
    """Generate up to max_new_tokens for every prompt (prompts prefilled in chunks of
    prefill_chunk positions).

    Pipelined: segment i+1 is dispatched (from segment i's device outputs) before segment i's
    results are read on the host, so the device never waits for the host: streaming
    (on_tokens(tokens int [n, B])), stop checks and the controller's work overlap the next
    segment, and the controller's new params take effect from the segment after that."""
    check_int("segment_len", segment_len, GenerationError)
    check_int("prefill_chunk", prefill_chunk, GenerationError)
    check_prompts(prompts, max_new_tokens, max_len, cfg.vocab_size)
    ctl = controller or Controller()
    key = jax.random.PRNGKey(0) if key is None else key
    tokens, lengths = pad_prompts(prompts)
    max_len = cache_len(lengths, tokens.shape[1], max_new_tokens, segment_len, max_len)
    stop = stop_ids(cfg, stop_tokens)
    stop_d = jnp.asarray(stop)
    stats = GenerationStats(prompt_tokens=int(lengths.sum()))
    cache = family(cfg.model_type).init_cache(cfg, len(prompts), max_len, cache_dtype)
    scores = jnp.asarray(ctl.initial_scores(len(cfg.moe_layers), cfg.num_experts), jnp.float32)

    t0 = time.perf_counter()
    first, cache, mass, scores = prefill(params, cfg, tokens, lengths, cache, key, scores, sampling=sampling,
                                         backend=backend, alpha=ctl.alpha if ctl.hotness_in_prefill else None,
                                         chunk=prefill_chunk)
    first_h = np.asarray(first)
    stats.time_to_first_token_s = time.perf_counter() - t0
    done = np.isin(first_h, stop)
    if on_tokens and on_tokens(first_h[None, :]):
        done[:] = True
    params = ctl.after_prefill(np.asarray(mass), np.asarray(scores)) or params

    def dispatch(params, cache, last, done, step0, scores):
        return decode_segment(params, cfg, cache, last, done, jnp.int32(step0), key, stop_d, scores,
                              steps=segment_len, sampling=sampling, backend=backend, alpha=ctl.alpha)

    t_dec = time.perf_counter()
    blocks = _decode_pipelined(dispatch, params, cache, first, done, scores, ctl=ctl,
                               max_new_tokens=max_new_tokens, segment_len=segment_len, stats=stats,
                               on_tokens=on_tokens)
    stats.decode_s = time.perf_counter() - t_dec

    all_tokens = np.concatenate([first_h[:, None], *blocks], axis=1)
    result = trim_at_stop(all_tokens, stop)
    stats.generated_tokens = sum(len(r) for r in result)
    stats.decode_tokens = len(prompts) * (all_tokens.shape[1] - 1)
    return GenerationResult(result, stats)


def _decode_pipelined(dispatch, params, cache, first, done: np.ndarray, scores, *, ctl: Controller,
                      max_new_tokens: int, segment_len: int, stats: GenerationStats,
                      on_tokens: Callable[[np.ndarray], bool | None] | None) -> list[np.ndarray]:
    """The decode loop after the prefill's first token (first [B], done bool [B]): while the host
    reads segment i, segment i+1 (dispatched from segment i's device outputs with the params of
    before the hook) runs, and is what the hook receives as in flight. Returns the generated
    blocks int [B, steps], in order."""
    blocks = []
    produced = dispatched = 1         # tokens read on the host / covered by dispatched segments
    pending = None
    if produced < max_new_tokens and not done.all():
        pending = dispatch(params, cache, first, jnp.asarray(done), dispatched, scores)
        dispatched += segment_len
    while pending is not None:
        toks, dones, cache, mass, scores = pending
        pending = None
        if dispatched < max_new_tokens:   # keep the device busy while the host handles this segment
            pending = dispatch(params, cache, toks[-1], dones[-1], dispatched, scores)
            dispatched += segment_len
        t_seg = time.perf_counter()
        toks_h, dones_h = np.asarray(toks), np.asarray(dones)
        take = min(segment_len, max_new_tokens - produced)
        blocks.append(toks_h[:take].T)
        enough = bool(on_tokens(toks_h[:take])) if on_tokens else False
        produced += take
        t_ctl = time.perf_counter()
        params = ctl.after_segment(produced - 1, np.asarray(mass)[:take], np.asarray(scores), pending) or params
        stats.segments.append({"steps": take, "wait_s": t_ctl - t_seg, "controller_s": time.perf_counter() - t_ctl})
        if dones_h[take - 1].all() or enough:
            pending = None                # every sequence stopped: drop the speculative segment
    return blocks

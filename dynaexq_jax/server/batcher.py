"""Continuous batching under the budgeted runtime: one thread owns the engine and the batch slots
(serving.slots) and runs decode segments while any request is live.

At every segment boundary the loop
  1. stops the rows of requests that ended on the host (a stop string, a client that left);
  2. admits waiting requests into free slots: each prompt is prefilled into a one-row cache with
     the current params, its first token streamed, and the row written into its slot;
  3. dispatches the next segment (all slots, each with its own sampling settings and limit);
  4. reads the segment dispatched before it (pipelined, as generate is: the device works on the
     next segment meanwhile), streams each request's new text, ends those that met eos, their
     max_tokens or a stop string, and runs the engine's boundary (Engine.after_segment: publish
     arrived copies, plan, start copies) on the aggregate router traffic of all slots.
The engine's policy clock counts the server's decode steps; its budget holds the cache of every
slot plus the one row a joining request is prefilled into (EngineConfig.batch = slots + 1), and
the workspace of one prompt's prefill (prefill_batch=1).

Text: each request's generated tokens are decoded as a whole after every segment; new text is
streamed except a tail that may still change (an incomplete UTF-8 character) or that may begin a
stop string, so a stop string never reaches the client. A request ends at eos (finish_reason
"stop", eos not in the text), at max_tokens ("length"), at a stop string ("stop", the text cut
before it) or when cancelled."""
from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import GenerationError, PromptTooLongError, QueueFullError, RuntimeConfigError, ServerError
from dynaexq_jax.model.moe import sharded
from dynaexq_jax.runtime.engine import Engine
from dynaexq_jax.serving.generate import stop_ids
from dynaexq_jax.serving.hotness import ema_update
from dynaexq_jax.serving.slots import admit, decode_slots, init_slots, prefill_len, prefill_request, retire

# Tokens per second are reported over this many seconds of recent segments.
RATE_WINDOW_S = 10.0


@dataclasses.dataclass
class Event:
    """What a request's consumer receives (from the batcher's thread): kind "text" (text: the new
    text), "done" (finish_reason: stop or length) or "error" (text: the message). A cancelled
    request gets none."""
    kind: str
    text: str = ""
    finish_reason: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """One generation: prompt token ids, at most max_tokens new tokens, its own sampling settings
    (temperature 0: greedy; seed: its own PRNG key, so its tokens do not depend on its neighbours)
    and stop strings. on_event is called from the batcher's thread."""
    prompt: list[int]
    max_tokens: int
    on_event: Callable[[Event], None]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    # Kept by the batcher.
    tokens: list[int] = dataclasses.field(default_factory=list)   # generated, eos included
    text: str = ""                    # what has been sent
    finish_reason: str | None = None
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class ServerCounters:
    """What /metrics reports besides the engine's own counters."""
    requests: collections.Counter = dataclasses.field(default_factory=collections.Counter)   # by finish reason
    rejected: int = 0                 # queue full
    prompt_tokens: int = 0
    generated_tokens: int = 0
    segments: int = 0
    busy_slot_steps: int = 0          # decode steps x live slots (batch occupancy = this / slot steps)
    slot_steps: int = 0
    hi_mass: float = 0.0              # routed mass served by HI experts, summed over boundaries
    routed_mass: float = 0.0
    recent: collections.deque = dataclasses.field(default_factory=collections.deque)   # (time, tokens)

    def add_segment(self, now: float, tokens: int) -> None:
        self.recent.append((now, tokens))
        self._forget(now)

    def tokens_per_s(self, now: float) -> float:
        self._forget(now)
        return sum(n for _, n in self.recent) / RATE_WINDOW_S

    def _forget(self, now: float) -> None:
        """Only the window is kept, whether or not /metrics is read."""
        while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()


class Batcher:
    """Serve Requests from `slots` batch slots over one Engine (whose settings.batch must be
    slots + 1). max_queue: requests waiting for a slot before submit refuses (QueueFullError)."""

    def __init__(self, engine: Engine, *, slots: int, max_queue: int = 64):
        s = engine.settings
        if s.batch != slots + 1:
            raise RuntimeConfigError(f"the engine must be sized for batch = slots + 1 = {slots + 1} (the slots and "
                                     f"the row a joining request is prefilled into), got batch={s.batch}")
        if engine.codec.tokenizer is None:
            raise RuntimeConfigError(f"{engine.checkpoint.path} has no tokenizer.json: the server takes text")
        self.engine, self.cfg, self.codec = engine, engine.config, engine.codec
        self.max_len, self.segment, self.max_queue = s.max_len, s.segment_len, max_queue
        self.eos = set(self.cfg.eos_token_ids)
        self._stop_ids = jnp.asarray(stop_ids(self.cfg, None))
        # Committed to the device from the start, as every jitted output is: an argument that changes
        # from uncommitted to committed would recompile what the warm-up compiled.
        device = jax.devices()[0] if engine.mesh is None else sharded.replicated_on(engine.mesh)
        self.slots = jax.device_put(init_slots(self.cfg, slots, s.max_len, engine.cache_dtype), device)
        self.running: list[Request | None] = [None] * slots
        self.queue: collections.deque[Request] = collections.deque()
        self._retire = np.zeros(slots, bool)
        self._cv = threading.Condition()
        self.params = engine.params()
        self.scores = jax.device_put(engine.scores, device)
        self._prefill_step = jax.jit(functools.partial(ema_update, alpha=engine.alpha))   # a prompt: one EMA step
        self.steps = 0                       # decode steps run (the engine's clock, from its steps_served)
        self.counters = ServerCounters()
        self.error: str | None = None        # set when the loop failed: every request then fails
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="dynaexq-batcher", daemon=True)

    # ---- the caller's side ----------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return len(self.running)

    def check(self, prompt: list[int], max_tokens: int) -> None:
        """A request's prompt and length, checked before it is queued (GenerationError,
        PromptTooLongError)."""
        if not prompt:
            raise GenerationError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise GenerationError(f"token ids outside the vocabulary [0, {self.cfg.vocab_size}): {bad[:5]}")
        if len(prompt) + max_tokens > self.max_len:
            raise PromptTooLongError(f"the prompt has {len(prompt)} tokens and max_tokens is {max_tokens}: "
                                     f"{len(prompt) + max_tokens} positions, but this server's context holds "
                                     f"max_len={self.max_len}")

    def start(self) -> Batcher:
        """Compile the segment, admission and the shortest prompts' prefill, then serve."""
        self._warm_up()
        self._thread.start()
        return self

    def submit(self, request: Request) -> None:
        self.check(request.prompt, request.max_tokens)
        with self._cv:
            if self._closing or self.error:
                raise ServerError("the server is shutting down" if self._closing
                                  else f"the server failed: {self.error}")
            if len(self.queue) >= self.max_queue:
                self.counters.rejected += 1
                raise QueueFullError(f"all {self.num_slots} slots are busy and {len(self.queue)} requests wait "
                                     f"(--max-queue {self.max_queue}): try again later")
            self.queue.append(request)
            self._cv.notify()

    def cancel(self, request: Request) -> None:
        """End a request (its client left or timed out): dropped from the queue, or its slot freed
        at the next boundary. No event is sent for it."""
        with self._cv:
            request.cancelled = True
            if request in self.queue:
                self.queue.remove(request)

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join()
        self._fail_all("the server is shutting down")

    def stats(self) -> dict:
        """Live numbers for /metrics (read without stopping the loop)."""
        now = time.perf_counter()
        c = self.counters
        return dict(queue_depth=len(self.queue), running=sum(r is not None for r in self.running),
                    slots=self.num_slots, tokens_per_s=c.tokens_per_s(now),
                    occupancy=c.busy_slot_steps / c.slot_steps if c.slot_steps else 0.0,
                    hi_hit_rate=c.hi_mass / c.routed_mass if c.routed_mass else float("nan"))

    # ---- the loop ---------------------------------------------------------------------------------
    def _warm_up(self):
        """Compile what serving runs, on rows that serve nothing: the prefill of every prompt chunk
        shape (serving.slots.prefill_len), a segment over free slots (no live row: the hotness and the
        lengths stay), an admission into slot 0, then its retirement. Nothing compiles later."""
        e, s = self.engine, self.engine.settings
        # Longer prompts run whole chunks, but for a last one cut by max_len: those are all the shapes.
        shapes = sorted({prefill_len(n, s.prefill_chunk, self.max_len)
                         for n in (*range(1, min(s.prefill_chunk, self.max_len) + 1), self.max_len)})
        for n in shapes:
            first, row, key, _ = prefill_request(self.params, self.cfg, [0] * n, self.max_len, e.cache_dtype, seed=0,
                                                 temperature=0.0, top_k=0, top_p=1.0, backend=s.backend,
                                                 chunk=s.prefill_chunk)
        self._prefill_step(self.scores, self.scores)
        self.slots = admit(self.slots, row, jnp.int32(0), first, jnp.int32(2), key, jnp.float32(0), jnp.int32(0),
                           jnp.float32(1))
        self.slots = retire(self.slots, np.ones(self.num_slots, bool))
        out = decode_slots(self.params, self.cfg, self.slots, self._stop_ids, self.scores, steps=self.segment,
                           alpha=e.alpha, backend=s.backend)
        self.slots = out[2]
        np.asarray(out[0])

    def _loop(self):
        try:
            pending = None
            while True:
                with self._cv:
                    while not (self._closing or pending or self.queue or any(self.running)):
                        self._cv.wait()
                    if self._closing:
                        return
                    joining = [self.queue.popleft() for _ in range(min(self.running.count(None), len(self.queue)))]
                if self._retire.any():   # a fresh array: the call may read it after it returns (zero-copy)
                    rows, self._retire = self._retire, np.zeros(self.num_slots, bool)
                    self.slots = retire(self.slots, rows)
                for r in joining:
                    self._admit(r)
                nxt = self._dispatch() if any(self.running) else None
                if pending is not None:
                    self._read(*pending, in_flight=nxt[0] if nxt else None)
                pending = nxt
        except Exception as e:   # a failed device call: no request can be served any more
            self.error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            self._fail_all(self.error)

    def _admit(self, r: Request):
        if r.cancelled:
            return
        e, s = self.engine, self.engine.settings
        first, row, key, mass = prefill_request(self.params, self.cfg, r.prompt, self.max_len, e.cache_dtype,
                                                seed=r.seed, temperature=r.temperature, top_k=r.top_k,
                                                top_p=r.top_p, backend=s.backend, chunk=s.prefill_chunk)
        if e.hotness_in_prefill:
            self.scores = self._prefill_step(self.scores, mass)
        token = int(first)    # the prefill has run: nothing published later can overtake it
        r.first_token_s = time.perf_counter() - r.submitted
        self.counters.prompt_tokens += len(r.prompt)
        if self._extend(r, [token]):
            return
        slot = self.running.index(None)
        self.slots = admit(self.slots, row, jnp.int32(slot), first, jnp.int32(r.max_tokens), key,
                           jnp.float32(r.temperature), jnp.int32(r.top_k), jnp.float32(r.top_p))
        self.running[slot] = r

    def _dispatch(self):
        e = self.engine
        toks, dones, self.slots, mass, self.scores = decode_slots(
            self.params, self.cfg, self.slots, self._stop_ids, self.scores, steps=self.segment, alpha=e.alpha,
            backend=e.settings.backend)
        return (toks, dones, mass, self.scores, self.slots), list(self.running)

    def _read(self, outputs, served: list[Request | None], *, in_flight):
        toks, dones, mass, scores, _ = outputs
        toks, dones = np.asarray(toks), np.asarray(dones)
        live = 0
        for i, r in enumerate(served):
            if r is None or r.finished:
                continue
            if r.cancelled:
                self._end(i, r, "cancelled")
                continue
            stopped = np.flatnonzero(dones[:, i])
            n = int(stopped[0]) + 1 if len(stopped) else self.segment
            live += n
            if self._extend(r, toks[:n, i].tolist()):
                self._free(i)
        c = self.counters
        c.segments += 1
        c.busy_slot_steps += live
        c.slot_steps += self.segment * self.num_slots
        c.generated_tokens += live
        c.add_segment(time.perf_counter(), live)
        self.steps += self.segment
        params = self.engine.after_segment(self.steps, np.asarray(mass), np.asarray(scores), in_flight)
        if params is not None:
            self.params = params
        for b in self.engine.take_boundaries():
            if b["routed_mass"] > 0:
                c.hi_mass += b["hit_rate"] * b["routed_mass"]
                c.routed_mass += b["routed_mass"]

    # ---- a request's text -------------------------------------------------------------------------
    def _extend(self, r: Request, new: list[int]) -> bool:
        """Add tokens to r, stream its new text, end it when it is done. Returns whether it ended."""
        reason = None
        for t in new:
            r.tokens.append(t)
            if t in self.eos:
                reason = "stop"
                break
            if len(r.tokens) >= r.max_tokens:
                reason = "length"
                break
        text = self.codec.decode([t for t in r.tokens if t not in self.eos])
        cut = min((i for i in (text.find(s) for s in r.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if reason is None:
            text = text[:len(text) - _unsettled(text, r.stop)]
        if len(text) > len(r.text) and text.startswith(r.text):
            _send(r, Event("text", text[len(r.text):]))
            r.text = text
        if reason is not None:
            r.finish_reason = reason
            self.counters.requests[reason] += 1
            _send(r, Event("done", finish_reason=reason))
        return reason is not None

    def _end(self, i: int, r: Request, reason: str):
        r.finish_reason = reason
        self.counters.requests[reason] += 1
        self._free(i)

    def _free(self, i: int):
        """Slot i's request has ended: its row stops at the next boundary (if it has not already)."""
        self.running[i] = None
        self._retire[i] = True

    def _fail_all(self, message: str):
        with self._cv:
            waiting = list(self.queue) + [r for r in self.running if r is not None]
            self.queue.clear()
            self.running = [None] * self.num_slots
        for r in waiting:
            if not r.finished:
                r.finish_reason = "error"
                _send(r, Event("error", message))


def _send(r: Request, event: Event):
    """A consumer that fails (e.g. its event loop has closed) ends its own request, not the loop."""
    try:
        r.on_event(event)
    except Exception:
        traceback.print_exc()
        r.cancelled = True


def _unsettled(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of text may still change: a trailing incomplete UTF-8
    character (decoded as U+FFFD), or the start of a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return max(n, hold)

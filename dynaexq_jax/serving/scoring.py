"""Teacher-forced scoring (perplexity) through the same runtime that serves: token streams run in
jitted chunks of `chunk` positions, each chunk being what `chunk` decode steps would route, with
the hotness EMA advanced once per position and the controller (e.g. the DynaExq engine) called
between chunks, so precision transitions happen live while the text is scored.

Long streams are cut into windows of `window` positions, each scored from an empty cache
(non-overlapping windows, the usual chunked-perplexity protocol); the hotness and the runtime's
state carry across windows."""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import GenerationError
from dynaexq_jax.model.config import ModelConfig
from dynaexq_jax.model.families import family
from dynaexq_jax.serving.generate import Controller
from dynaexq_jax.serving.hotness import ema_over_positions, position_mass


@functools.partial(jax.jit, static_argnames=("cfg", "backend", "alpha"), donate_argnames=("cache",))
def score_chunk(params, cfg: ModelConfig, cache, inputs, targets, valid, scores, *, backend: str, alpha: float):
    """inputs/targets int32 [B, C], valid bool [B, C] (False: padding, left out of the hotness) ->
    (nll f32 [B, C], greedy bool [B, C]: the target is the argmax, cache, mass f32 [C, L_moe, E],
    scores), the hotness EMA advanced once per position with a real row (hotness.py). The chunk's
    logits f32 [B, C, V] are its only vocabulary-sized buffer: nll = logsumexp - the target's
    logit, no log-softmax array."""
    logits, cache, info = family(cfg.model_type).forward(params, cfg, inputs, cache, backend=backend)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target
    greedy = jnp.argmax(logits, axis=-1) == targets
    mass = position_mass(info.ids, info.probs, cfg.num_experts, inputs.shape[1], valid)
    return nll, greedy, cache, mass, ema_over_positions(scores, mass, alpha, valid.any(0))


@dataclasses.dataclass
class ScoreResult:
    nll: np.ndarray          # f32 [B, N]: -log p(token t+1 | tokens <= t) of every position
    seconds: float
    runtime: dict | None = None
    greedy: np.ndarray | None = None   # bool [B, N]: token t+1 is the argmax of the logits at t

    @property
    def tokens_per_s(self) -> float:
        return self.nll.size / self.seconds if self.seconds > 0 else 0.0

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.mean()))


def score(params, cfg: ModelConfig, tokens, *, chunk: int, window: int, backend: str = "xla",
          cache_dtype=jnp.float32, controller: Controller | None = None, valid=None) -> ScoreResult:
    """Score token streams tokens int [B, N + 1] (N a multiple of chunk; window a multiple of
    chunk). valid: bool [B, N], default all: False marks padding positions (their nll is computed
    but their router traffic is left out of the hotness; a right-padded row's real positions do
    not depend on its padding). Pipelined like generation, with the same controller contract (generate.Controller):
    chunk 0 is read first (like a prefill), then chunk i+1 is dispatched before chunk i is read
    and reaches the hook as in flight, so the controller's work overlaps the device's."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise GenerationError(f"tokens must be [batch, length >= 2], got shape {tokens.shape}")
    if not (0 <= tokens.min() and tokens.max() < cfg.vocab_size):
        raise GenerationError(f"token ids outside the vocabulary [0, {cfg.vocab_size})")
    B, N = tokens.shape[0], tokens.shape[1] - 1
    valid = np.ones((B, N), bool) if valid is None else np.asarray(valid, bool)
    if valid.shape != (B, N):
        raise GenerationError(f"valid must be [batch, positions] = {(B, N)}, got shape {valid.shape}")
    if chunk < 1 or N % chunk or window % chunk or window < chunk:
        raise GenerationError(f"scoring needs positions ({N}) and window ({window}) to be multiples of the "
                              f"chunk ({chunk})")
    ctl = controller or Controller()
    fam = family(cfg.model_type)
    scores = jnp.asarray(ctl.initial_scores(len(cfg.moe_layers), cfg.num_experts), jnp.float32)
    starts = list(range(0, N, chunk))

    def dispatch(params, cache, i, scores):
        s = starts[i]
        if s % window == 0:
            cache = fam.init_cache(cfg, B, window, cache_dtype)
        return score_chunk(params, cfg, cache, jnp.asarray(tokens[:, s:s + chunk], jnp.int32),
                           jnp.asarray(tokens[:, s + 1:s + chunk + 1], jnp.int32), jnp.asarray(valid[:, s:s + chunk]),
                           scores, backend=backend, alpha=ctl.alpha)

    nlls, greedy = [], []
    t0 = time.perf_counter()
    pending = dispatch(params, None, 0, scores)
    for i in range(len(starts)):
        nll, hit, cache, mass, scores = pending
        pending = None
        if 0 < i < len(starts) - 1:
            pending = dispatch(params, cache, i + 1, scores)
        nlls.append(np.asarray(nll))
        greedy.append(np.asarray(hit))
        params = ctl.after_segment((i + 1) * chunk, np.asarray(mass), np.asarray(scores), pending) or params
        if i == 0 and len(starts) > 1:
            pending = dispatch(params, cache, 1, scores)
    return ScoreResult(np.concatenate(nlls, axis=1), time.perf_counter() - t0,
                       greedy=np.concatenate(greedy, axis=1))

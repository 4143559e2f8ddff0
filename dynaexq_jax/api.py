"""The Python entry point: `dynaexq_jax.load(path)` -> Model with .config, .logits, .generate."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import GenerationError
from dynaexq_jax.model.config import ModelConfig
from dynaexq_jax.model.families import family
from dynaexq_jax.model.moe import BACKENDS, sharded, single_tier
from dynaexq_jax.serving.checkpoint import Checkpoint, attach_experts, load_checkpoint
from dynaexq_jax.serving.generate import SEGMENT_LEN, GenerationResult, bucket, generate
from dynaexq_jax.serving.sampling import Sampling
from dynaexq_jax.serving.tokenizer import TextCodec


class Model:
    """A converted model with every expert resident in one tier (no budget; see Engine for the
    budgeted runtime). tier: "hi" or "lo"; devices: see load."""

    def __init__(self, ckpt: Checkpoint, *, tier: str = "hi", backend: str = "xla", devices=None):
        if tier not in ckpt.tiers:
            raise GenerationError(f"unknown tier '{tier}' (this checkpoint has {', '.join(ckpt.tiers)})")
        if backend not in BACKENDS:
            raise GenerationError(f"unknown backend '{backend}' (use one of {', '.join(BACKENDS)})")
        self.checkpoint = ckpt
        self.config: ModelConfig = ckpt.config
        self.backend = backend
        self.tier = tier
        pools = {l: single_tier(jax.tree.map(jnp.asarray, tiers[tier])) for l, tiers in ckpt.experts.items()}
        dense = jax.tree.map(jnp.asarray, ckpt.params)
        self.mesh = None if devices is None else sharded.expert_mesh(devices)
        if self.mesh is not None:     # expert parallel: each layer's experts split, the rest replicated
            pools = {l: sharded.split_pools(p, self.mesh) for l, p in pools.items()}
            dense = sharded.replicated(dense, self.mesh)
        self.params = attach_experts(dense, pools)
        self.codec = TextCodec(ckpt.path)
        self._family = family(self.config.model_type)
        self._forward = jax.jit(self._family.forward, static_argnames=("cfg", "backend"))

    def logits(self, token_ids) -> np.ndarray:
        """token_ids int [B, T] (or [T]) -> float32 logits [B, T, vocab] of a full forward."""
        ids = np.asarray(token_ids, np.int32)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise GenerationError(f"token_ids must be [B, T] with T >= 1, got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise GenerationError(f"token ids must be in [0, {self.config.vocab_size})")
        cache = self._family.init_cache(self.config, ids.shape[0], bucket(ids.shape[1], 64), self._cache_dtype)
        out, _, _ = self._forward(self.params, self.config, jnp.asarray(ids), cache, backend=self.backend)
        return np.asarray(out, np.float32)

    @property
    def _cache_dtype(self):
        return self.params.embed.dtype

    def generate(self, prompts, *, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] | None = None,
                 max_len: int | None = None, segment_len: int = SEGMENT_LEN, on_tokens=None) -> GenerationResult:
        """prompts: a string, a list of strings, or a list of token-id lists. The result has
        .tokens (per prompt), .texts (when a tokenizer is present) and .stats."""
        res = generate(self.params, self.config, self.codec.prompts(prompts), max_new_tokens=max_new_tokens,
                       sampling=Sampling(temperature, top_k, top_p), key=jax.random.PRNGKey(seed),
                       stop_tokens=stop_tokens, max_len=max_len, segment_len=segment_len,
                       backend=self.backend, cache_dtype=self._cache_dtype, on_tokens=on_tokens)
        res.texts = self.codec.texts(res.tokens)
        return res


def load(path, *, tier: str = "hi", backend: str = "xla", devices=None) -> Model:
    """Load a converted checkpoint (see `dynaexq convert`): its dense params and one expert tier
    (the other tier's files are never read). devices: a count or a list of devices to split every
    layer's experts across (expert parallel, model.moe.sharded; the rest replicated), None: one."""
    return Model(load_checkpoint(path), tier=tier, backend=backend, devices=devices)

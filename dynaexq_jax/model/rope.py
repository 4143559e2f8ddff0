"""Rotary position embeddings: the frequency table of every rope_type the supported families use,
computed as transformers computes it (modeling_rope_utils), and the rotate-half rotation.

A config's scaling parameters live in ModelConfig.rope_scaling as sorted (key, value) items (hashable,
so the table is built once per config and dimension and folded into the compiled program).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from dynaexq_jax.errors import ConfigError, UnsupportedArchitectureError

ROPE_TYPES = ("default", "linear", "yarn", "longrope", "llama3")
# Keys of rope_parameters that are not scaling parameters (read into ModelConfig's own fields).
_NOT_SCALING = ("rope_theta", "partial_rotary_factor", "type", "rope_type")


def scaling_items(d: dict) -> tuple[tuple[str, object], ...]:
    """config.json's rope_scaling and rope_parameters (transformers 4 and 5 spellings, merged) ->
    sorted hashable items: ("rope_type", t) plus that type's parameters; () for plain RoPE."""
    params = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"rope type '{rope_type}' is not supported (supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return ()
    items = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k not in _NOT_SCALING}
    return (("rope_type", rope_type),) + tuple(sorted(items.items()))


@dataclasses.dataclass(frozen=True)
class RopeTable:
    """inv_freq [dim/2] f32; long_inv_freq: longrope's table for calls that reach past
    original_max (None otherwise); attention_factor scales cos and sin."""
    inv_freq: np.ndarray
    attention_factor: float = 1.0
    long_inv_freq: np.ndarray | None = None
    original_max: int = 0


@functools.lru_cache(maxsize=64)
def rope_table(scaling: tuple, theta: float, dim: int, max_position_embeddings: int) -> RopeTable:
    """The table for rotary dimension `dim` (even) under `scaling` (scaling_items)."""
    p = dict(scaling)
    rope_type = p.get("rope_type", "default")
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    base = theta ** exponents                                              # [dim/2]
    inv_freq = (1.0 / base).astype(np.float32)

    def need(key):
        if p.get(key) is None:
            raise ConfigError(f"rope type '{rope_type}' needs rope_scaling.{key}")
        return p[key]

    if rope_type == "default":
        return RopeTable(inv_freq)
    if rope_type == "linear":
        return RopeTable((inv_freq / float(need("factor"))).astype(np.float32))
    if rope_type == "llama3":
        factor, low, high = float(need("factor")), float(need("low_freq_factor")), float(need("high_freq_factor"))
        old = float(need("original_max_position_embeddings"))
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return RopeTable(np.where(medium, smoothed, scaled).astype(np.float32))
    original = int(need("original_max_position_embeddings"))
    factor = p.get("factor")
    if factor is None:
        factor = max_position_embeddings / original
    factor = float(factor)
    attention_factor = p.get("attention_factor")
    if rope_type == "longrope":
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        short, long = (np.asarray(need(k), np.float32) for k in ("short_factor", "long_factor"))
        for name, f in (("short_factor", short), ("long_factor", long)):
            if f.shape != (dim // 2,):
                raise ConfigError(f"rope_scaling.{name} has {f.size} entries for rotary dimension {dim} "
                                  f"(needs {dim // 2})")
        return RopeTable((1.0 / (short * base)).astype(np.float32), float(attention_factor),
                         (1.0 / (long * base)).astype(np.float32), original)
    # yarn
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if attention_factor is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    interpolated = 1.0 / (factor * base)
    inv = interpolated * (1 - extrapolation) + (1.0 / base) * extrapolation
    return RopeTable(inv.astype(np.float32), float(attention_factor))


def rope(x, positions, table: RopeTable):
    """HF rotate-half RoPE on the first len(table.inv_freq) * 2 features of each head (the rest
    unchanged). x: [B, T, n, hd], positions: int32 [B, T]. A longrope table switches to its long
    frequencies when the call reaches past original_max, as transformers decides per forward call."""
    inv_freq = jnp.asarray(table.inv_freq)
    if table.long_inv_freq is not None:
        inv_freq = jnp.where(positions.max() + 1 > table.original_max, jnp.asarray(table.long_inv_freq), inv_freq)
    rd = 2 * inv_freq.shape[0]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq           # [B, T, rd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos = (jnp.cos(emb) * table.attention_factor).astype(x.dtype)
    sin = (jnp.sin(emb) * table.attention_factor).astype(x.dtype)
    xr, rest = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
    out = xr * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return out if rest.shape[-1] == 0 else jnp.concatenate([out, rest], axis=-1)


def config_table(cfg, dim: int | None = None) -> RopeTable:
    """The table of a ModelConfig for rotary dimension dim (default cfg.rotary_dim)."""
    return rope_table(cfg.rope_scaling, cfg.rope_theta, cfg.rotary_dim if dim is None else dim,
                      cfg.max_position_embeddings)



def rope_interleaved(x, positions, table: RopeTable):
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ... of each head, pair j rotated by frequency j,
    as DeepSeek lays its rotary features out (transformers' apply_rotary_pos_emb_interleave; the
    complex product of DeepSeek-V2's apply_rotary_emb is the same rotation). The result comes out
    de-interleaved, [rotated evens | rotated odds], as V3's does; V2's stays interleaved, a fixed
    permutation of the features that queries and keys share, so their dot products are the same.
    x: [B, T, n, d] with d = 2 * len(table.inv_freq); positions: int32 [B, T]."""
    inv_freq = jnp.asarray(table.inv_freq)
    if table.long_inv_freq is not None:
        inv_freq = jnp.where(positions.max() + 1 > table.original_max, jnp.asarray(table.long_inv_freq), inv_freq)
    freqs = (positions.astype(jnp.float32)[..., None] * inv_freq)[:, :, None, :]   # [B, T, 1, d/2]
    cos = (jnp.cos(freqs) * table.attention_factor).astype(x.dtype)
    sin = (jnp.sin(freqs) * table.attention_factor).astype(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

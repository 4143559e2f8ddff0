"""Model families. Each family module provides the same functional surface:

    init_cache(cfg, batch, max_len, dtype) -> cache (a pytree with .lengths int32 [B])
    forward(params, cfg, tokens [B, T], cache, *, backend, logits_at=None, valid=None)
        -> (logits, new cache, RouterInfo)

so that generation and the runtime are written once for every family."""
from __future__ import annotations

import importlib
from types import ModuleType

from dynaexq_jax.errors import UnsupportedArchitectureError

_FAMILIES = {"qwen3_moe": "dynaexq_jax.model.families.qwen3_moe", "qwen3_next": "dynaexq_jax.model.families.qwen3_next"}


def family(model_type: str) -> ModuleType:
    if model_type not in _FAMILIES:
        raise UnsupportedArchitectureError(
            f"model_type '{model_type}' is not supported (supported: {', '.join(_FAMILIES)})")
    return importlib.import_module(_FAMILIES[model_type])

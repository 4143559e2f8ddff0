"""Model families, registered in FAMILIES (the one registry: config parsing, conversion, restore,
init and export all look a family up here). Each family module provides the same surface:

    HF_DEFAULTS   config.json keys whose HF config-class default differs from config.py's generic one
    MIXERS        the token mixers its layers may use (cfg.layer_types values); (FULL_ATTENTION,)
                  for a model without layer_types
    SKIPPED       ((regex, reason), ...): HF tensors the converter drops on purpose
    abstract(cfg) -> Params with schema leaves (schema.py): names, shapes, transforms, init kinds
    init_cache(cfg, batch, max_len, dtype) -> cache (a pytree with .lengths int32 [B])
    forward(params, cfg, tokens [B, T], cache, *, backend, logits_at=None, valid=None)
        -> (logits, new cache, RouterInfo)

so that generation and the runtime are written once for every family. Adding a family is one
module plus one line below."""
from __future__ import annotations

import importlib
from types import ModuleType

from dynaexq_jax.errors import UnsupportedArchitectureError

FAMILIES = {
    "qwen3_moe": "dynaexq_jax.model.families.qwen3_moe",
    "qwen3_next": "dynaexq_jax.model.families.qwen3_next",
}


def family(model_type: str) -> ModuleType:
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"model_type '{model_type}' is not supported (supported: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[model_type])

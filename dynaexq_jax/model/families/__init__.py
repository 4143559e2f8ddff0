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

and, where the family needs them:

    Config        a ModelConfig subclass with the family's own fields (each with a default)
    config_fields(d) -> dict of those fields, from the HF config dict d (HF_DEFAULTS merged in).
                  d is parse_hf_config's own copy, read for the generic fields after this call:
                  a family that spells a generic key its own way sets it in d (Mixtral's experts
                  are intermediate_size wide: d["moe_intermediate_size"] = d["intermediate_size"])
    validate(cfg) raising ConfigError / UnsupportedArchitectureError for what it cannot serve
    attention_workspace_bytes(...)  its attention's transients, for the budget (runtime/budget.py)
    HF_RENAMES    other spellings of its HF tensor names that the converter accepts
    SOURCE_QUANTIZATION  the quantization_config.quant_method values of pre-quantized checkpoints
                  its converter reads (gpt-oss: mxfp4); others are refused at conversion

so that generation and the runtime are written once for every family. Adding a family is one
module plus one line below."""
from __future__ import annotations

import importlib
from types import ModuleType

from dynaexq_jax.errors import UnsupportedArchitectureError

FAMILIES = {
    "qwen3_moe": "dynaexq_jax.model.families.qwen3_moe",
    "qwen3_next": "dynaexq_jax.model.families.qwen3_next",
    "deepseek_v2": "dynaexq_jax.model.families.deepseek_v2",
    "deepseek_v3": "dynaexq_jax.model.families.deepseek_v3",
    "phimoe": "dynaexq_jax.model.families.phimoe",
    "mixtral": "dynaexq_jax.model.families.mixtral",
    "olmoe": "dynaexq_jax.model.families.olmoe",
    "qwen2_moe": "dynaexq_jax.model.families.qwen2_moe",
    "gpt_oss": "dynaexq_jax.model.families.gpt_oss",
}


def family(model_type: str) -> ModuleType:
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"model_type '{model_type}' is not supported (supported: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[model_type])

"""Model configuration, read from a Hugging Face config.json as a plain dict.

Both transformers-4 and transformers-5 spellings are accepted (rope_theta vs rope_parameters,
num_experts vs num_local_experts). One ModelConfig serves every family; the hybrid-architecture
fields (layer_types, linear_*, shared expert, partial rotary) keep neutral defaults elsewhere.
Which model types exist, and their HF-side defaults, is the family registry's (model/families).
A family with options of its own (MLA ranks, routing variants, ...) subclasses ModelConfig as its
`Config` and reads them in its `config_fields(d)`; from_dict and parse_hf_config build that class."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dynaexq_jax.errors import ConfigError, UnsupportedArchitectureError, read_json_object
from dynaexq_jax.model import rope
from dynaexq_jax.model.families import family

FULL_ATTENTION, LINEAR_ATTENTION = "full_attention", "linear_attention"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int          # dense MLP layers
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    moe_layers: tuple[int, ...]     # indices of layers with a routed-expert MLP
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Hybrid models (qwen3_next): each layer's token mixer; () means full attention everywhere.
    layer_types: tuple[str, ...] = ()
    partial_rotary_factor: float = 1.0       # RoPE on the first int(head_dim * factor) features
    shared_expert_intermediate_size: int = 0  # > 0: every MoE layer also has a gated shared expert
    linear_conv_kernel_dim: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    rope_scaling: tuple = ()                  # rope.scaling_items: () for plain RoPE
    sliding_window: int | None = None         # sliding-window attention layers see this many positions

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_layers(self) -> tuple[int, ...]:
        """Indices of the Gated DeltaNet (linear attention) layers."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == LINEAR_ATTENTION)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.linear_layers)

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.moe_layers)

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Our own serialised form (to_dict), as stored in a converted checkpoint's metadata; JSON
        lists come back as the tuples they were. Builds the family's own Config class."""
        def frozen(v):
            return tuple(frozen(x) for x in v) if isinstance(v, (list, tuple)) else v
        config_cls = getattr(family(d["model_type"]), "Config", ModelConfig)
        return config_cls(**{k: frozen(v) for k, v in d.items()})


def _get(d: dict, *names: str, default: Any = ConfigError) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    if default is ConfigError:
        raise ConfigError(f"config.json has no '{names[0]}'" + (f" (nor {', '.join(names[1:])})" if names[1:] else ""))
    return default


def _rope_params(d: dict) -> dict:
    return {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}


def _rope_theta(d: dict) -> float:
    theta = _rope_params(d).get("rope_theta", d.get("rope_theta"))
    if theta is None:
        raise ConfigError("config.json has no 'rope_theta' (nor rope_parameters.rope_theta)")
    return float(theta)


def _layer_types(d: dict, mixers: tuple[str, ...], num_layers: int) -> tuple[str, ...]:
    """Hybrid families (mixers beyond full attention): explicit layer_types, else every
    full_attention_interval-th layer is full attention; () for the others."""
    if mixers == (FULL_ATTENTION,):
        return ()
    types = d.get("layer_types")
    if types is None:
        interval = int(_get(d, "full_attention_interval"))
        if interval < 1:
            raise ConfigError(f"full_attention_interval={interval} must be >= 1")
        types = [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(num_layers)]
    types = tuple(types)
    if len(types) != num_layers:
        raise ConfigError(f"layer_types has {len(types)} entries for num_hidden_layers={num_layers}")
    bad = sorted(set(types) - set(mixers))
    if bad:
        raise UnsupportedArchitectureError(f"layer type(s) {bad} are not supported (only {', '.join(mixers)})")
    return types


def parse_hf_config(d: dict[str, Any]) -> ModelConfig:
    """Turn a Hugging Face config dict into a ModelConfig, or raise a typed error naming the problem."""
    model_type = d.get("model_type")
    fam = family(model_type)
    d = {**fam.HF_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    if d.get("use_sliding_window"):
        raise UnsupportedArchitectureError("use_sliding_window=true is not supported")
    config_cls = getattr(fam, "Config", ModelConfig)
    # The family's own fields; it may also set the generic keys it spells its own way in d.
    extra = fam.config_fields(d) if hasattr(fam, "config_fields") else {}
    hidden = int(_get(d, "hidden_size"))
    heads = int(_get(d, "num_attention_heads"))
    num_layers = int(_get(d, "num_hidden_layers"))
    num_experts = int(_get(d, "num_experts", "num_local_experts", default=0))
    step = int(_get(d, "decoder_sparse_step", default=1))
    mlp_only = set(int(i) for i in (d.get("mlp_only_layers") or []))
    moe_layers = tuple(i for i in range(num_layers)
                       if i not in mlp_only and num_experts > 0 and (i + 1) % step == 0)
    eos = d.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
    cfg = config_cls(
        model_type=model_type,
        vocab_size=int(_get(d, "vocab_size")),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(_get(d, "num_key_value_heads", default=heads)),
        head_dim=int(_get(d, "head_dim", default=hidden // heads)),
        intermediate_size=int(_get(d, "intermediate_size", default=0)),
        moe_intermediate_size=int(_get(d, "moe_intermediate_size", default=0)),
        num_experts=num_experts,
        num_experts_per_tok=int(_get(d, "num_experts_per_tok", default=0)),
        norm_topk_prob=bool(_get(d, "norm_topk_prob", default=False)),
        moe_layers=moe_layers,
        rms_norm_eps=float(_get(d, "rms_norm_eps", default=1e-6)),
        rope_theta=_rope_theta(d),
        attention_bias=bool(_get(d, "attention_bias", default=False)),
        tie_word_embeddings=bool(_get(d, "tie_word_embeddings", default=False)),
        max_position_embeddings=int(_get(d, "max_position_embeddings", default=32768)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
        layer_types=_layer_types(d, fam.MIXERS, num_layers),
        partial_rotary_factor=float(_get(_rope_params(d), "partial_rotary_factor",
                                         default=_get(d, "partial_rotary_factor", default=1.0))),
        shared_expert_intermediate_size=int(_get(d, "shared_expert_intermediate_size", default=0)),
        linear_conv_kernel_dim=int(_get(d, "linear_conv_kernel_dim", default=0)),
        linear_key_head_dim=int(_get(d, "linear_key_head_dim", default=0)),
        linear_value_head_dim=int(_get(d, "linear_value_head_dim", default=0)),
        linear_num_key_heads=int(_get(d, "linear_num_key_heads", default=0)),
        linear_num_value_heads=int(_get(d, "linear_num_value_heads", default=0)),
        rope_scaling=rope.scaling_items(d),
        **extra,
    )
    _validate(cfg)
    if hasattr(fam, "validate"):
        fam.validate(cfg)
    return cfg


def _validate(c: ModelConfig) -> None:
    if c.num_heads % c.num_kv_heads:
        raise ConfigError(
            f"num_attention_heads={c.num_heads} is not a multiple of num_key_value_heads={c.num_kv_heads}")
    if c.moe_layers and not (0 < c.num_experts_per_tok <= c.num_experts):
        raise ConfigError(f"num_experts_per_tok={c.num_experts_per_tok} must be in 1..num_experts={c.num_experts}")
    if c.moe_layers and c.moe_intermediate_size <= 0:
        raise ConfigError("moe_intermediate_size must be positive for a model with expert layers")
    if c.dense_layers and c.intermediate_size <= 0:
        raise ConfigError("intermediate_size must be positive for a model with dense MLP layers")
    if c.head_dim % 2:
        raise ConfigError(f"head_dim={c.head_dim} must be even for rotary embeddings")
    if not (0 < c.rotary_dim <= c.head_dim) or c.rotary_dim % 2:
        raise ConfigError(f"partial_rotary_factor={c.partial_rotary_factor} gives rotary dimension {c.rotary_dim}: "
                          f"it must be even and in 2..head_dim={c.head_dim}")
    if c.linear_layers:
        dims = dict(linear_conv_kernel_dim=c.linear_conv_kernel_dim, linear_key_head_dim=c.linear_key_head_dim,
                    linear_value_head_dim=c.linear_value_head_dim, linear_num_key_heads=c.linear_num_key_heads,
                    linear_num_value_heads=c.linear_num_value_heads)
        for name, v in dims.items():
            if v <= 0:
                raise ConfigError(f"{name}={v} must be positive for a model with linear-attention layers")
        if c.linear_num_value_heads % c.linear_num_key_heads:
            raise ConfigError(f"linear_num_value_heads={c.linear_num_value_heads} is not a multiple of "
                              f"linear_num_key_heads={c.linear_num_key_heads}")


def read_hf_config(path: str | Path) -> dict:
    """The config.json dict of a Hugging Face model directory (or of that file itself)."""
    path = Path(path)
    f = path / "config.json" if path.is_dir() else path
    if not f.exists():
        raise ConfigError(f"{f}: no config.json")
    return read_json_object(f, ConfigError)


def load_hf_config(path: str | Path) -> ModelConfig:
    return parse_hf_config(read_hf_config(path))

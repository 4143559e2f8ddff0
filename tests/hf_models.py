"""Tiny random Hugging Face models saved to disk, for conversion and parity tests.

transformers 5 holds Qwen3-MoE experts fused in memory (gate_up_proj [E, 2I, H], down_proj
[E, H, I]) but save_pretrained writes them back per expert (mlp.experts.{e}.gate_proj.weight ...).
`layout` picks what ends up on disk, whatever the installed version writes: the saved shards
are rewritten when needed, keeping the sharding and the index consistent. Qwen3-Next stores its
experts the same way (checked with transformers 5.24: per expert on disk, fused in memory).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import safetensors.numpy as stn

TINY_QWEN3_MOE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, intermediate_size=96, max_position_embeddings=512)

_PER_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")
_FUSED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")


def make_tiny_qwen3_moe(tmp_dir, *, seed: int, norm_topk_prob: bool, mlp_only_layers=(), decoder_sparse_step: int = 1,
                        tie_word_embeddings: bool = False, max_shard_size=None, layout: str = "per_expert",
                        noise: bool = True, **config_overrides):
    """Build, perturb and save a tiny Qwen3MoeForCausalLM (float32, eval mode) in tmp_dir/"hf".
    Returns (hf_dir, hf_model)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout must be 'per_expert' or 'fused', not {layout!r}")
    kwargs = {**TINY_QWEN3_MOE, **config_overrides}
    cfg = Qwen3MoeConfig(norm_topk_prob=norm_topk_prob, mlp_only_layers=list(mlp_only_layers),
                         decoder_sparse_step=decoder_sparse_step, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)
    torch.manual_seed(seed)
    model = _perturbed(Qwen3MoeForCausalLM(cfg), noise)
    hf_dir = Path(tmp_dir) / "hf"
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(hf_dir, **save_kwargs)
    _set_layout(hf_dir, layout, kwargs["num_experts"])
    _write_tokenizer(hf_dir, kwargs["vocab_size"])
    return hf_dir, model


TINY_QWEN3_NEXT = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=48, intermediate_size=96,
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                       linear_value_head_dim=8, max_position_embeddings=512)


def make_tiny_qwen3_next(tmp_dir, *, seed: int, layout: str = "per_expert", mtp: bool = False,
                         max_shard_size=None, noise: bool = True, **config_overrides):
    """Build, perturb and save a tiny Qwen3NextForCausalLM (float32, eval mode) in tmp_dir/"hf".

    full_attention_interval=n is written to config.json as such (as the released checkpoints do),
    without layer_types; mtp=True adds multi-token-prediction tensors (`mtp.*`) like the released
    checkpoints carry. Returns (hf_dir, hf_model)."""
    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout must be 'per_expert' or 'fused', not {layout!r}")
    kwargs = {**TINY_QWEN3_NEXT, **config_overrides}
    cfg = Qwen3NextConfig(**kwargs)
    torch.manual_seed(seed)
    model = _perturbed(Qwen3NextForCausalLM(cfg), noise)
    hf_dir = Path(tmp_dir) / "hf"
    model.save_pretrained(hf_dir, **({"max_shard_size": max_shard_size} if max_shard_size is not None else {}))
    _set_layout(hf_dir, layout, kwargs["num_experts"])
    if "full_attention_interval" in config_overrides:
        d = json.loads((hf_dir / "config.json").read_text())
        del d["layer_types"]
        d["full_attention_interval"] = config_overrides["full_attention_interval"]
        (hf_dir / "config.json").write_text(json.dumps(d, indent=2))
    if mtp:
        H = kwargs["hidden_size"]
        rng = np.random.default_rng(seed)
        _add_tensors(hf_dir, {name: rng.standard_normal(shape).astype(np.float32) for name, shape in
                              [("mtp.fc.weight", (H, 2 * H)), ("mtp.norm.weight", (H,)),
                               ("mtp.pre_fc_norm_embedding.weight", (H,)), ("mtp.pre_fc_norm_hidden.weight", (H,)),
                               ("mtp.layers.0.input_layernorm.weight", (H,)),
                               ("mtp.layers.0.mlp.experts.0.gate_proj.weight", (kwargs["moe_intermediate_size"], H))]})
    _write_tokenizer(hf_dir, kwargs["vocab_size"])
    return hf_dir, model


def save_tiny(model_class, config_class, tmp_dir, *, seed: int, config: dict, layout: str,
              layouts=("per_expert", "fused"), max_shard_size=None, noise: bool = True):
    """Build a transformers model_class(config_class(**config)) (float32, eval mode, every parameter
    perturbed when noise) and save it in tmp_dir/"hf" with a tokenizer: per expert under the original
    names for layout "per_expert" (what save_pretrained writes), transformers 5's own fused in-memory
    layout otherwise (save_original_format=False; a caller renames it further for its other layouts).
    Returns (hf_dir, model)."""
    import torch
    if layout not in layouts:
        raise ValueError(f"layout must be one of {layouts}, not {layout!r}")
    torch.manual_seed(seed)
    model = _perturbed(model_class(config_class(**config)), noise)
    hf_dir = Path(tmp_dir) / "hf"
    model.save_pretrained(hf_dir, save_original_format=layout == "per_expert",
                          **({"max_shard_size": max_shard_size} if max_shard_size is not None else {}))
    _write_tokenizer(hf_dir, config["vocab_size"])
    return hf_dir, model


def _add_tensors(hf_dir: Path, extra: dict[str, np.ndarray]) -> None:
    """Append tensors to the last shard, keeping the index consistent."""
    shard = _shards(hf_dir)[-1]
    stn.save_file({**stn.load_file(shard), **extra}, shard, metadata={"format": "pt"})
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        d = json.loads(index.read_text())
        d["weight_map"] = dict(sorted({**d["weight_map"], **dict.fromkeys(extra, shard.name)}.items()))
        index.write_text(json.dumps(d, indent=2))


def _perturbed(model, noise: bool):
    """float32, eval mode, every parameter perturbed (when noise): initialisation leaves norms at
    1 or 0, biases at 0, dt_bias at 1, so a swapped, untransposed or mis-split tensor could
    otherwise go unnoticed."""
    import torch
    model = model.float()
    if noise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _write_tokenizer(hf_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size - 1)} | {"<unk>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf_dir / "tokenizer.json"))


def _shards(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        return [hf_dir / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    return [hf_dir / "model.safetensors"]


def _set_layout(hf_dir: Path, layout: str, num_experts: int) -> None:
    """Rewrite the saved expert tensors into `layout`; each new tensor goes to the shard that held
    the first of the tensors it replaces."""
    shards = _shards(hf_dir)
    contents = {s.name: stn.load_file(s) for s in shards}
    wrong = _FUSED if layout == "per_expert" else _PER_EXPERT
    if not any(wrong.fullmatch(n) for t in contents.values() for n in t):
        return
    for shard, tensors in contents.items():
        for name in list(tensors):
            m = wrong.fullmatch(name)
            if m is None:
                continue
            if layout == "fused":
                _fuse(contents, shard, m.group(1), num_experts)
            else:
                _split(contents, m.group(1), m.group(2), tensors.pop(name), shard)
    weight_map = {}
    for shard, tensors in contents.items():
        if not tensors:  # every tensor of this shard moved into a fused one elsewhere
            (hf_dir / shard).unlink()
            continue
        stn.save_file(tensors, hf_dir / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        d = json.loads(index.read_text())
        d["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(d, indent=2))


def _fuse(contents: dict, shard: str, prefix: str, num_experts: int) -> None:
    """Pop every per-expert tensor of one layer (from any shard) and store the fused pair in shard."""
    def pop(e, proj):
        name = f"{prefix}.{e}.{proj}_proj.weight"
        return next(t.pop(name) for t in contents.values() if name in t)
    if not any(f"{prefix}.0.gate_proj.weight" in t for t in contents.values()):
        return  # this layer was already fused via an earlier tensor of it
    gate = [pop(e, "gate") for e in range(num_experts)]
    up = [pop(e, "up") for e in range(num_experts)]
    down = [pop(e, "down") for e in range(num_experts)]
    contents[shard][f"{prefix}.gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(gate, up)])
    contents[shard][f"{prefix}.down_proj"] = np.stack(down)


def _split(contents: dict, prefix: str, kind: str, w: np.ndarray, shard: str) -> None:
    if kind == "down_proj":
        parts = {"down": w}
    else:
        half = w.shape[1] // 2
        parts = {"gate": w[:, :half], "up": w[:, half:]}
    for proj, stack in parts.items():
        for e in range(stack.shape[0]):
            contents[shard][f"{prefix}.{e}.{proj}_proj.weight"] = np.ascontiguousarray(stack[e])

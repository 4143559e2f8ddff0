"""Tiny random gpt-oss models (transformers.GptOssForCausalLM) saved to disk, for parity tests.

transformers 5 saves gpt-oss's experts as it holds them: fused, input-major, gate and up
interleaved (`mlp.experts.gate_up_proj` [E, H, 2I], `down_proj` [E, I, H], their biases).
`mxfp4=True` writes them instead as the released checkpoints do: `*_blocks` uint8 [E, N, K/32, 16]
and `*_scales` uint8 (e8m0) [E, N, K/32] from random codes, and the model in memory gets exactly
the weights transformers' own MXFP4 dequantization (integrations/mxfp4.py) makes of them, so it
is the reference for what our converter reads.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.numpy as stn

from tests.hf_models import _perturbed, _write_tokenizer

TINY_GPT_OSS = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                    intermediate_size=32, sliding_window=4, max_position_embeddings=512)


def random_mxfp4(rng, shape_out_in: tuple[int, int, int], scale_exp=(-6, -3)):
    """Random MXFP4 tensors of a stack [E, N, K]: (blocks uint8 [E, N, K/32, 16], scales uint8 [E, N, K/32])."""
    E, N, K = shape_out_in
    blocks = rng.integers(0, 256, (E, N, K // 32, 16), dtype=np.uint8)
    scales = (127 + rng.integers(scale_exp[0], scale_exp[1] + 1, (E, N, K // 32))).astype(np.uint8)
    return blocks, scales


def hf_dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' own MXFP4 dequantization -> f32 [E, K, N] (its input-major experts)."""
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    return convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32).numpy()


def make_tiny_gpt_oss(tmp_dir, *, seed: int, mxfp4: bool = False, noise: bool = True, **config_overrides):
    """Build, perturb and save a tiny GptOssForCausalLM (float32, eval mode) in tmp_dir/"hf".
    Returns (hf_dir, hf_model)."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    kwargs = {**TINY_GPT_OSS, **config_overrides}
    cfg = GptOssConfig(**kwargs)
    torch.manual_seed(seed)
    model = _perturbed(GptOssForCausalLM(cfg), noise)
    hf_dir = Path(tmp_dir) / "hf"
    mx = {}
    if mxfp4:
        rng = np.random.default_rng(seed)
        E, H, I = kwargs["num_local_experts"], kwargs["hidden_size"], kwargs["intermediate_size"]
        for i, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{i}.mlp.experts."
            for name, shape in (("gate_up_proj", (E, 2 * I, H)), ("down_proj", (E, H, I))):
                blocks, scales = random_mxfp4(rng, shape)
                with torch.no_grad():
                    getattr(layer.mlp.experts, name).copy_(torch.from_numpy(hf_dequantize_mxfp4(blocks, scales)))
                mx[prefix + name] = (blocks, scales)
    model.save_pretrained(hf_dir)
    if mx:
        f = hf_dir / "model.safetensors"
        tensors = stn.load_file(f)
        for name, (blocks, scales) in mx.items():
            del tensors[name]
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        stn.save_file(tensors, f, metadata={"format": "pt"})
    _write_tokenizer(hf_dir, kwargs["vocab_size"])
    return hf_dir, model


def published_config(name: str) -> dict:
    """benchmarks/configs/<name>.json: a released checkpoint's config.json."""
    return json.loads((Path(__file__).parents[1] / "benchmarks" / "configs" / f"{name}.json").read_text())

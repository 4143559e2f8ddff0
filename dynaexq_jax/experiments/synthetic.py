"""Random Qwen3-MoE checkpoints in the Hugging Face format, written with numpy alone (no torch):
config.json, model.safetensors (or shards + index) in the per-expert layout, and a BPE
tokenizer.json trained on text that ships with Python. Used by the demo and the benchmarks
until a trained model exists; the weights are random, so generated text is gibberish."""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

BENCH_CONFIG = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4,
                    moe_intermediate_size=256, intermediate_size=1024)


def qwen3_moe_config(**overrides) -> dict:
    cfg = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=4096,
               hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               head_dim=64, intermediate_size=512, moe_intermediate_size=128, num_experts=16,
               num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
               rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=4096,
               attention_bias=False, tie_word_embeddings=False, hidden_act="silu",
               bos_token_id=None, eos_token_id=0, torch_dtype="float32")
    cfg.update(overrides)
    return cfg


def random_state_dict(cfg: dict, seed: int = 0, dtype=np.float32):
    """Yield (name, array) in HF naming and [out, in] layout, layer by layer."""
    rng = np.random.default_rng(seed)
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    nH, nKV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def w(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return (rng.standard_normal(shape, np.float32) * scale).astype(dtype)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n, np.float32)).astype(dtype)

    yield "model.embed_tokens.weight", w(V, H, scale=1.0)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", norm(H)
        yield p + "post_attention_layernorm.weight", norm(H)
        yield p + "self_attn.q_proj.weight", w(nH * hd, H)
        yield p + "self_attn.k_proj.weight", w(nKV * hd, H)
        yield p + "self_attn.v_proj.weight", w(nKV * hd, H)
        yield p + "self_attn.o_proj.weight", w(H, nH * hd)
        yield p + "self_attn.q_norm.weight", norm(hd)
        yield p + "self_attn.k_norm.weight", norm(hd)
        moe = (i not in cfg["mlp_only_layers"] and cfg["num_experts"] > 0
               and (i + 1) % cfg["decoder_sparse_step"] == 0)
        if moe:
            I = cfg["moe_intermediate_size"]
            yield p + "mlp.gate.weight", w(cfg["num_experts"], H)
            for e in range(cfg["num_experts"]):
                yield p + f"mlp.experts.{e}.gate_proj.weight", w(I, H)
                yield p + f"mlp.experts.{e}.up_proj.weight", w(I, H)
                yield p + f"mlp.experts.{e}.down_proj.weight", w(H, I)
        else:
            I = cfg["intermediate_size"]
            yield p + "mlp.gate_proj.weight", w(I, H)
            yield p + "mlp.up_proj.weight", w(I, H)
            yield p + "mlp.down_proj.weight", w(H, I)
    yield "model.norm.weight", norm(H)
    if not cfg["tie_word_embeddings"]:
        yield "lm_head.weight", w(V, H)


def save_safetensors(tensors, out: Path, shard_bytes: int | None = None) -> None:
    """(name, array) pairs -> out/model.safetensors, or shards of about shard_bytes plus
    model.safetensors.index.json (the Hugging Face layout) when they do not fit in one."""
    shards, cur, size = [], {}, 0
    for name, arr in tensors:
        if shard_bytes and cur and size + arr.nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = arr
        size += arr.nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for k, sh in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in sh})
        total += sum(a.nbytes for a in sh.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def write_random_qwen3_moe(out_dir, *, seed: int = 0, dtype: str = "float32", shard_bytes: int | None = None,
                           tokenizer: bool = True, **overrides) -> Path:
    """Write a random HF Qwen3-MoE checkpoint to out_dir; shards of about shard_bytes if given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = qwen3_moe_config(torch_dtype=dtype, **overrides)
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    save_safetensors(random_state_dict(cfg, seed, np_dtype), out, shard_bytes)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    if tokenizer:
        train_bpe_tokenizer(cfg["vocab_size"]).save(str(out / "tokenizer.json"))
    return out


def stdlib_text_files(limit: int | None = None) -> list[Path]:
    """A deterministic list of English prose + Python source files from the running Python."""
    import pydoc_data.topics
    import sysconfig
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [Path(pydoc_data.topics.__file__)] + sorted(stdlib.glob("*.py"))
    return files[:limit] if limit else files


def train_bpe_tokenizer(vocab_size: int, files: list[Path] | None = None, texts: list[str] | None = None):
    """A byte-level BPE tokenizer with exactly vocab_size ids; id 0 is <|endoftext|>. Trained on
    texts when given, else on files (default: a few standard-library files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    if texts is not None:
        tok.train_from_iterator(texts, trainer)
    else:
        tok.train([str(f) for f in files or stdlib_text_files(limit=40)], trainer)
    if tok.get_vocab_size() < vocab_size:   # small corpora can stop short: pad so ids match the model
        tok.add_special_tokens([f"<|unused_{i}|>" for i in range(vocab_size - tok.get_vocab_size())])
    return tok

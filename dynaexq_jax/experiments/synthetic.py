"""Random Hugging Face checkpoints of any registered family, written with numpy alone (no torch):
config.json, model.safetensors (or shards + index) in the experts' saved layout (per expert;
gpt-oss's fused one), with the tensor names and shapes of the family's schema, and a BPE
tokenizer.json trained on text that ships with Python. They serve the benchmarks and tests that
need a model of a given size (the default model, dynaexq_jax/assets/tiny-moe, is trained:
experiments/training.py); the weights are random, so generated text is gibberish."""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from dynaexq_jax.model.config import parse_hf_config
from dynaexq_jax.model.families import family, schema

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
    """Yield (name, array) for the HF config dict `cfg` of any registered family: its schema's
    HF names and shapes, in tree order (experts as transformers saves them). Projections N(0, 1/fan_in), the
    embedding N(0, 1), norms and offsets perturbed around their identity, so that a swapped or
    untransposed tensor changes the model."""
    rng = np.random.default_rng(seed)

    def w(shape, kind):
        noise = rng.standard_normal(shape, np.float32)
        if kind in ("weight", "residual"):
            noise *= shape[-1] ** -0.5          # HF layouts put the fan-in last
        elif kind == "log_decay":
            noise = np.log(rng.uniform(1, 16, shape)).astype(np.float32)
        elif kind != "embed":
            noise = {"norm": 1.0, "ones": 1.0}.get(kind, 0.0) + 0.1 * noise
        return noise.astype(dtype)

    for _, _, spec in schema.leaves(family(cfg["model_type"]).abstract(parse_hf_config(cfg))):
        if isinstance(spec, schema.Experts):
            for name, shape in spec.hf_shapes(spec.saved_layout).items():
                yield name, w(shape, "weight")
        else:
            yield spec.hf_name, w(spec.hf_shape, spec.init)


def save_safetensors(tensors, out: Path, shard_bytes: int | None = None) -> None:
    """(name, array) pairs -> out/model.safetensors, or shards of about shard_bytes plus
    model.safetensors.index.json (the Hugging Face layout) when they do not fit in one. Each
    shard is written as soon as it is full (its final name, which holds the shard count, is
    given at the end), so at most one shard is in memory: tensors may be a generator."""
    written, cur, size, total = [], {}, 0, 0      # written: (temporary path, tensor names) per shard

    def flush():
        path = out / f".shard-{len(written):05d}.tmp"
        save_file(cur, str(path), metadata={"format": "pt"})
        written.append((path, list(cur)))
    for name, arr in tensors:
        if shard_bytes and cur and size + arr.nbytes > shard_bytes:
            flush()
            cur, size = {}, 0
        cur[name] = arr
        size += arr.nbytes
        total += arr.nbytes
    if not written:
        save_file(cur, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    flush()
    weight_map = {}
    for k, (path, names) in enumerate(written):
        fname = f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(out / fname)
        weight_map.update({n: fname for n in names})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def write_random_checkpoint(out_dir, cfg: dict, *, seed: int = 0, shard_bytes: int | None = None,
                            tokenizer: bool = True) -> Path:
    """Write a random HF checkpoint of config dict cfg (any registered family; weights in
    cfg["torch_dtype"], default float32) to out_dir; shards of about shard_bytes if given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = cfg.get("torch_dtype") or "float32"
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    save_safetensors(random_state_dict(cfg, seed, np_dtype), out, shard_bytes)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    if tokenizer:
        train_bpe_tokenizer(cfg["vocab_size"]).save(str(out / "tokenizer.json"))
    return out


def write_random_qwen3_moe(out_dir, *, seed: int = 0, dtype: str = "float32", shard_bytes: int | None = None,
                           tokenizer: bool = True, **overrides) -> Path:
    """Write a random HF Qwen3-MoE checkpoint (qwen3_moe_config(**overrides)) to out_dir."""
    return write_random_checkpoint(out_dir, qwen3_moe_config(torch_dtype=dtype, **overrides), seed=seed,
                                   shard_bytes=shard_bytes, tokenizer=tokenizer)


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


def tokenizer_config(max_len: int) -> dict:
    """tokenizer_config.json for a train_bpe_tokenizer tokenizer: transformers' AutoTokenizer then
    loads tokenizer.json as it is (without it, the model type's tokenizer class would replace the
    pre-tokenizer with its own and split text differently from training)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "model_max_length": max_len, "clean_up_tokenization_spaces": False}

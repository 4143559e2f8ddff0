"""Training the project's own small Qwen3-MoE on the standard library's code and prose
(dynaexq_jax.experiments.corpus), and exporting it as a Hugging Face directory.

The model trained is the serving model itself: the loss runs the family's forward with every
expert in one float tier, so what is trained is exactly what the runtime later serves (after
conversion) and what transformers loads from the export. Expert weights are trained as plain
stacks and put into an ExpertPools inside the loss. Init and export both follow the family's
schema (model/families/schema.py), so they hold for every registered family.

Router balance: a small Switch-style auxiliary loss on the selected probability mass keeps experts
from collapsing without flattening the heavy tail the DynaExq method lives on.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from flax import struct

from dynaexq_jax.errors import ConfigError
from dynaexq_jax.experiments import corpus
from dynaexq_jax.experiments.synthetic import qwen3_moe_config, save_safetensors, tokenizer_config, train_bpe_tokenizer
from dynaexq_jax.model.config import ModelConfig, parse_hf_config
from dynaexq_jax.model.families import family, schema
from dynaexq_jax.model.layers import Params
from dynaexq_jax.model.moe import TierPool, single_tier
from dynaexq_jax.model.quant import QTensor, parse_format
from dynaexq_jax.serving.checkpoint import attach_experts

# The embedded default: 6 layers, 32 experts, top-4, experts 3 x 256 x 64 (so integer formats use
# groups of at most 64). About 11.7M parameters, 23 MB in bf16: under the 25 MB the repo allows.
TINY_MOE = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, moe_intermediate_size=64, num_experts=32,
                num_experts_per_tok=4, intermediate_size=512, tie_word_embeddings=True,
                max_position_embeddings=2048, torch_dtype="bfloat16")


# Exported weights are cut into shards of at most this size, so that no file the repo ships is large.
SHARD_BYTES = 12 * 2**20


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch: int = 16                 # sequences per step, half from each domain
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    aux_coef: float = 0.01
    eval_every: int = 200
    eval_tokens: int = 16384        # per domain, for the periodic validation
    seed: int = 0


@struct.dataclass
class Trainable:
    """What the optimizer updates: dense params (experts=None) and per MoE layer (gate, up, down)."""
    params: Params
    experts: dict[int, tuple[jax.Array, jax.Array, jax.Array]]


F32 = parse_format("f32")


def init_trainable(cfg: ModelConfig, seed: int) -> Trainable:
    """GPT-2-style init of every tensor the family's schema lists: weights N(0, 0.02), those that
    write into the residual stream scaled by 1/sqrt(2 L), norms at their identity, biases at 0."""
    rng = np.random.default_rng(seed)
    std = {"embed": 0.02, "weight": 0.02, "residual": 0.02 / math.sqrt(2 * cfg.num_layers)}
    constant = {"norm": 1.0, "norm_zc": 0.0, "bias": 0.0, "ones": 1.0}

    def init(shape, kind):
        if kind in std:
            return jnp.asarray(rng.standard_normal(shape, np.float32) * std[kind])
        if kind == "log_decay":
            return jnp.asarray(np.log(rng.uniform(1, 16, shape)).astype(np.float32))
        return jnp.full(shape, constant[kind], jnp.float32)

    tree = family(cfg.model_type).abstract(cfg)
    params = jax.tree.map(lambda s: None if isinstance(s, schema.Experts) else init(s.shape, s.init), tree)
    experts = {layer: tuple(init(shape, "residual" if proj == "down" else "weight")
                            for proj, shape in spec.shapes.items())
               for layer, _, spec in schema.leaves(tree) if isinstance(spec, schema.Experts)}
    return Trainable(params, experts)


def serving_params(t: Trainable) -> Params:
    """The trainable state as the params the model's forward takes (every expert in an f32 tier)."""
    pools = {i: single_tier(TierPool(QTensor(g, None, F32), QTensor(u, None, F32), QTensor(d, None, F32)))
             for i, (g, u, d) in t.experts.items()}
    return attach_experts(t.params, pools)


def loss_fn(t: Trainable, cfg: ModelConfig, tokens, aux_coef: float):
    """Next-token cross entropy over tokens [B, T+1] plus aux_coef x the balance loss."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    B, T = inputs.shape
    fam = family(cfg.model_type)
    logits, _, router = fam.forward(serving_params(t), cfg, inputs, fam.init_cache(cfg, B, T))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    E = cfg.num_experts
    aux = 0.0
    for ids, probs in zip(router.ids, router.probs):
        onehot = jax.nn.one_hot(ids, E, dtype=jnp.float32)                         # [B, T, k, E]
        share = jax.lax.stop_gradient(onehot.sum(2).mean((0, 1))) / cfg.num_experts_per_tok
        mass = (onehot * probs[..., None]).sum(2).mean((0, 1))
        aux = aux + E * jnp.sum(share * mass)
    aux = aux / max(len(router.ids), 1)
    return ce + aux_coef * aux, (ce, aux)


def token_streams(tokenizer, docs: list[corpus.Document], eos: int) -> dict[str, dict[str, np.ndarray]]:
    """domain -> split -> one uint16 stream of the documents' tokens, each followed by eos."""
    out = {d: {s: [] for s in corpus.SPLITS} for d in corpus.DOMAINS}
    encoded = tokenizer.encode_batch([d.text for d in docs])
    for doc, enc in zip(docs, encoded):
        out[doc.domain][doc.split].extend(enc.ids + [eos])
    return {d: {s: np.asarray(v, np.uint16) for s, v in splits.items()} for d, splits in out.items()}


def _batch(rng: np.random.Generator, streams: dict[str, np.ndarray], batch: int, seq_len: int) -> np.ndarray:
    rows = []
    for j in range(batch):
        s = streams[corpus.DOMAINS[j % len(corpus.DOMAINS)]]
        start = rng.integers(0, len(s) - seq_len - 1)
        rows.append(s[start: start + seq_len + 1])
    return np.stack(rows).astype(np.int32)


def eval_windows(stream: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    """Consecutive non-overlapping windows [n, seq_len + 1] covering up to max_tokens targets."""
    n = min((len(stream) - 1) // seq_len, max(1, max_tokens // seq_len))
    return np.stack([stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)]).astype(np.int32)


def train(out_dir: str | Path, tc: TrainConfig = TrainConfig(), model_overrides: dict | None = None,
          source_limit: int | None = None, log=print) -> dict:
    """Train and export to out_dir (config.json, safetensors shards + index, tokenizer.json and its config,
    training.json with the curves and corpus manifest). Returns the training record."""
    out = Path(out_dir)
    hf_cfg = qwen3_moe_config(**{**TINY_MOE, **(model_overrides or {})})
    cfg = parse_hf_config(hf_cfg)
    t0 = time.time()
    docs = corpus.documents(limit=source_limit)
    train_texts = [d.text for d in docs if d.split == "train"]
    tokenizer = train_bpe_tokenizer(cfg.vocab_size, texts=train_texts)
    streams = token_streams(tokenizer, docs, eos=0)
    log(f"corpus: {len(docs)} documents; tokens " + ", ".join(
        f"{d}/{s} {len(streams[d][s])}" for d in corpus.DOMAINS for s in corpus.SPLITS)
        + f" ({time.time() - t0:.0f} s)")

    for d in corpus.DOMAINS:
        for s in corpus.SPLITS:
            if len(streams[d][s]) < tc.seq_len + 2:
                raise ConfigError(f"corpus: the {d}/{s} split has {len(streams[d][s])} tokens, fewer than one "
                                  f"window of {tc.seq_len}: use more source files or a shorter --seq-len")
    state = init_trainable(cfg, tc.seed)
    sched = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, tc.steps, end_value=tc.lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=tc.weight_decay))
    opt_state = opt.init(state)

    @jax.jit
    def step(state, opt_state, tokens):
        (_, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state, cfg, tokens, tc.aux_coef)
        updates, opt_state = opt.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, ce, aux

    @jax.jit
    def eval_ce(state, tokens):
        return loss_fn(state, cfg, tokens, 0.0)[1][0]

    val = {d: eval_windows(streams[d]["validation"], tc.seq_len, tc.eval_tokens) for d in corpus.DOMAINS}
    train_streams = {d: streams[d]["train"] for d in corpus.DOMAINS}
    rng = np.random.default_rng(tc.seed)
    curve, evals = [], []
    t_start, tokens_seen = time.time(), 0
    for i in range(1, tc.steps + 1):
        state, opt_state, ce, aux = step(state, opt_state, _batch(rng, train_streams, tc.batch, tc.seq_len))
        tokens_seen += tc.batch * tc.seq_len
        if i % 25 == 0 or i in (1, tc.steps):
            ce, aux = float(ce), float(aux)
            curve.append({"step": i, "loss": ce, "aux": aux})
            el = time.time() - t_start
            log(f"step {i}/{tc.steps}  loss {ce:.3f}  aux {aux:.3f}  {tokens_seen / el:.0f} tok/s  "
                f"eta {el / i * (tc.steps - i) / 60:.1f} min")
        if i % tc.eval_every == 0 or i == tc.steps:
            ppl = {d: float(np.exp(np.mean([float(eval_ce(state, w[None])) for w in v]))) for d, v in val.items()}
            evals.append({"step": i, "ppl": ppl})
            log(f"step {i}: validation perplexity " + ", ".join(f"{d} {p:.2f}" for d, p in ppl.items()))

    record = {"train_config": dataclasses.asdict(tc), "model": hf_cfg, "curve": curve, "evals": evals,
              "train_seconds": time.time() - t_start, "tokens_seen": tokens_seen,
              "tokens": {d: {s: int(len(v)) for s, v in sp.items()} for d, sp in streams.items()},
              "corpus": corpus.manifest(docs), "jax": jax.__version__}
    export_hf(state, hf_cfg, cfg, tokenizer, out, record)
    log(f"exported to {out}")
    return record


def hf_state_dict(t: Trainable, cfg: ModelConfig, dtype=ml_dtypes.bfloat16) -> dict[str, np.ndarray]:
    """Our layout -> HF names and layout, by the family schema's inverse transforms (experts per
    expert, as transformers writes them)."""
    tree = family(cfg.model_type).abstract(cfg)
    sd = {}
    for (layer, _, spec), value in zip(schema.leaves(tree), schema.values(tree, t.params)):
        if isinstance(spec, schema.Experts):
            stacks = {proj: np.asarray(x, np.float32) for proj, x in zip(schema.PROJECTIONS, t.experts[layer])}
            sd.update((name, a.astype(dtype)) for name, a in spec.to_hf(stacks))
        else:
            sd[spec.hf_name] = spec.to_hf(np.asarray(value, np.float32)).astype(dtype)
    return sd


def export_hf(t: Trainable, hf_cfg: dict, cfg: ModelConfig, tokenizer, out: Path, record: dict) -> None:
    """Write the HF directory atomically (a temp dir renamed into place)."""
    import shutil

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(hf_state_dict(t, cfg).items(), tmp, SHARD_BYTES)
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=1))
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(hf_cfg["max_position_embeddings"]), indent=1)
                                               + "\n")
    (tmp / "training.json").write_text(json.dumps(record, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)

"""Fixtures shared by several test modules."""
import pytest

# A tiny Qwen3-MoE trained for a few steps on the real corpus: real (if weak) routing, minutes-free.
TINY_TRAINED = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                    torch_dtype="float32")


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """(HF directory, training record) of a tiny model trained 30 steps on 60 source files."""
    from dynaexq_jax.experiments.training import TrainConfig, train
    out = tmp_path_factory.mktemp("train") / "hf"
    tc = TrainConfig(steps=30, batch=4, seq_len=32, lr=1e-2, warmup=3, eval_every=30, eval_tokens=256)
    record = train(out, tc, model_overrides=TINY_TRAINED, source_limit=60, log=lambda *_: None)
    return out, record

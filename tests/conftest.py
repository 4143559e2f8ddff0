"""Fixtures shared by several test modules."""
import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """XLA's CPU JIT maps a few memory regions for every compiled program and keeps them while the
    program is cached; a whole run compiles thousands of programs, past the kernel's per-process
    map limit (vm.max_map_count, 65530), where LLVM fails ("Cannot allocate memory") or crashes.
    (One family's test module leaves about 8,500 maps.) No module reuses another's programs, so
    each module's are dropped after it."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_generate_tests(metafunc):
    """A family suite's class-scoped `case` fixture runs once per entry of its CASES (family_suite.py)."""
    cases = getattr(metafunc.cls, "CASES", None)
    if cases and "case" in metafunc.fixturenames:
        metafunc.parametrize("case", list(cases), scope="class")

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


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """The runtime tests' converted checkpoint (tests/tiny_runtime.py: TINY, int4 LO)."""
    from checkpoints_convert import convert
    from dynaexq_jax.experiments.synthetic import write_random_qwen3_moe
    from dynaexq_jax.serving.checkpoint import load_checkpoint
    from tests.tiny_runtime import TINY
    tmp = tmp_path_factory.mktemp("rt")
    hf = write_random_qwen3_moe(tmp / "hf", seed=1, tokenizer=False, **TINY)
    return load_checkpoint(convert(hf, tmp / "conv", lo="int4:g32", progress=False))

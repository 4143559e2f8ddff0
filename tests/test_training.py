"""The training corpus (stdlib code + prose) and the small-MoE trainer: splits are fixed by name,
code stays valid Python, training lowers the loss, and the exported Hugging Face directory is
what transformers loads, with logits equal to ours (directly and after conversion)."""
import ast
import json

import numpy as np
import pytest

from dynaexq_jax.errors import ConfigError
from dynaexq_jax.experiments import corpus
from tests.conftest import TINY_TRAINED as TINY


def test_splits_are_a_pure_function_of_the_document_name():
    names = [f"code:mod{i}.py" for i in range(2000)]
    splits = [corpus.split_of(n) for n in names]
    assert splits == [corpus.split_of(n) for n in reversed(names)][::-1]
    share = {s: splits.count(s) / len(splits) for s in corpus.SPLITS}
    assert 0.04 < share["validation"] < 0.09 and 0.04 < share["calibration"] < 0.09


def test_code_loses_its_docstrings_to_prose_and_still_parses():
    src = 'def f(x):\n    """Add one.\n\n    Long."""\n    return x + 1\n\n\nclass A:\n    """Only a docstring."""\n'
    code, docs = corpus._split_docstrings(src)
    ast.parse(code)
    assert "Add one" not in code and "Only a docstring" not in code and "return x + 1" in code
    assert docs == ["Add one.\n\nLong.", "Only a docstring."]


def test_documents_cover_both_domains_with_recorded_hashes():
    docs = corpus.documents(limit=40)
    assert {d.domain for d in docs} == set(corpus.DOMAINS)
    for d in docs:
        if d.domain == "code":
            ast.parse(d.text)
    m = corpus.manifest(docs)
    assert m == corpus.manifest(corpus.documents(limit=40))          # deterministic
    assert len(m["documents"]) == len(docs) and all(len(e["sha256"]) == 64 for e in m["documents"].values())


def test_training_lowers_the_loss_and_records_its_corpus(trained_tiny):
    out, record = trained_tiny
    losses = [c["loss"] for c in record["curve"]]
    assert record["curve"][0]["step"] == 1 and losses[0] > np.log(TINY["vocab_size"]) - 0.5
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(np.isfinite(e["ppl"][d]) for e in record["evals"] for d in corpus.DOMAINS)
    saved = json.loads((out / "training.json").read_text())
    assert saved["corpus"]["digest"] == record["corpus"]["digest"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json", "training.json"]


def test_export_loads_in_transformers_with_our_logits(trained_tiny, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import dynaexq_jax
    from checkpoints_convert import convert
    out, _ = trained_tiny
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    convert(out, tmp_path / "conv", hi="f32", lo="int4:g32", dtype="f32", progress=False)
    ours = dynaexq_jax.load(tmp_path / "conv")
    tokens = np.random.default_rng().integers(0, TINY["vocab_size"], (2, 24))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got = ours.logits(tokens)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
    # transformers' tokenizer splits text as the trained one does (tokenizer_config.json).
    text = "def f(x):\n\n    return x  + 1\r\n\n\tA docstring.\n"
    assert transformers.AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False) == \
        ours.codec.encode(text)


def test_a_corpus_too_small_for_a_window_is_a_clear_error(tmp_path):
    from dynaexq_jax.experiments.training import TrainConfig, train
    with pytest.raises(ConfigError, match="split has .* tokens"):
        train(tmp_path / "x", TrainConfig(steps=1, seq_len=4096), model_overrides=TINY, source_limit=15,
              log=lambda *_: None)
    assert not (tmp_path / "x").exists()

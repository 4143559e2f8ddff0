"""The embedded default model: within the repo's size limit, loadable by transformers, and our
converted model computes the same logits."""
import json

import numpy as np
import pytest

from dynaexq_jax.experiments import default_model


def test_default_model_is_small_and_documents_its_training():
    files = {p.name: p for p in default_model.HF_DIR.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "training.json"} <= set(files)
    assert sum(p.stat().st_size for p in files.values()) <= 25 * 2**20
    record = json.loads(files["training.json"].read_text())
    assert set(record["evals"][-1]["ppl"]) == {"prose", "code"}
    assert len(record["corpus"]["documents"]) > 1000 and len(record["corpus"]["digest"]) == 64


def test_transformers_loads_it_and_our_logits_match(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import dynaexq_jax
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(default_model.HF_DIR, dtype=torch.float32).eval()
    conv = default_model.converted_model(None, tmp_path / "conv", hi="source", lo="int4:g64", progress=False)
    ours = dynaexq_jax.load(conv)                       # HI tier: the bf16 weights, computed in f32
    text = "def read(path):\n    with open(path) as f:\n        return f.read()\n"
    ids = np.asarray([ours.codec.encode(text)])
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    got = ours.logits(ids)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
    # A trained model: it predicts its own domain far better than chance (ppl << vocab size).
    logp = got[0, :-1] - np.log(np.exp(got[0, :-1]).sum(-1, keepdims=True))
    assert np.exp(-logp[np.arange(ids.shape[1] - 1), ids[0, 1:]].mean()) < 200

"""The host store is the converted checkpoint: expert tiers are memory-mapped safetensors files,
read one slice at a time; `info` reads metadata only; host memory does not grow with the experts."""
from __future__ import annotations

import json
import mmap
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy as stn

import dynaexq_jax.runtime.pools as pools_mod
from checkpoints_convert import convert
from dynaexq_jax.experiments.synthetic import write_random_qwen3_moe
from dynaexq_jax.model.moe import HI, LO
from dynaexq_jax.runtime.pools import HostStore, tree_nbytes
from dynaexq_jax.serving.checkpoint import expert_file, load_checkpoint, read_info
from dynaexq_jax.serving.safetensors_io import DATA_ALIGN, FileWriter, MappedFile, read_header, release_pages

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_hidden_layers=3, hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
             vocab_size=256, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    hf = write_random_qwen3_moe(tmp / "hf", seed=1, tokenizer=False, **SMALL)
    return convert(hf, tmp / "conv", hi="bf16", lo="int4:g32", progress=False)


def mapped_file_of(a: np.ndarray):
    while isinstance(a, np.ndarray | memoryview):
        a = a.obj if isinstance(a, memoryview) else a.base
    return a


def test_tiers_are_read_only_views_of_safetensors_maps(converted):
    ckpt = load_checkpoint(converted)
    assert sorted(ckpt.experts) == [0, 1, 2]
    for layer, tiers in ckpt.experts.items():
        for tier, pool in tiers.items():
            f = converted / expert_file(layer, tier)
            on_disk = stn.load_file(f)           # the reference reader accepts the file
            assert sorted(on_disk) == sorted(f"{p}.{k}" for p in ("gate", "up", "down")
                                             for k in (("data", "scales") if tier == "lo" else ("data",)))
            for leaf_name, leaf in [(f"{p}.data", getattr(pool, p).data) for p in ("gate", "up", "down")]:
                assert isinstance(mapped_file_of(leaf), mmap.mmap) and not leaf.flags.writeable
                np.testing.assert_array_equal(leaf, on_disk[leaf_name])
            for t in read_header(f)[0].values():
                assert t.offset % DATA_ALIGN == 0    # aligned slices: the CPU backend adopts them
    assert ckpt.dense_nbytes == tree_nbytes(ckpt.params)


def test_file_writer_takes_rows_in_any_order_and_release_drops_mapped_pages(tmp_path):
    rows = np.random.default_rng(0).integers(0, 255, (64, 1 << 18), np.uint8)     # 16 MiB
    w = FileWriter(tmp_path / "x.safetensors", {"a": ((64, 1 << 18), np.uint8), "b": ((3,), np.float32)})
    for start in (48, 0, 16, 32):
        w.write("a", start, rows[start:start + 16])
    w.write("b", 0, np.arange(3, dtype=np.float32))
    with pytest.raises(ValueError, match="do not fit tensor 'a'"):
        w.write("a", 60, rows[:8])
    w.close()
    assert stn.load_file(tmp_path / "x.safetensors")["b"].tolist() == [0, 1, 2]

    def rss_file_kib() -> int:
        return int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("RssFile")))
    before = rss_file_kib()
    m = MappedFile(tmp_path / "x.safetensors")                  # maps, reads nothing
    assert rss_file_kib() - before < 1024
    np.testing.assert_array_equal(m.arrays["a"], rows)           # touches every page of the map
    assert rss_file_kib() - before > 12 * 1024
    release_pages(m.arrays)
    assert rss_file_kib() - before < 2 * 1024
    np.testing.assert_array_equal(m.arrays["a"], rows)           # still readable: mapped back from the cache


def test_host_store_pools_and_copies_equal_the_tiers(converted, monkeypatch):
    ckpt = load_checkpoint(converted)
    store = HostStore(ckpt.experts, ckpt.config.moe_layers)
    order = [5, 1, 7, 0, 3]
    for chunk in (1 << 30, 1):       # one chunk; one expert per chunk (the chunked fill of a large layer)
        monkeypatch.setattr(pools_mod, "FILL_CHUNK_BYTES", chunk)
        for tier, name in ((HI, "hi"), (LO, "lo")):
            got = store.pool(1, tier, order)
            want = jax.tree.map(lambda a: np.asarray(a)[order], ckpt.experts[1][name])
            assert jax.tree.structure(got) == jax.tree.structure(want)
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_array_equal(np.asarray(g), w)
    assert store.pool(0, HI, []).size == 0
    one = store.expert(2, LO, 6)
    assert one.size == 1 and all(mapped_file_of(a) is not None for a in jax.tree.leaves(one))
    for g, w in zip(jax.tree.leaves(store.to_device(one)), jax.tree.leaves(ckpt.experts[2]["lo"])):
        np.testing.assert_array_equal(np.asarray(g)[0], w[6])


def test_info_reads_metadata_only(converted, tmp_path):
    """Every tensor file zeroed (same sizes): `info` still answers, so it read none of them;
    `info --verify` then names a damaged file in one line and exits 2."""
    import shutil
    damaged = Path(shutil.copytree(converted, tmp_path / "zeroed"))
    for f in damaged.rglob("*"):
        if f.is_file() and f.name != "metadata.json":
            f.write_bytes(b"\0" * f.stat().st_size)
    info = read_info(damaged)
    assert info.config.num_experts == 8 and info.tiers["lo"].name == "int4:g32"
    run = [sys.executable, "-m", "dynaexq_jax.cli", "info"]
    ok = subprocess.run(run + [str(damaged)], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and ok.stderr == ""
    assert "3 layers (3 MoE)" in ok.stdout and "tier lo: int4:g32" in ok.stdout
    bad = subprocess.run(run + [str(damaged), "--verify"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert len(bad.stderr.splitlines()) == 1
    assert "sha256 differs from the one written at conversion" in bad.stderr
    good = subprocess.run(run + [str(converted), "--verify"], capture_output=True, text=True, cwd=ROOT)
    assert good.returncode == 0 and "verified:" in good.stdout, good.stderr


_RSS_CHILD = """
import json, sys
from pathlib import Path

def status(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key))) * 1024

def expert_pages():   # resident bytes of this process's mappings of the expert files
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" in head[3]:
            inside = len(head) >= 6 and "/experts/" in head[5]
        elif line.startswith("Rss:") and inside:
            total += int(head[1]) * 1024
    return total

from dynaexq_jax.runtime.budget import budget_for_fraction
from dynaexq_jax.runtime.config import EngineConfig
from dynaexq_jax.runtime.engine import Engine
from dynaexq_jax.runtime.pools import tree_nbytes
from dynaexq_jax.serving.checkpoint import load_checkpoint
base = status("VmRSS")
ckpt = load_checkpoint(sys.argv[1])
loaded = status("VmRSS")
settings = EngineConfig(batch=1, max_len=64, segment_len=4, update_period=4, delta=0.0)
eng = Engine(ckpt, budget_bytes=budget_for_fraction(ckpt, 0.25, settings), settings=settings)
started = status("VmHWM")
res = eng.generate([[1, 2, 3, 4, 5, 6, 7, 8]], max_new_tokens=24, stop_tokens=())
print(json.dumps(dict(base=base, loaded=loaded, started=started, served=status("VmHWM"), dense=tree_nbytes(ckpt.params),
                      pools=eng.pools.nbytes, experts=sum(tree_nbytes(t) for t in ckpt.experts.values()),
                      expert_pages=expert_pages(), promotions=res.runtime["counters"]["promotions"])))
"""


@pytest.mark.slow
def test_host_memory_does_not_grow_with_the_experts(tmp_path):
    """Two generated checkpoints, 16 and 128 experts per layer (both tiers of all experts: 16 and
    127 MB). In a fresh process each: loading adds the dense params only; start-up's peak adds
    the device pools (host memory on the CPU backend) and a constant; after serving with swaps,
    the expert files' pages this process holds are those of a few copies. (Before the store
    was memory-mapped, loading alone held both tiers, and start-up copied them again.)"""
    runs = {}
    for E in (16, 128):
        hf = write_random_qwen3_moe(tmp_path / f"hf{E}", seed=2, dtype="bfloat16", tokenizer=False,
                                    num_hidden_layers=4, hidden_size=256, moe_intermediate_size=128, num_experts=E,
                                    num_experts_per_tok=4, vocab_size=512)
        conv = convert(hf, tmp_path / f"conv{E}", hi="source", lo="int4", progress=False)
        out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(conv)], capture_output=True, text=True,
                             cwd=ROOT, check=True)
        runs[E] = json.loads(out.stdout)
    MB = 2**20
    small, large = runs[16], runs[128]
    assert large["experts"] - small["experts"] > 100 * MB
    for r in runs.values():
        assert r["loaded"] - r["base"] < r["dense"] + 32 * MB
        assert r["expert_pages"] < 16 * MB
    startup = {E: r["started"] - r["base"] - r["dense"] - r["pools"] for E, r in runs.items()}
    assert abs(startup[128] - startup[16]) < 16 * MB, startup
    assert large["promotions"] >= 50
    print({E: {k: round(v / MB, 1) if k != "promotions" else v for k, v in r.items()} for E, r in runs.items()})

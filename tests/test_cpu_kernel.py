"""The CPU kernel of the MoE op (dynaexq_jax/model/moe/csrc/moe_cpu.cc) beyond the conformance
suite (test_moe_backends.py, which checks its results in every format): its place in the XLA
backend (dispatch, gradients, export for CUDA), errors, the build cache and the fallback without
a compiler."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax.model.moe import (
    ExpertPools,
    cpu_kernel,
    moe_experts_xla,
    quantize_experts,
    route,
    single_tier,
)

SEED = int(os.environ.get("DYNAEXQ_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="no C++ compiler to build the CPU kernel")


def _raw(r, E, H, I):
    return [r.standard_normal(s).astype(np.float32) * 0.1 for s in [(E, H, I), (E, H, I), (E, I, H)]]


def _close(got, want, rtol=2e-5):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=f"seed {SEED}")


def test_pairs_of_other_tiers_contribute_nothing():
    r = np.random.default_rng(SEED)
    pool = jax.device_put(quantize_experts(*_raw(r, 8, 32, 16), "int4:g16"))
    x = jnp.asarray(r.standard_normal((3, 32)), jnp.float32)
    out = cpu_kernel.tier_contribution(x, pool, jnp.full((3, 2), -1, jnp.int32), jnp.ones((3, 2)))
    assert np.array_equal(np.asarray(out), np.zeros((3, 32), np.float32))


def _mixed(r, E=32, H=64, I=32, specs=("f32", "int4:g32")):
    raw = _raw(r, E, H, I)
    perm = r.permutation(E)
    sets = [np.sort(perm[:7]), np.sort(perm[7:])]
    pools = tuple(quantize_experts(*[w[s] for w in raw], spec) for s, spec in zip(sets, specs))
    tier, slot = np.zeros(E, np.int32), np.zeros(E, np.int32)
    for t, s in enumerate(sets):
        tier[s], slot[s] = t, np.arange(len(s))
    return ExpertPools(jax.device_put(pools), jnp.asarray(tier), jnp.asarray(slot))


def _op(monkeypatch, use_kernel: bool):
    """A fresh jit of the XLA backend traced with the kernel on or off."""
    monkeypatch.setenv("DYNAEXQ_CPU_KERNEL", "1" if use_kernel else "0")
    return jax.jit(lambda *a: moe_experts_xla(*a))


@pytest.mark.parametrize("T", [1, 100, 200, 600])
def test_xla_backend_calls_the_kernel_for_every_tier_at_any_shape(monkeypatch, T):
    """Once per tier, from decode to long prefills and whatever the pool sizes (7 and 25 slots
    here, 600 x 4 pairs: 340 per HI slot), so both tiers of a layer take the same path; never
    with DYNAEXQ_CPU_KERNEL=0."""
    r = np.random.default_rng(SEED)
    experts = _mixed(r)
    x = jnp.asarray(r.standard_normal((T, 64)), jnp.float32)
    ids, w, _ = route(x, jnp.asarray(r.standard_normal((64, 32)), jnp.float32), 4, True)
    calls = _op(monkeypatch, True).lower(x, ids, w, experts).as_text().count(f"@{cpu_kernel.TARGET}(")
    assert calls == len(experts.pools)
    assert cpu_kernel.TARGET not in _op(monkeypatch, False).lower(x, ids, w, experts).as_text()


def test_gradients_through_the_kernel_come_from_the_xla_path(monkeypatch):
    """Training differentiates the MoE op: the kernel's custom VJP gives XLA's gradients."""
    r = np.random.default_rng(SEED)
    E, H, I, k, T = 16, 32, 16, 2, 6
    pool = jax.device_put(quantize_experts(*_raw(r, E, H, I), "f32"))
    x = jnp.asarray(r.standard_normal((T, H)), jnp.float32)
    ids, w, _ = route(x, jnp.asarray(r.standard_normal((H, E)), jnp.float32), k, True)
    c = jnp.asarray(r.standard_normal((T, H)), jnp.float32)

    def loss(x, pool, w):
        return jnp.sum(c * moe_experts_xla(x, ids, w, single_tier(pool)))

    grads = {}
    for use in (True, False):
        monkeypatch.setenv("DYNAEXQ_CPU_KERNEL", "1" if use else "0")
        grads[use] = jax.jit(jax.grad(lambda *a: loss(*a), argnums=(0, 1, 2)))(x, pool, w)
    for a, b in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])):
        assert np.abs(np.asarray(b)).max() > 0
        _close(np.asarray(a), np.asarray(b))


def test_export_for_cuda_keeps_the_xla_path(monkeypatch):
    """The kernel is a CPU custom call: a CUDA lowering of the same function must not contain it."""
    monkeypatch.setenv("DYNAEXQ_CPU_KERNEL", "1")
    r = np.random.default_rng(SEED)
    experts = _mixed(r)
    x = jnp.zeros((2, 64), jnp.float32)
    ids, w = jnp.zeros((2, 4), jnp.int32), jnp.full((2, 4), 0.25, jnp.float32)
    f = jax.jit(lambda *a: moe_experts_xla(*a))
    text = jax.export.export(f, platforms=["cuda"])(x, ids, w, experts).mlir_module()
    assert cpu_kernel.TARGET not in text
    allow = [jax.export.DisabledSafetyCheck.custom_call(cpu_kernel.TARGET)]
    cpu = jax.export.export(f, platforms=["cpu"], disabled_checks=allow)(x, ids, w, experts)
    assert cpu_kernel.TARGET in cpu.mlir_module()


def test_bad_calls_raise_errors_that_name_the_problem():
    r = np.random.default_rng(SEED)
    pool = jax.device_put(quantize_experts(*_raw(r, 8, 32, 16), "f32"))
    x = jnp.zeros((2, 32), jnp.float32)
    with pytest.raises(Exception, match="slot out of range"):
        np.asarray(cpu_kernel.tier_contribution(x, pool, jnp.full((2, 2), 8, jnp.int32), jnp.ones((2, 2))))
    with pytest.raises(Exception, match="x must be f32 or bf16"):
        np.asarray(cpu_kernel.tier_contribution(x.astype(jnp.float16), pool, jnp.zeros((2, 2), jnp.int32),
                                                jnp.ones((2, 2))))
    with pytest.raises(Exception, match="weights do not match"):
        np.asarray(cpu_kernel.tier_contribution(jnp.zeros((2, 16), jnp.float32), pool,
                                                jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 2))))


def test_build_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAEXQ_CACHE", str(tmp_path))
    first = cpu_kernel.build(cpu_kernel._compiler())
    stamp = first.stat().st_mtime_ns
    assert cpu_kernel.build(cpu_kernel._compiler()) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]       # no temporary left behind


def test_without_a_compiler_the_xla_path_serves(tmp_path):
    code = ("import warnings, jax.numpy as jnp, numpy as np\n"
            "from dynaexq_jax.model.moe import cpu_kernel\n"
            "from dynaexq_jax.model.moe import moe_experts_xla, moe_experts_reference, quantize_experts, single_tier\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    assert not cpu_kernel.available()\n"
            "assert any('could not be built' in str(w.message) for w in caught)\n"
            "r = np.random.default_rng(0)\n"
            "e = single_tier(quantize_experts(*(r.standard_normal(s).astype(np.float32) for s in\n"
            "    [(4, 8, 4), (4, 8, 4), (4, 4, 8)]), 'f32'))\n"
            "x, ids, w = jnp.ones((1, 8)), jnp.asarray([[1, 3]]), jnp.asarray([[0.5, 0.5]])\n"
            "assert np.allclose(moe_experts_xla(x, ids, w, e), moe_experts_reference(x, ids, w, e), rtol=1e-5)\n"
            "print('fallback ok')\n")
    env = {**os.environ, "CXX": "/nonexistent/c++", "DYNAEXQ_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "fallback ok" in out.stdout, out.stderr[-2000:]
    assert not list(tmp_path.iterdir())


# ---- the dense matmul kernel (layers.dense_matmul) ---------------------------------------------------
@pytest.fixture
def every_isa():
    """The ISAs this CPU runs the kernels with; the best one is restored afterwards."""
    yield cpu_kernel.isas()
    cpu_kernel.set_isa("")


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("w_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("x_dtype", ["float32", "bfloat16"])
def test_matmul_kernel_equals_xla_on_every_instruction_set(x_dtype, w_dtype, transposed, every_isa):
    """Row counts 1..37 (register tiles of up to 4 rows and the streamed path), column counts
    that leave tails after the vector tiles (64 + 16 + 3), an odd K; f32 accumulation."""
    r = np.random.default_rng(SEED)
    K, N = 83, 64 + 16 + 3
    w = jnp.asarray(r.standard_normal((N, K) if transposed else (K, N)) * 0.1, w_dtype)
    for isa in every_isa:
        cpu_kernel.set_isa(isa)
        for rows in (1, 3, 4, 7, 37):
            x = jnp.asarray(r.standard_normal((rows, K)), x_dtype)
            got = np.asarray(jax.jit(lambda x, w: cpu_kernel.matmul(x, w, transposed))(x, w))
            want = np.asarray(x, np.float32) @ np.asarray(w, np.float32).T if transposed else \
                np.asarray(x, np.float32) @ np.asarray(w, np.float32)
            _close(got, want, rtol=1e-5)


def test_dense_matmul_uses_the_kernel_for_few_rows_only(monkeypatch):
    """Decode-sized products (and the tied head, read transposed) call the kernel; a long prompt's
    are XLA's GEMMs; DYNAEXQ_CPU_KERNEL=0 turns it off; a CUDA export keeps XLA's dot."""
    from dynaexq_jax.model.moe.cpu_kernel import dense_matmul
    monkeypatch.setenv("DYNAEXQ_CPU_KERNEL", "1")
    w = jnp.zeros((32, 48), jnp.bfloat16)

    def lower(rows):
        return jax.jit(lambda x: dense_matmul(x, w)).lower(jnp.zeros((1, rows, 32), jnp.bfloat16)).as_text()
    assert cpu_kernel.MATMUL_TARGET in lower(4)
    assert cpu_kernel.MATMUL_TARGET not in lower(cpu_kernel.MATMUL_MAX_ROWS + 1)
    wt = jnp.zeros((48, 32), jnp.bfloat16)
    assert cpu_kernel.MATMUL_TARGET in jax.jit(lambda x: dense_matmul(x, wt, transposed=True)).lower(
        jnp.zeros((2, 32), jnp.float32)).as_text()
    cuda = jax.export.export(jax.jit(lambda x: dense_matmul(x, w)), platforms=["cuda"])(jnp.zeros((2, 32)))
    assert cpu_kernel.MATMUL_TARGET not in cuda.mlir_module()
    monkeypatch.setenv("DYNAEXQ_CPU_KERNEL", "0")
    assert cpu_kernel.MATMUL_TARGET not in lower(4)


def test_dense_matmul_gradients_are_xlas(monkeypatch):
    from dynaexq_jax.model.moe.cpu_kernel import dense_matmul
    r = np.random.default_rng(SEED)
    x, w = jnp.asarray(r.standard_normal((3, 16)), jnp.float32), jnp.asarray(r.standard_normal((16, 8)), jnp.float32)
    grads = {}
    for use in ("1", "0"):
        monkeypatch.setenv("DYNAEXQ_CPU_KERNEL", use)
        grads[use] = jax.jit(jax.grad(lambda x, w: jnp.sum(dense_matmul(x, w) ** 2), argnums=(0, 1)))(x, w)
    for a, b in zip(grads["1"], grads["0"]):
        _close(np.asarray(a), np.asarray(b))


def test_matmul_bad_calls_raise_errors_that_name_the_problem():
    with pytest.raises(Exception, match="x and w do not match"):
        np.asarray(cpu_kernel.matmul(jnp.zeros((2, 8)), jnp.zeros((9, 4))))
    with pytest.raises(Exception, match="w must be f32, bf16 or fp16"):
        np.asarray(cpu_kernel.matmul(jnp.zeros((2, 8)), jnp.zeros((8, 4), jnp.int32)))


def test_instruction_sets_are_chosen_at_run_time(every_isa):
    """The best ISA by default, any lesser one on request (portable code always), an unknown one
    refused with the list; DYNAEXQ_CPU_ISA picks one for a process and refuses one the CPU lacks."""
    assert cpu_kernel.isa() == every_isa[0] and every_isa[-1] == "generic"
    for isa in every_isa:
        cpu_kernel.set_isa(isa)
        assert cpu_kernel.isa() == isa
    with pytest.raises(ValueError, match="this CPU runs"):
        cpu_kernel.set_isa("avx1024")
    code = "from dynaexq_jax.model.moe import cpu_kernel; print(cpu_kernel.isa())"
    env = {**os.environ, "DYNAEXQ_CPU_ISA": "generic", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "generic", out.stderr[-2000:]
    env["DYNAEXQ_CPU_ISA"] = "avx1024"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "DYNAEXQ_CPU_ISA=avx1024: this CPU runs" in out.stderr


def test_a_16_bit_model_runs_an_f32_residual_stream_where_the_kernels_serve(monkeypatch, tmp_path):
    """residual_dtype: f32 for a 16-bit model where the kernels serve (backend "xla" on the CPU,
    enabled), the model's dtype elsewhere. A bf16 model's decode then keeps a bf16 KV cache, and
    its logits are the all-f32 computation of the same bf16 weights to ~1e-6 (a bf16 stream's: ~3e-2).
    The accuracy is compared over f32 caches: a bf16 cache rounds k, v and q, and a 1e-7
    difference upstream flips an occasional rounding by one bf16 ulp (seen: 7e-4 in the logits)."""
    from checkpoints_convert import convert
    from dynaexq_jax.experiments.synthetic import write_random_qwen3_moe
    from dynaexq_jax.model.families import decoder
    from dynaexq_jax.model.layers import embed
    from dynaexq_jax.serving.checkpoint import attach_experts, load_checkpoint
    from tests.tiny_runtime import TINY
    bf16 = jnp.bfloat16
    monkeypatch.setenv("DYNAEXQ_CPU_KERNEL", "1")
    assert cpu_kernel.residual_dtype(bf16, "xla") == jnp.float32
    assert cpu_kernel.residual_dtype(jnp.float16, "xla") == jnp.float32
    assert cpu_kernel.residual_dtype(jnp.float32, "xla") == jnp.float32
    assert cpu_kernel.residual_dtype(bf16, "pallas") == bf16
    assert cpu_kernel.residual_dtype(bf16, "xla", platform="gpu") == bf16
    monkeypatch.setenv("DYNAEXQ_CPU_KERNEL", "0")
    assert cpu_kernel.residual_dtype(bf16, "xla") == bf16

    hf = write_random_qwen3_moe(tmp_path / "hf", seed=SEED % 1000, dtype="bfloat16", tokenizer=False, **TINY)
    ckpt = load_checkpoint(convert(hf, tmp_path / "conv", lo="int4:g32", progress=False))
    pools = {l: single_tier(jax.device_put(ckpt.experts[l]["hi"])) for l in ckpt.experts}
    params = attach_experts(ckpt.params, pools)
    assert params.embed.dtype == bf16
    tokens = jnp.asarray(np.random.default_rng(SEED).integers(0, TINY["vocab_size"], (2, 5)), jnp.int32)

    def run(kernel: str, model, cache_dtype=jnp.float32):
        monkeypatch.setenv("DYNAEXQ_CPU_KERNEL", kernel)
        jax.clear_caches()
        empty = decoder.init_cache(ckpt.config, 2, 16, cache_dtype)
        out = jax.jit(lambda p, t: decoder.decode(p, ckpt.config, t, empty))
        logits, cache, _ = out(model, tokens)
        return np.asarray(logits, np.float32), cache, embed(model, tokens).dtype, out.lower(model, tokens)

    f32_model = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == bf16 else a, params)
    want, _, _, _ = run("0", f32_model)
    stream_f32, _, rows, _ = run("1", params)
    stream_bf16, _, rows_off, _ = run("0", params)
    assert (rows, rows_off) == (jnp.float32, bf16)
    _, cache, _, lowered = run("1", params, bf16)
    assert cache.k[0].dtype == bf16 and cache.v[0].dtype == bf16
    # Neither the cache writes (layers.write_cache) nor the attention products widen the cache.
    cache_shape = ",".join(map(str, cache.k[0].shape))
    assert f"f32[{cache_shape}]" not in lowered.compile().as_text()
    err_f32, err_bf16 = np.abs(stream_f32 - want).max(), np.abs(stream_bf16 - want).max()
    assert err_f32 < err_bf16 / 100, (err_f32, err_bf16, f"seed {SEED}")

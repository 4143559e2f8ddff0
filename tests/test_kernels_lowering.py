"""The real Pallas -> Triton lowering, run on a CPU machine: export the kernels and the MoE op's
pallas backend (dynaexq_jax/model/moe/pallas.py) for CUDA.

`jax.export.export(jax.jit(f), platforms=["cuda"])` lowers every pallas_call through the Triton
backend (jaxpr -> Triton IR, serialized into a custom call) without a GPU, and fails on anything
Triton cannot express (non power-of-two blocks, unsupported primitives or dtypes). The custom call
itself has no export compatibility guarantee, hence disabled_checks. On JAX 0.11 the lowering also
needs a GPU model to target when none is attached: compat.cuda_lowering_target() supplies one.
Arrays are abstract (ShapeDtypeStruct), so full-size model shapes cost nothing.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynaexq_jax.model.moe import ExpertPools, TierPool, moe_experts_pallas
from dynaexq_jax.model.quant import QTensor, parse_format
from pallas_kernels import compat
from pallas_kernels.grouped_matmul import (
    DECODE,
    PREFILL,
    SWIGLU,
    TileConfig,
    clamped_swiglu,
    default_config,
    down,
    gate_up,
)

QWEN3_30B = dict(hidden=2048, inter=768, experts=128, top_k=8)
FORMATS = ("bf16", "fp16", "f32", "int8", "int4", "int3", "int2", "int8:channel", "int4:g64", "int4:g64:hqq",
           "int3:hqq", "int2:hqq")


def _abstract_qtensor(fmt, slots, k, n) -> QTensor:
    fmt = parse_format(fmt)
    data = jax.ShapeDtypeStruct((slots, fmt.packed_rows(k), n), fmt.storage_dtype)
    scales = jax.ShapeDtypeStruct((slots, k // fmt.group_for(k), n), np.float16) if fmt.is_int else None
    return QTensor(data, scales, fmt, scales if fmt.has_zeros else None)


def _abstract_pool(fmt, slots, hidden, inter, bias: bool = False) -> TierPool:
    biases = [jax.ShapeDtypeStruct((slots, n), jnp.float32) for n in (inter, inter, hidden)] if bias else []
    return TierPool(_abstract_qtensor(fmt, slots, hidden, inter), _abstract_qtensor(fmt, slots, hidden, inter),
                    _abstract_qtensor(fmt, slots, inter, hidden), *biases)


def _export_moe(pools, tokens, x_dtype=jnp.bfloat16, tiles=None, hidden=2048, top_k=8, experts=128,
                activation=SWIGLU) -> str:
    int_spec = jax.ShapeDtypeStruct((experts,), jnp.int32)
    ex = ExpertPools(tuple(pools), int_spec, int_spec)

    def f(x, ids, w, ex):
        return moe_experts_pallas(x, ids, w, ex, interpret=False, tiles=tiles, activation=activation)

    with compat.cuda_lowering_target():
        exported = jax.export.export(jax.jit(f), platforms=["cuda"],
                                     disabled_checks=compat.disabled_triton_checks())(
            jax.ShapeDtypeStruct((tokens, hidden), x_dtype), jax.ShapeDtypeStruct((tokens, top_k), jnp.int32),
            jax.ShapeDtypeStruct((tokens, top_k), x_dtype), ex)
    assert exported.platforms == ("cuda",)
    return exported.mlir_module()


def _triton_calls(text: str) -> int:
    return sum(text.count(f"custom_call @{t}(") for t in compat.TRITON_CUSTOM_CALL_TARGETS)


def _assert_params(text: str, config: TileConfig):
    # The legacy custom call carries the launch parameters in clear text; the FFI one compresses them.
    if "__gpu$xla.gpu.triton" in text:
        assert text.count(f"num_warps = {config.num_warps} : i32") == 2
        stages = [int(v) for v in re.findall(r"num_stages = (\d+) : i32", text)]
        assert len(stages) == 2 and all(1 <= v <= config.num_stages for v in stages), stages


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("phase,tokens", [("decode", 4), ("prefill", 512)])
def test_default_tiles_lower_to_triton(fmt, phase, tokens):
    """Qwen3-30B-A3B experts, every format, the decode and the prefill default tiles."""
    s = QWEN3_30B
    config = default_config(tokens * s["top_k"], s["experts"])
    assert config == {"decode": DECODE, "prefill": PREFILL}[phase]
    text = _export_moe([_abstract_pool(fmt, s["experts"], s["hidden"], s["inter"])], tokens)
    assert _triton_calls(text) == 2, "one gate+up and one down kernel"
    _assert_params(text, config)


def test_mixed_tiers_in_one_call_lower_to_triton():
    """HI bf16 (26 slots) + LO int4 (128 slots) in one layer: one kernel pair per tier."""
    s = QWEN3_30B
    pools = [_abstract_pool("bf16", 26, s["hidden"], s["inter"]), _abstract_pool("int4", 128, s["hidden"], s["inter"])]
    assert _triton_calls(_export_moe(pools, tokens=1)) == 4


@pytest.mark.parametrize("fmt,x_dtype", [("f32", jnp.float32), ("int4", jnp.float32), ("bf16", jnp.float16),
                                         ("int2", jnp.float16)])
def test_other_activation_dtypes_lower_to_triton(fmt, x_dtype):
    """f32 / fp16 activations: f32 (IEEE) dots and promoted mixed-float weights."""
    assert _triton_calls(_export_moe([_abstract_pool(fmt, 16, 256, 128)], 4, x_dtype, hidden=256,
                                     experts=16)) == 2


@pytest.mark.parametrize("model,hidden,inter,experts,top_k,fmt", [
    ("qwen3-next-80b", 2048, 512, 512, 10, "int2"),
    ("phi-3.5-moe", 4096, 6400, 16, 2, "int4"),
])
def test_other_model_shapes_lower_to_triton(model, hidden, inter, experts, top_k, fmt):
    text = _export_moe([_abstract_pool(fmt, experts, hidden, inter)], 8, hidden=hidden, top_k=top_k,
                       experts=experts)
    assert _triton_calls(text) == 2, model


@pytest.mark.parametrize("fmt", ["bf16", "int4:g64", "int8:g64"])
@pytest.mark.parametrize("tokens", [4, 512])
def test_gpt_oss_experts_lower_to_triton(fmt, tokens):
    """gpt-oss-20b's experts (H = I = 2880: 45 x 64, 32 experts, top-4): biases in both kernels'
    epilogues and the clamped SwiGLU, at decode and prefill tiles, in one layer of two tiers."""
    pools = [_abstract_pool(fmt, 8, 2880, 2880, bias=True), _abstract_pool("int4:g64", 24, 2880, 2880, bias=True)]
    text = _export_moe(pools, tokens, hidden=2880, top_k=4, experts=32, activation=clamped_swiglu(1.702, 7.0))
    assert _triton_calls(text) == 4, "one gate+up and one down kernel per tier"
    suffix = "bfloat16" if fmt == "bf16" else f"int{fmt[3]}"
    assert f"moe_gate_up_{suffix}_bias_clamped_swiglu" in text and f"moe_down_{suffix}_bias" in text


def test_small_split_k_tiles_lower_to_triton():
    """The tiles the interpret tests use, including several K steps per quantization block."""
    fmt = "int4:g128"
    w = _abstract_qtensor(fmt, 8, 256, 128)
    for config in (TileConfig(16, 16, 16, 4, 2), TileConfig(16, 32, 32, 4, 2)):
        kfmt = w.fmt.kernel_format

        def f(x, offs, gd, gs, dd, ds, kfmt=kfmt, config=config):
            h = gate_up(x, gd, gd, offs, fmt=kfmt, gate_scales=gs, up_scales=gs, config=config, interpret=False)
            return down(h, dd, offs, jnp.ones((x.shape[0],)), fmt=kfmt, scales=ds, config=config, interpret=False)

        wd = _abstract_qtensor(fmt, 8, 128, 256)
        with compat.cuda_lowering_target():
            exported = jax.export.export(jax.jit(f), platforms=["cuda"],
                                         disabled_checks=compat.disabled_triton_checks())(
                jax.ShapeDtypeStruct((40, 256), jnp.bfloat16), jax.ShapeDtypeStruct((9,), jnp.int32),
                w.data, w.scales, wd.data, wd.scales)
        assert _triton_calls(exported.mlir_module()) == 2


def test_lowering_rejects_what_triton_cannot_express():
    """The check is real: a kernel with a non power-of-two block fails in the same export."""
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    def f(x):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                              compiler_params=compat.triton_params(4, 2))(x)

    with compat.cuda_lowering_target(), pytest.raises(Exception, match="power of 2"):
        jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=compat.disabled_triton_checks())(
            jax.ShapeDtypeStruct((24, 32), jnp.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_pipeline_fits_shared_memory(fmt):
    """num_stages is lowered where a format's tiles would overflow ~99 KiB of shared memory
    (sm_86 / sm_120), and kept where they fit."""
    from pallas_kernels.grouped_matmul import pallas_triton
    s = QWEN3_30B
    w = _abstract_qtensor(fmt, s["experts"], s["hidden"], s["inter"])
    for config in (DECODE, PREFILL):
        for x_dtype in (jnp.bfloat16, jnp.float32):
            plan = pallas_triton.make_plan((64, s["hidden"]), x_dtype, w.data, w.scales, w.zeros, w.fmt.kernel_format,
                                             config)
            stages = plan.num_stages(config, n_weights=2)
            x_bytes = plan.bm * plan.bkb * plan.p * plan.compute_dtype.itemsize
            w_bytes = 2 * plan.bkb * plan.bn * plan.w_dtype.itemsize
            assert 1 <= stages <= config.num_stages
            assert stages * (x_bytes + w_bytes) <= pallas_triton.SMEM_BUDGET or stages == 1
            if x_dtype == jnp.bfloat16 and config == DECODE and fmt != "f32":
                assert stages == DECODE.num_stages, "decode tiles of 16-bit and packed formats fit a full pipeline"

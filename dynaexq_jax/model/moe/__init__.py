"""The routed-expert FFN as one op with several backends (one folder, tokamax style):

  base.py         the router (route), the expert pools with their precision assignment
                  (TierPool, ExpertPools, HI/LO), and the contract every backend keeps
  api.py          moe_experts(..., backend=...): the entry point, BACKENDS
  reference.py    the dense reference every backend is tested against
  xla.py          "xla" / "xla-only": plain XLA, plus the CPU kernel for every tier where it is built
  cpu_kernel.py   the CPU kernel (csrc/moe_cpu.cc, an XLA FFI custom call) and its builder
  pallas.py       "pallas": the adapter from ExpertPools to the kernels in pallas_kernels/
  sharded.py      expert parallelism: pools split across a device mesh, one psum per layer
  nnx.py          the MoE layer as a Flax NNX module over the same functions
"""
from dynaexq_jax.model.moe.api import BACKENDS, XLA_BACKENDS, moe_experts
from dynaexq_jax.model.moe.base import HI, LO, ExpertPools, TierPool, quantize_experts, route, single_tier
from dynaexq_jax.model.moe.cpu_kernel import moe_experts_cpu_kernel
from dynaexq_jax.model.moe.pallas import moe_experts_pallas
from dynaexq_jax.model.moe.reference import moe_experts_reference
from dynaexq_jax.model.moe.xla import (
                                       block_rows,
                                       grouped_blocks,
                                       grouped_is_cheaper,
                                       moe_experts_xla,
                                       xla_strategy,
)

__all__ = ["BACKENDS", "XLA_BACKENDS", "moe_experts", "HI", "LO", "ExpertPools", "TierPool", "quantize_experts",
           "route", "single_tier", "moe_experts_cpu_kernel", "moe_experts_pallas", "moe_experts_reference",
           "block_rows", "grouped_blocks", "grouped_is_cheaper", "moe_experts_xla",
           "xla_strategy"]

"""Pallas GPU kernels over plain arrays, each with a pure-JAX reference beside it.

Importable (and runnable in interpret mode) on a CPU machine; imports nothing from dynaexq_jax
(the adapter from its expert pools to these arguments lives in dynaexq_jax/model/moe/pallas.py):
  packing         the weight formats as static metadata (WeightFormat) and their unpacking
  grouped_matmul  mixed-bit grouped gate+up / down matmuls over packed expert stacks
  compat          shims over the JAX 0.10 / 0.11 Pallas Triton APIs
"""

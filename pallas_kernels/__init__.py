"""Pallas GPU kernels for dynaexq-jax, each with a pure-JAX reference beside it.

Importable (and runnable in interpret mode) on a CPU machine:
  grouped_matmul  mixed-bit grouped gate+up / down matmuls over packed expert pools
  moe             the mixed-tier MoE expert op built on them (moe_experts_pallas)
  compat          shims over the JAX 0.10 / 0.11 Pallas Triton APIs
"""

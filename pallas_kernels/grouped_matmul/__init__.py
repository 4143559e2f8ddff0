"""Grouped mixed-bit matmuls (the two halves of a gated MoE expert FFN) over packed weight stacks."""
from pallas_kernels.grouped_matmul.activation import SWIGLU, Activation, clamped_swiglu
from pallas_kernels.grouped_matmul.api import IMPLEMENTATIONS, down, gate_up
from pallas_kernels.grouped_matmul.reference import down_reference, gate_up_reference
from pallas_kernels.grouped_matmul.tiling import (
                                                  DECODE,
                                                  DEFAULT_CONFIGS,
                                                  PREFILL,
                                                  TileConfig,
                                                  default_config,
                                                  group_tiles,
                                                  max_tiles,
)

__all__ = ["SWIGLU", "Activation", "clamped_swiglu",
           "IMPLEMENTATIONS", "gate_up", "down", "gate_up_reference", "down_reference", "TileConfig",
           "DECODE", "PREFILL", "DEFAULT_CONFIGS", "default_config", "group_tiles", "max_tiles"]

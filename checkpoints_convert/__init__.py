"""Hugging Face checkpoint -> converted checkpoint (dense params in orbax, expert tiers in
memory-mappable safetensors files), streaming a few experts at a time on every core. What a
family's tensors are called and how they map to ours is the family's schema (dynaexq_jax.model.families)."""
from checkpoints_convert.converter import CONVERTER_VERSION, convert

__all__ = ["convert", "CONVERTER_VERSION"]

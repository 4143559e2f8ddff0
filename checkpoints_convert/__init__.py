"""Hugging Face checkpoint -> converted (orbax) checkpoint, streaming one layer at a time. What a
family's tensors are called and how they map to ours is the family's schema (dynaexq_jax.model.families)."""
from checkpoints_convert.converter import CONVERTER_VERSION, convert

__all__ = ["convert", "CONVERTER_VERSION"]

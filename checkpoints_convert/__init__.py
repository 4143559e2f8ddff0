"""Hugging Face checkpoint -> converted (orbax) checkpoint, streaming one layer at a time.
Per-architecture tensor-name maps live beside this file (qwen3_moe_map.py)."""
from checkpoints_convert.converter import ARCHITECTURES, CONVERTER_VERSION, FORMAT_VERSION, convert

__all__ = ["convert", "ARCHITECTURES", "CONVERTER_VERSION", "FORMAT_VERSION"]

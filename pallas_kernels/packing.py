"""How the kernels read a stack of weights [S, K, N]: the format as static metadata, and the
pure-JAX unpacking every reference (and the model's dequantize) shares.

  float  data [S, K, N] in its own float dtype; no scales.
  int    integer codes q in [-offset, offset - 1] (the quantizer picks which it uses), stored
         offset-binary (q + offset, offset = 2**(bits-1)) as uint8 data [S, K/p, N], p = 8 // bits
         values per byte; scales [S, K/group, N] (one row per block of `group` K rows, per
         column): w = q * scale.
         Sub-byte values are packed WITHIN each block: its `group` rows become group/p byte rows,
         and byte row r holds rows r + j*group/p at bit offset j*bits, j = 0..p-1, so unpacking a
         block is p shifts-and-masks that each yield a contiguous sub-tile (no interleave).
  int with zero (asymmetric, HQQ)  the same codes and scales plus zeros [S, K/group, N] (the scales'
         shape and dtype): w = q * scale + zero. A kernel adds zero * (the sum of x over the
         group's rows) per group and column, so the codes' products are unchanged.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


class KernelFormatError(ValueError):
    """Weights in a format or of a shape the kernels cannot read (the message names which)."""


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """The storage format of a weight stack, as static kernel metadata (see the module docstring)."""
    kind: str          # "float" | "int"
    bits: int = 0      # int: 8, 4 or 2
    group: int = 0     # int: K rows per scale row; 0 = all of K (one scale row per column)
    zero: bool = False  # int: a zero per scale (w = q * scale + zero)

    def __post_init__(self):
        if self.kind == "float":
            ok = self.bits == 0 and self.group == 0 and not self.zero
        else:
            ok = (self.kind == "int" and self.bits in (2, 4, 8) and self.group >= 0
                  and self.group % (8 // self.bits) == 0)
        if not ok:
            raise KernelFormatError(f"WeightFormat(kind={self.kind!r}, bits={self.bits}, group={self.group}): use "
                                    "'float' (no bits, no group, no zero) or 'int' with bits 8, 4 or 2 and a group "
                                    "that is a multiple of 8 // bits")

    @property
    def is_int(self) -> bool:
        return self.kind == "int"

    @property
    def per_byte(self) -> int:
        """Values per stored element (p): 8 // bits for int formats, 1 for float ones."""
        return 8 // self.bits if self.is_int else 1

    @property
    def offset(self) -> int:
        return 1 << (self.bits - 1) if self.is_int else 0

    @property
    def name(self) -> str:
        if not self.is_int:
            return "float"
        name = f"int{self.bits}:g{self.group}" if self.group else f"int{self.bits}:channel"
        return name + (":zero" if self.zero else "")

    def group_for(self, k: int) -> int:
        """K rows per scale row for an input dimension k (per-channel formats use all of k)."""
        return self.group or k


FLOAT = WeightFormat("float")


def check_weights(data, scales, fmt: WeightFormat, zeros=None) -> tuple[int, int]:
    """Validate a weight stack data [..., K/p, N] (+ scales, + zeros where fmt.zero: [..., K/group, N])
    against fmt -> (K, N)."""
    k, n = data.shape[-2] * fmt.per_byte, data.shape[-1]
    if not fmt.is_int:
        if scales is not None or zeros is not None:
            raise KernelFormatError("float weights take no scales or zeros")
        return k, n
    g = fmt.group_for(k)
    if np.dtype(data.dtype) != np.uint8:
        raise KernelFormatError(f"format {fmt.name}: packed data must be uint8, got {data.dtype}")
    if k % g:
        raise KernelFormatError(f"format {fmt.name}: group size {g} does not divide the input dimension {k}")
    want = (*data.shape[:-2], k // g, n)
    if scales is None or tuple(scales.shape) != want:
        raise KernelFormatError(f"format {fmt.name}: scales must be {list(want)} for data {list(data.shape)}; got "
                                f"{None if scales is None else list(scales.shape)}")
    if fmt.zero and (zeros is None or tuple(zeros.shape) != want):
        raise KernelFormatError(f"format {fmt.name}: zeros must be {list(want)} for data {list(data.shape)}; got "
                                f"{None if zeros is None else list(zeros.shape)}")
    if not fmt.zero and zeros is not None:
        raise KernelFormatError(f"format {fmt.name} is symmetric: it takes no zeros")
    return k, n


def unpack_codes(data, fmt: WeightFormat, xp=jnp):
    """uint8 [..., K/p, N] -> the integer codes q (offset removed) [..., K, N], int32 (xp: jnp or np)."""
    k, n = data.shape[-2] * fmt.per_byte, data.shape[-1]
    g, p = fmt.group_for(k), fmt.per_byte
    d = data.astype(xp.int32).reshape(*data.shape[:-2], k // g, g // p, n)
    mask = (1 << fmt.bits) - 1
    q = xp.stack([(d >> (j * fmt.bits)) & mask for j in range(p)], axis=-3)     # [..., K/g, p, g/p, N]
    return q.reshape(*data.shape[:-2], k, n) - fmt.offset


def dequantize(data, scales, fmt: WeightFormat, dtype=jnp.float32, xp=jnp, zeros=None):
    """A weight stack in fmt (zeros where fmt.zero) -> float [..., K, N] in dtype (xp: jnp, or np
    for a numpy reference)."""
    if not fmt.is_int:
        return data.astype(dtype)
    k, n = data.shape[-2] * fmt.per_byte, data.shape[-1]
    g = fmt.group_for(k)
    q = unpack_codes(data, fmt, xp).astype(xp.float32).reshape(*data.shape[:-2], k // g, g, n)
    w = q * scales.astype(xp.float32)[..., None, :]
    if fmt.zero:
        w = w + zeros.astype(xp.float32)[..., None, :]
    return w.reshape(*data.shape[:-2], k, n).astype(dtype)

"""How the kernels read a stack of weights [S, K, N]: the format as static metadata, and the
pure-JAX packing and unpacking every reference (and the model's quantize/dequantize) shares.

  float  data [S, K, N] in its own float dtype; no scales.
  int    integer codes q in [-offset, offset - 1] (the quantizer picks which it uses), stored
         offset-binary (u = q + offset, offset = 2**(bits-1)) as uint8 data [S, K*bits/8, N];
         scales [S, K/group, N] (one row per block of `group` K rows, per column): w = q * scale.
         Values are packed WITHIN each block, as p sub-tiles of g/p K rows (p = fmt.subtiles):
         sub-tile j of the block holds K rows j*g/p + [0, g/p), and unpacking each is
         shifts-and-masks of whole byte rows, yielding a contiguous sub-tile (no interleave).
           int8/int4/int2: p = 8 // bits; the block's g/p byte rows hold sub-tile j at bit
             offset j*bits.
           int3: p = 8; the block's 3g/8 byte rows are three planes of g/8 rows: planes 0 and 1
             hold the low 2 bits of sub-tiles 0-3 and 4-7 (sub-tile j at bit 2*(j % 4) of plane
             j // 4), plane 2 their high bits (sub-tile j at bit j): 3 bits per weight exactly.
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


def subtiles(bits: int) -> int:
    """p, the sub-tiles a block of `bits`-bit codes unpacks into: 8 // bits, 8 for int3."""
    return 8 if bits == 3 else 8 // bits


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """The storage format of a weight stack, as static kernel metadata (see the module docstring)."""
    kind: str          # "float" | "int"
    bits: int = 0      # int: 8, 4, 3 or 2
    group: int = 0     # int: K rows per scale row; 0 = all of K (one scale row per column)
    zero: bool = False  # int: a zero per scale (w = q * scale + zero)

    def __post_init__(self):
        if self.kind == "float":
            ok = self.bits == 0 and self.group == 0 and not self.zero
        else:
            ok = (self.kind == "int" and self.bits in (2, 3, 4, 8) and self.group >= 0
                  and self.group % self.subtiles == 0)
        if not ok:
            raise KernelFormatError(f"WeightFormat(kind={self.kind!r}, bits={self.bits}, group={self.group}): use "
                                    "'float' (no bits, no group, no zero) or 'int' with bits 8, 4, 3 or 2 and a "
                                    "group that is a multiple of its sub-tiles (8 // bits; int3: 8)")

    @property
    def is_int(self) -> bool:
        return self.kind == "int"

    @property
    def subtiles(self) -> int:
        """p, the sub-tiles a block's packed rows unpack into: 8 // bits (int3: 8), 1 for floats."""
        return subtiles(self.bits) if self.is_int else 1

    @property
    def planes(self) -> int:
        """Byte rows per sub-tile row: 3 for int3, else 1."""
        return self.bits * self.subtiles // 8 if self.is_int else 1

    def packed_rows(self, k: int) -> int:
        """Stored rows of k weight rows: k * bits / 8 for int formats, k for float ones."""
        return k * self.planes // self.subtiles

    def weight_rows(self, packed: int) -> int:
        """K, from the stored rows."""
        return packed * self.subtiles // self.planes

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
    k, n = fmt.weight_rows(data.shape[-2]), data.shape[-1]
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


def code_parts(fmt: WeightFormat, j: int) -> tuple[tuple[int, int, int, int], ...]:
    """Where sub-tile j's codes are stored: per part (plane, bit offset in its bytes, bits, bit
    offset in the code): code = sum of ((plane byte >> offset) & (2**bits - 1)) << code offset."""
    if fmt.bits == 3:
        return (j // 4, 2 * (j % 4), 2, 0), (2, j, 1, 2)
    return ((0, j * fmt.bits, fmt.bits, 0),)


def pack_codes(u, fmt: WeightFormat, xp=np):
    """Offset-binary codes u [..., K, N] (ints in [0, 2**bits)) -> uint8 data [..., K*bits/8, N]."""
    k, n = u.shape[-2:]
    g, p = fmt.group_for(k), fmt.subtiles
    u = u.astype(xp.int32).reshape(*u.shape[:-2], k // g, p, g // p, n)
    planes = [xp.zeros(u.shape[:-3] + u.shape[-2:], xp.int32) for _ in range(fmt.planes)]
    for j in range(p):
        for plane, at, bits, low in code_parts(fmt, j):
            planes[plane] = planes[plane] | (((u[..., j, :, :] >> low) & ((1 << bits) - 1)) << at)
    return xp.stack(planes, axis=-3).reshape(*u.shape[:-4], fmt.packed_rows(k), n).astype(xp.uint8)


def unpack_codes(data, fmt: WeightFormat, xp=jnp):
    """uint8 [..., K*bits/8, N] -> the integer codes q (offset removed) [..., K, N], int32 (xp: jnp or np)."""
    k, n = fmt.weight_rows(data.shape[-2]), data.shape[-1]
    g, p = fmt.group_for(k), fmt.subtiles
    d = data.astype(xp.int32).reshape(*data.shape[:-2], k // g, fmt.planes, g // p, n)
    subtiles = []
    for j in range(p):
        subtiles.append(sum(((d[..., plane, :, :] >> at) & ((1 << bits) - 1)) << low
                            for plane, at, bits, low in code_parts(fmt, j)))
    q = xp.stack(subtiles, axis=-3)                                             # [..., K/g, p, g/p, N]
    return q.reshape(*data.shape[:-2], k, n) - fmt.offset


def dequantize(data, scales, fmt: WeightFormat, dtype=jnp.float32, xp=jnp, zeros=None):
    """A weight stack in fmt (zeros where fmt.zero) -> float [..., K, N] in dtype (xp: jnp, or np
    for a numpy reference)."""
    if not fmt.is_int:
        return data.astype(dtype)
    k, n = fmt.weight_rows(data.shape[-2]), data.shape[-1]
    g = fmt.group_for(k)
    q = unpack_codes(data, fmt, xp).astype(xp.float32).reshape(*data.shape[:-2], k // g, g, n)
    w = q * scales.astype(xp.float32)[..., None, :]
    if fmt.zero:
        w = w + zeros.astype(xp.float32)[..., None, :]
    return w.reshape(*data.shape[:-2], k, n).astype(dtype)

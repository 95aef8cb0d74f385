"""Bit packing of INT4/INT2 codes, shared by the quant library and the kernels.

Codes are unsigned (``0 <= code < 2**bits``) and packed along the last axis in a
*split* layout: byte ``j`` of a row of ``n`` codes holds codes ``j``,
``j + n/per_byte``, ``j + 2n/per_byte``, ... at bit offsets 0, bits, 2*bits, ...
Unpacking therefore yields contiguous slices of the row (``unpack_part``), so a
kernel unpacks in registers with one shift and one mask per slice, and never
needs to interleave lanes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SUPPORTED_BITS = (2, 4)


def codes_per_byte(bits: int) -> int:
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
  return 8 // bits


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """Packs unsigned ``bits``-bit codes along the last axis into uint8."""
  per_byte = codes_per_byte(bits)
  n = codes.shape[-1]
  if n % per_byte:
    raise ValueError(
        f"last axis of codes ({n}) must be a multiple of {per_byte} for {bits=}")
  width = n // per_byte
  codes = codes.astype(jnp.uint8)
  out = jnp.zeros(codes.shape[:-1] + (width,), jnp.uint8)
  for part in range(per_byte):
    out = out | (codes[..., part * width:(part + 1) * width] << (part * bits))
  return out


def unpack_part(packed: jax.Array, part: int, bits: int) -> jax.Array:
  """Codes ``[part*w, (part+1)*w)`` of each row, as uint8 (``w = packed.shape[-1]``)."""
  mask = (1 << bits) - 1
  return (packed >> (part * bits)) & mask


def unpack(packed: jax.Array, bits: int) -> jax.Array:
  """Inverse of ``pack``: uint8 codes with ``codes_per_byte(bits)`` times the last axis."""
  parts = [unpack_part(packed, p, bits) for p in range(codes_per_byte(bits))]
  return jnp.concatenate(parts, axis=-1)

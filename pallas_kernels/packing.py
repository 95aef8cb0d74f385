"""Stage 2 and bit packing of INT4/INT2 codes, shared by the quant library and
the kernels.

Stage 2 is integer only: from INT8 codes, a group gets an integer scale ``s2``
and zero point ``z`` (the whole range ``s2 = ceil((hi - lo) / (2**bits - 1))``,
``z = -round(lo / s2)``, or a clipped, centered grid where that has the smaller
squared error: ``stage2_params``), and ``code = clip(round(q / s2) + z, 0,
2**bits - 1)`` (ties to even: ``_div_round``).

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


STAGE2_DIV_RANGE = 255  # _div_round is exact for |a| <= 255 and 1 <= b <= 255


def _div_round(a, b):
  """``a / b`` rounded to the nearest integer, ties to even (``numpy.rint``),
  for int32 ``|a| <= 255`` and ``1 <= b <= 255`` (stage 2's codes and scales).

  Ties are frequent here (an INT8 value halfway between two multiples of an
  even ``s2``): rounding them up biased every dequantized value by about
  ``+0.25`` INT8 steps, a bias that attention's weighted average of V keeps
  while it averages the rounding noise away (INT4 cache 0.200 -> 0.138
  relative error on random data, ``tests/test_kv_cache.py``). Computed as
  ``r = floor((2a + b + 1/2) / 2b)`` in f32 (round half up: a quotient that
  is not an integer lies at least ``1 / 2b`` below the next one and the f32
  error is below ``2**-15``, so this is exact; an integer division takes dozens
  of GPU instructions), then one down on ties with an odd ``r``."""
  two_b = 2 * b
  r = jnp.floor(((2 * a + b).astype(jnp.float32) + 0.5)
                * (1.0 / two_b.astype(jnp.float32))).astype(jnp.int32)
  tie = 2 * a + b == r * two_b
  return r - (tie & ((r & 1) != 0)).astype(jnp.int32)


# The steps stage 2 tries for a group, per bit width, in eighths of its range:
# the whole range first, then clipped ones (the extreme values saturate, the
# rest round more finely); the step with the least squared error in INT8 units
# wins, ties going to the earlier. INT2's four levels gain the most: on random
# data (2048 keys, 8/2 heads, D128, two seeds) the decode error with half the
# heads INT2 goes from 0.512 to 0.360 (all INT2: 0.719 to 0.496), and the small
# LM's held-out perplexity with that cache from +1.78% to +0.99% of exact
# (``examples/train_lm.py --config small``). INT4 keeps the whole range: the
# search took its random-data error from 0.142 to 0.133, but the LM's from
# +0.07% to +0.14%, within that evaluation's noise and not a gain.
STAGE2_RANGE_EIGHTHS = {2: (8, 7, 6, 5), 4: (8,)}


def _stage2_candidate(lo, hi, levels: int, eighths: int):
  """Step and zero point spanning ``eighths / 8`` of ``[lo, hi]``: the whole
  range from ``lo`` (``s2 = ceil((hi - lo) / levels)``, the finest integer step
  that spans it), or a clipped grid centered on the range."""
  if eighths == 8:
    scale2 = jnp.maximum((hi - lo + levels - 1) // levels, 1)
    return scale2, -_div_round(lo, scale2)
  scale2 = jnp.maximum(((hi - lo) * eighths + 8 * levels - 1) // (8 * levels), 1)
  low = (lo + hi - levels * scale2) // 2                       # the grid's first value
  return scale2, jnp.clip(-_div_round(low, scale2), -128, 127)


def stage2_params(q8: jax.Array, bits: int, axis: int):
  """Integer scale (uint8) and zero point (int8) of INT8 codes reduced over ``axis``.

  The step is searched (``STAGE2_RANGE_EIGHTHS``): exact integer arithmetic,
  so every encoder (XLA, the GPU append kernel) picks the same. For the whole
  range, ``hi / s2 - lo / s2 <= levels``, and only where it is equal and
  ``lo / s2`` a tie can ``hi``'s code reach ``levels + 1`` (ties to even, odd
  ``levels``): ``stage2_encode`` clips it to ``levels``, which decodes to
  ``hi - s2 / 2``, still within half a step."""
  levels = (1 << bits) - 1
  x = q8.astype(jnp.int32)
  lo = jnp.min(x, axis=axis, keepdims=True)
  hi = jnp.max(x, axis=axis, keepdims=True)
  best = None
  for eighths in STAGE2_RANGE_EIGHTHS[bits]:
    scale2, zero = _stage2_candidate(lo, hi, levels, eighths)
    code = stage2_encode(x, scale2, zero, bits).astype(jnp.int32)
    err = jnp.sum(jnp.square((code - zero) * scale2 - x), axis=axis, keepdims=True)
    if best is None:
      best = (err, scale2, zero)
    else:
      better = err < best[0]
      best = tuple(jnp.where(better, new, old) for new, old in zip((err, scale2, zero), best))
  _, scale2, zero = best
  return scale2.astype(jnp.uint8), zero.astype(jnp.int8)


def stage2_encode(q8: jax.Array, scale2: jax.Array, zero: jax.Array, bits: int):
  """Unsigned ``bits``-bit codes of INT8 values (broadcast params), integer only."""
  levels = (1 << bits) - 1
  code = _div_round(q8.astype(jnp.int32), scale2.astype(jnp.int32)) + zero.astype(jnp.int32)
  return jnp.clip(code, 0, levels).astype(jnp.uint8)

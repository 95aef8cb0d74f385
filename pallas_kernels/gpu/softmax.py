"""Element-wise steps of the GPU prefill kernels' softmax, without the convert unit.

Hopper converts between int32 and f32 (I2F, F2I, FRND) at a fraction of the FP32
rate, on the unit that also runs ``exp2``; per logit, a softmax over int8 dots
with hardware conversions spends more time there than anywhere else. These
functions compute ``pallas_kernels.common.online_softmax_update`` and
``common.quantize_rows`` with the same results but exact "magic number"
conversions on the FMA/ALU pipes (an integer ``|i| < 2**22`` plus ``1.5 * 2**23``
sits in a float's mantissa), and without ``floor`` (Mosaic GPU has none).
``tests/pallas_kernels/test_gpu_softmax.py`` checks them against
``pallas_kernels.sas.sas_exp`` and ``common.quantize_rows`` bit for bit.

Plain ``jnp`` on 2-D tiles: the Pallas Triton kernel
(``pallas_kernels.gpu.flashq_prefill``) and the Mosaic GPU kernel
(``pallas_kernels.mosaic_gpu.flashq_prefill``) both run them, and so does XLA on
CPU in interpret mode, where ``guard=True`` keeps XLA from folding the magic
additions away.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from pallas_kernels import common
from pallas_kernels.sas import SASParams


def broadcast_rows(x, shape):
  """Row vector ``[M]`` broadcast to ``[M, N]`` (``x[:, None]``)."""
  return lax.broadcast_in_dim(x, shape, [0])


def broadcast_cols(x, shape):
  """Column vector ``[N]`` broadcast to ``[M, N]`` (``x[None, :]``)."""
  return lax.broadcast_in_dim(x, shape, [1])


# Exact integer <-> float conversions on the FMA/ALU pipes. Hopper converts
# (I2F, F2I) at a quarter of the FP32 rate, on the unit that also runs exp2:
# with int8 tensor cores one conversion per logit costs as much as the
# matmuls. Adding 1.5 * 2**23 puts an integer |i| < 2**22 into the mantissa of
# a float whose exponent is fixed, so a bit cast and one add convert exactly.
# An int8 dot whose int32 accumulator starts at ``MAGIC_I`` yields these
# "biased" bits directly.
_MAGIC_F = 12582912.0   # 1.5 * 2**23
MAGIC_I = 0x4B400000    # its bits
_ONE_BITS = 0x3F800000  # bits of 1.0


def biased_to_f32(bits):
  """Exact ``float32(x)`` from int32 ``bits = x + MAGIC_I``, ``|x| < 2**22``."""
  return lax.bitcast_convert_type(bits, jnp.float32) - _MAGIC_F


def i32_to_f32(x, convert: str = "magic"):
  """Exact ``float32(x)`` for int32 ``|x| < 2**22`` (int8 dots of <= 128 terms)."""
  if convert == "cvt":
    return x.astype(jnp.float32)
  return biased_to_f32(x + MAGIC_I)


def rescale_accumulate(acc, alpha, pv_bits, scale):
  """``acc * alpha + f32(pv) * scale`` (``alpha``, ``scale`` per row) from the
  biased bits ``pv_bits = pv + MAGIC_I``, as two FMAs an element: the
  conversion's ``- 1.5 * 2**23`` is folded into the rescale's addend. That
  addend rounds at ``|1.5 * 2**23 * scale|``, about half a unit of ``pv`` a
  tile, where P's INT8 rounding alone moves ``pv`` by hundreds of units: the
  Triton prefill then differs from its reference by ~4e-5 relative (f32, the
  tests' data) instead of ~2e-7 with exact conversions (one more instruction
  an output element)."""
  shape = acc.shape
  pv = lax.bitcast_convert_type(pv_bits, jnp.float32)
  rescaled = acc * broadcast_rows(alpha, shape) - broadcast_rows(_MAGIC_F * scale, shape)
  return rescaled + pv * broadcast_rows(scale, shape)


def floor_small(y, convert: str = "magic", guard: bool = True):
  """``floor(y)`` for f32 ``|y| < 2**22`` (``0 <= y`` with ``convert="cvt"``),
  as f32, and its int32 bits trick.

  Returns ``(f, bits)``: ``f == floor(y)`` and ``bits == bitcast(f + 1.5 *
  2**23)``, whose low byte is ``f``'s two's complement for ``|f| < 128``
  (``int8`` codes; ``f`` itself for ``0 <= f < 256``) and whose
  ``bits << 23`` is ``f << 23`` (exponent-field tables). ``guard`` pins the
  intermediate values with optimization barriers, which XLA needs (it folds
  ``(y + M) - M`` to ``y`` and may recompute ``y`` with and without FMA
  contraction); compiled Mosaic GPU code needs none (LLVM does not
  reassociate without fast-math flags, and SSA values are computed once).
  """
  if convert == "cvt":  # y >= 0: truncation is floor
    i = y.astype(jnp.int32)
    return i.astype(jnp.float32), i + MAGIC_I
  # Round to nearest even; the barrier keeps XLA from folding ``+M-M`` to a
  # no-op (LLVM does not reassociate without fast-math flags).
  if guard:
    y = lax.optimization_barrier(y)
    r = lax.optimization_barrier(y + _MAGIC_F) - _MAGIC_F
  else:
    r = (y + _MAGIC_F) - _MAGIC_F  # round to nearest even
  f = jnp.where(r > y, r - 1.0, r)
  return f, lax.bitcast_convert_type(f + _MAGIC_F, jnp.int32)


def sas_exp(x, sas: SASParams, convert: str = "magic", guard: bool = True):
  """``pallas_kernels.sas.sas_exp`` without ``floor`` (Mosaic GPU has none).

  Same operations and rounding (``floor`` of the clamped, non-negative input
  through ``floor_small``). Only base 2 (the exponent-field table).
  """
  x = jnp.maximum(x.astype(jnp.float32), 0.0)
  if sas.exact:
    return jnp.exp2(-x * math.log2(sas.base))
  if sas.base != 2.0:
    raise NotImplementedError(
        f"the GPU prefill kernels' SAS table is base 2 only, got base={sas.base}")
  dtype = jnp.dtype(sas.dtype)
  past = x > sas.threshold
  x = jnp.minimum(x, math.floor(sas.threshold) + 1.0)
  x_int_f, bits = floor_small(x, convert, guard)
  frac = (x - x_int_f).astype(dtype)
  coeffs = sas.coefficients
  poly = jnp.full_like(frac, coeffs[0])
  for c in coeffs[1:]:
    poly = poly * frac + jnp.asarray(c, dtype)
  table = lax.bitcast_convert_type(_ONE_BITS - (bits << 23), jnp.float32)  # 2**-x_int
  return jnp.where(past, jnp.zeros((), dtype), poly * table.astype(dtype))


def rescale_to_tile_unit(acc, alpha, unit, tile_unit):
  """The online rescale of an accumulator kept in units of its last tile's
  P.V scale, so that the next tile's P.V (a 16-bit dot on integer codes) can
  accumulate into it in place: returns ``(acc * alpha * unit / new_unit,
  new_unit)``, ``new_unit = tile_unit`` (``p_scale * v_scale``, per row) or,
  where P's row is all zero (``tile_unit == 0``), the old ``unit``. The value
  is ``acc * unit`` at the end."""
  new_unit = jnp.where(tile_unit > 0.0, tile_unit, unit)
  return acc * broadcast_rows(alpha * unit / new_unit, acc.shape), new_unit


def online_softmax(m_old, t, keep, q_scale, sas: SASParams, convert: str = "magic",
                   guard: bool = True):
  """``common.online_softmax_update`` for a 2-D tile (``keep=None``: no mask),
  in units of ``t = logits / q_scale``: ``q_scale`` ``[M]`` is the rows'
  (positive) scale, the same for every key tile, so the running max ``m`` is
  kept in ``t``'s units and the exponent's argument ``q_scale * (t - m)`` is
  one FMA per logit (the clamp at 0 only for the SAS table: the argument is
  never positive but by rounding). Returns ``(m, alpha, p, p_max)``, ``m`` in
  ``t``'s units; ``p_max``, the row max of ``p``, comes from the row max of
  ``t`` for exp2 (monotonic: one exp2 a row instead of a max a logit; equal
  to ``max(p)`` up to rounding, which cannot move a code past 127), else
  ``None``."""
  if keep is not None:
    t = jnp.where(keep, t, common.MASKED_MAX)
  return _update(m_old, t.max(axis=1),
                 lambda qm: t * broadcast_rows(q_scale, t.shape) - broadcast_rows(qm, t.shape),
                 keep, q_scale, sas, convert, guard)


def online_softmax_tile_scale(m_old, s, keep, q_scale, k_scale, sas: SASParams,
                              convert: str = "magic", guard: bool = True,
                              biased: bool = False):
  """``online_softmax`` for one K scale per key tile (scalar ``k_scale``):
  then the row max needs no scaled logits and the scales fold into the
  exponent's one FMA a logit. ``b = bits(s + 1.5 * 2**23)`` read as f32 is
  ``f32(s) + 1.5 * 2**23`` (exact for ``|s| < 2**22``, order-preserving), so
  ``max`` runs on ``b`` and ``q_scale * (t - m) = b * c - (c * 1.5 * 2**23 +
  q_scale * m)`` with ``c = q_scale * k_scale``: two instructions a logit
  fewer than with a K scale per token (an int->float subtraction and a
  multiply). Same ``(m, alpha, p, p_max)`` as ``online_softmax`` up to the
  rounding of the FMA's row constant, about ``c / 2`` in the exponent (a
  relative 1e-5 in ``p`` for logits of a few units; P is rounded to bf16 or
  INT8 codes after it). ``biased``: ``s`` holds ``s + MAGIC_I`` already."""
  b = lax.bitcast_convert_type(s if biased else s + MAGIC_I, jnp.float32)
  if keep is not None:
    b = jnp.where(keep, b, 0.0)  # below every valid b (>= 2**22)
  b_max = b.max(axis=1)
  t_max = jnp.where(b_max > 0.0, (b_max - _MAGIC_F) * k_scale, common.MASKED_MAX)
  c = q_scale * k_scale

  def exponent_arg(qm):
    return b * broadcast_rows(c, b.shape) - broadcast_rows(c * _MAGIC_F + qm, b.shape)
  return _update(m_old, t_max, exponent_arg, keep, q_scale, sas, convert, guard)


def _update(m_old, t_max, exponent_arg, keep, q_scale, sas: SASParams, convert: str,
            guard: bool):
  """The online-softmax step shared by both logit forms: the new max, ``alpha``,
  and ``p`` from ``exponent_arg(q_scale * m_new)``, the per-logit argument
  ``q_scale * (t - m_new) <= 0``."""
  m_new = jnp.maximum(m_old, t_max)
  alpha = sas_exp(q_scale * m_new - q_scale * m_old, sas, convert, guard).astype(jnp.float32)
  qm = q_scale * m_new
  arg = exponent_arg(qm)
  p_max = None
  if sas.exact and sas.base == 2.0:
    p = jnp.exp2(arg)
    p_max = jnp.exp2(t_max * q_scale - qm)
  else:
    p = sas_exp(-arg, sas, convert, guard).astype(jnp.float32)
  if keep is not None:
    p = jnp.where(keep, p, 0.0)
  return m_new, alpha, p, p_max


def requantize_rows(parts, convert: str = "magic", guard: bool = True):
  """``common.requantize_rows`` (symmetric INT8 per row of a tile given as
  column parts, half-up rounding: the same codes) with ``floor_small``.

  Returns ``(codes, scale)``: per part the pair ``(f32 codes, int8 codes)``
  (the float codes come free of the rounding and spare an int8 -> f32
  conversion where they are used as floats), and the f32 row scale.
  ``floor_small`` floors negative values as well (``|y| < 2**22``), and the
  low byte of its bits is the two's-complement code.
  """
  if convert == "cvt":  # hardware floor and conversions
    codes, scale = common.requantize_rows(parts)
    return [(c.astype(jnp.float32), c) for c in codes], scale
  row_max = jnp.max(jnp.abs(parts[0]), axis=-1)
  for x in parts[1:]:
    row_max = jnp.maximum(row_max, jnp.max(jnp.abs(x), axis=-1))
  inv = jnp.where(row_max == 0, 0.0, common.INT8_MAX / jnp.where(row_max == 0, 1.0, row_max))
  codes = []
  for x in parts:
    f, bits = floor_small(x * broadcast_rows(inv, x.shape) + 0.5, "magic", guard)
    codes.append((f, bits.astype(jnp.int8)))
  return codes, row_max / common.INT8_MAX


def quantize_rows(p, convert: str = "magic", guard: bool = True,
                  rounding: str = "half_up", row_max=None, codes_dtype=jnp.int8):
  """``common.quantize_rows`` for non-negative 2-D ``p``, plus ``sum(p8)``.

  Returns ``(p8, p_scale, code_sum)``: int8 codes ``floor(p * 127 / max + 0.5)``,
  the f32 row scale ``max / 127`` and the f32 row sum of the codes (their
  biased bits summed as integers, wrapping, less ``N * MAGIC_I``: exact, one
  add a code). ``rounding="nearest_even"`` rounds
  ``p * 127 / max`` to nearest even instead (one FMA with 1.5 * 2**23 instead
  of a five-op floor; codes differ from the reference's only at exact ties).
  ``row_max``: ``p``'s row max when known (``online_softmax``'s ``p_max``).
  ``codes_dtype``: int8, or a float type holding the same integer codes.
  """
  if row_max is None:
    row_max = p.max(axis=1)
  is_zero = row_max == 0.0
  inv = jnp.where(is_zero, 0.0, common.INT8_MAX / jnp.where(is_zero, 1.0, row_max))
  if rounding == "nearest_even":
    t = p * broadcast_rows(inv, p.shape) + _MAGIC_F
    if guard:
      t = lax.optimization_barrier(t)
    bits = lax.bitcast_convert_type(t, jnp.int32)
    f = t - _MAGIC_F
  else:
    f, bits = floor_small(p * broadcast_rows(inv, p.shape) + 0.5, convert, guard)
  # The low byte of ``bits`` is the code (``MAGIC_I``'s is zero); int32 sums wrap.
  p8 = bits.astype(jnp.int8) if jnp.dtype(codes_dtype) == jnp.int8 else f.astype(codes_dtype)
  bias = (p.shape[1] * MAGIC_I + 2**31) % 2**32 - 2**31      # N * MAGIC_I as an int32
  code_sum = bits.sum(axis=1) - jnp.int32(bias)
  return p8, row_max / common.INT8_MAX, i32_to_f32(code_sum, convert)

"""Building blocks shared by the FlashQ kernels and their pure-JAX references.

Every function here is a rank-agnostic ``jnp`` computation on values (reductions
run over the last axis), so the same code runs in a kernel body (Pallas Triton,
Mosaic TPU) and in the references: the kernels and the references cannot drift
apart in how they round.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.sas import SASParams, sas_exp

INT8_MAX = 127.0
INT8_MAX_INT = 127
# Finite stand-in for -inf in the running row max: keeps ``m_old - m_new``
# finite, so no NaN ever appears, while still far past any SAS threshold.
MASKED_MAX = -1e30


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def is_pow2(n: int) -> bool:
  return n > 0 and not n & (n - 1)


def next_pow2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def round_half_up(x: jax.Array) -> jax.Array:
  """Rounding of every float quantization here (matches between backends).
  Its ties bias little here: with ties to even instead, prefill's error on
  bf16 inputs moved by under 2% (1.88e-2 -> 1.85e-2, T4096) and the cache's
  decode error not at all. Stage 2's integer quotients, where ties cost far
  more, round ties to even (``packing._div_round``)."""
  return jnp.floor(x + 0.5)


def attention_mask(q_pos, k_pos, *, causal: bool, local_window, q_len=None,
                   kv_len=None):
  """Boolean keep-mask from positions (broadcasting ``q_pos[..., None]`` vs ``k_pos``).

  ``causal`` keeps ``k_pos <= q_pos``; ``local_window=(left, right)`` keeps
  ``q_pos - left <= k_pos <= q_pos + right``; ``q_len``/``kv_len`` drop rows and
  columns at or past those lengths.
  """
  q_pos = q_pos[..., :, None]
  k_pos = k_pos[..., None, :]
  keep = jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), jnp.bool_)
  if causal:
    keep &= k_pos <= q_pos
  if local_window is not None:
    left, right = local_window
    keep &= (k_pos >= q_pos - left) & (k_pos <= q_pos + right)
  if kv_len is not None:
    keep &= k_pos < kv_len
  if q_len is not None:
    keep &= q_pos < q_len
  return keep


def online_softmax_update(m_old, s, keep, sas: SASParams):
  """One tile of the online softmax with the SAS exponent.

  Args:
    m_old: running row max, f32 ``[..., M]`` (``MASKED_MAX`` before any key).
    s: logits of this tile in the exponent's units, f32 ``[..., M, N]``.
    keep: bool mask of ``s``.
  Returns:
    ``(m_new, alpha, p)``: the new row max, the rescale of the old state
    (``base**(m_old - m_new)``, exactly 1 when the max is unchanged) and the
    tile's weights ``p`` (f32, in ``[0, 1]``, exactly 0 where masked or past
    the SAS threshold).
  """
  s = jnp.where(keep, s, MASKED_MAX)
  m_new = jnp.maximum(m_old, jnp.max(s, axis=-1))
  alpha = sas_exp(m_new - m_old, sas).astype(jnp.float32)
  p = sas_exp(m_new[..., None] - s, sas).astype(jnp.float32)
  p = jnp.where(keep, p, 0.0)
  return m_new, alpha, p


def quantize_rows(x):
  """Dynamic symmetric INT8 per row of a non-negative tile: ``x ~ x_q * scale``.

  Returns int8 codes in ``[0, 127]`` and the f32 row scale ``max(x)/127``
  (0 for an all-zero row, whose codes are 0).
  """
  row_max = jnp.max(x, axis=-1)
  inv = jnp.where(row_max == 0, 0.0, INT8_MAX / jnp.where(row_max == 0, 1.0, row_max))
  x_q = round_half_up(x * inv[..., None]).astype(jnp.int8)
  return x_q, row_max / INT8_MAX


def int8_dot(a, b, contract: str):
  """int8 x int8 -> int32 einsum (e.g. ``"...md,...nd->...mn"``)."""
  return jnp.einsum(contract, a, b, preferred_element_type=jnp.int32)


def requantize_rows(parts):
  """Symmetric INT8 per row of a tile given as column parts, one scale per row.

  ``parts``: f32 ``[..., M, N_i]``. Returns the int8 parts (``[-127, 127]``)
  and the f32 row scale ``max|x| / 127`` (0 for an all-zero row): the decode
  kernels fold K's integer stage-2 scales into the query this way, so the raw
  packed codes feed an int8 dot.
  """
  row_max = jnp.max(jnp.abs(parts[0]), axis=-1)
  for x in parts[1:]:
    row_max = jnp.maximum(row_max, jnp.max(jnp.abs(x), axis=-1))
  inv = jnp.where(row_max == 0, 0.0, INT8_MAX / jnp.where(row_max == 0, 1.0, row_max))
  return ([round_half_up(x * inv[..., None]).astype(jnp.int8) for x in parts],
          row_max / INT8_MAX)


def zero_point_correction(x8, zero):
  """``sum_n x8[..., m, n] * zero[..., n]`` in f32 (exact: ``|sum| < 2**24``).

  With it, ``x8 . (codes - zero) = x8 . codes - correction``: the stage-2
  zero point is applied once per row instead of once per code.
  """
  return jnp.sum(x8.astype(jnp.float32) * zero.astype(jnp.float32)[..., None, :], axis=-1)


def stage2_decode(codes, scale2, zero):
  """Progressive stage-2 decode, exact integer arithmetic: ``(code - z) * s2`` (int32).

  The decode is affine, so kernels fold ``s2`` and ``z`` into the other dot
  operand. On the extreme entries of a group the value can pass the INT8 range
  by less than ``s2 / 2`` (rounding of ``q / s2``); it always stays within
  ``s2 / 2`` of the original INT8 value.
  """
  return (codes.astype(jnp.int32) - zero.astype(jnp.int32)) * scale2.astype(jnp.int32)


def stage2_to_int8(codes, scale2, zero):
  """``stage2_decode`` saturated to INT8 ``[-127, 127]`` (the nearest INT8 value)."""
  x = stage2_decode(codes, scale2, zero)
  return jnp.clip(x, -INT8_MAX_INT, INT8_MAX_INT).astype(jnp.int8)


def finite_rows(scale):
  """``isfinite(scale)`` as ``scale - scale == 0`` (NaN for NaN and inf), which
  every backend lowers: kernels NaN the output rows whose query scale is not
  finite, the caller's way of marking rows that NaN/inf inputs reach."""
  return scale - scale == 0.0

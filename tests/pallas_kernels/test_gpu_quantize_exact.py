"""The compiled quantizer's division trick gives the IEEE codes, bit for bit.

``pallas_kernels/gpu/quantize.py`` computes ``x / scale`` on the GPU as
Markstein's corrected quotient (``_QUOTIENT_PTX``) and the code as
``cvt.rmi.s8(q + 0.5)`` (``_CODE_PTX``); interpret mode and the reference
divide. Interpret mode never runs the PTX, so these tests emulate those
instructions exactly in numpy (an exact f32 FMA, checked against rational
arithmetic) and compare them with IEEE f32 division on exhaustive low-precision
significands, random f32 values and adversarial ones: quotients at and next to
.5 ties, tiny and huge scales, zeros, negatives and non-finite tiles. The last
tests run the kernels in interpret mode against the reference on such tiles.
"""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu import quantize as qz

F32 = np.float32
F64 = np.float64
# Smallest scale the compiled path is exact for (``_QUOTIENT_PTX``'s comment).
MIN_SCALE = 2.0 ** -100


# --- exact emulation of the PTX ---------------------------------------------------


def fma32(a, b, c):
  """``fma.rn.f32(a, b, c)``: ``a * b + c`` rounded once to f32 (no underflow).

  ``a * b`` is exact in f64; TwoSum gives ``s + e == a * b + c`` exactly. ``s``
  rounds to the right f32 unless it sits exactly on an f32 midpoint while
  ``e != 0``; then ``e`` picks the side. (``f32(a * b + c)`` in f64 alone would
  round twice: see ``test_fma32_beats_double_rounding``.)
  """
  a, b, c = (np.asarray(v, F32).astype(F64) for v in (a, b, c))
  p = a * b
  s = p + c
  bb = s - p
  e = (p - (s - bb)) + (c - bb)
  f = s.astype(F32)
  with np.errstate(invalid="ignore"):
    toward = np.nextafter(f, np.where(s > f, F32(np.inf), F32(-np.inf)).astype(F32))
    tie = (s == (f.astype(F64) + toward.astype(F64)) / 2) & (e != 0) & np.isfinite(s)
    other = np.where((e > 0) == (toward > f), toward, f)
  return np.where(tie, other, f).astype(F32)


def markstein(x, y, rcp):
  """``_QUOTIENT_PTX``: q0 = RN(x * rcp); r = fma(-q0, y, x); q = fma(r, rcp, q0)."""
  x, y, rcp = np.broadcast_arrays(*(np.asarray(v, F32) for v in (x, y, rcp)))
  with np.errstate(invalid="ignore", over="ignore"):
    q0 = x * rcp                      # f32 * f32 in numpy: one IEEE rounding
    r = fma32(-q0, y, x)
    return fma32(r, rcp, q0)


def cvt_rmi_s8(q):
  """``_CODE_PTX``: ``cvt.rmi.s8.f32(q + 0.5)``, saturating, NaN -> 0."""
  with np.errstate(invalid="ignore"):
    y = np.floor(np.asarray(q, F32) + F32(0.5))
    return np.where(np.isnan(y), 0, np.clip(y, -128, 127)).astype(np.int8)


def gpu_scale(absmax):
  """``_scale_of`` compiled: Markstein ``absmax / 127``, 1 for 0, IEEE reciprocal."""
  absmax = np.asarray(absmax, F32)
  s = markstein(absmax, F32(127), F32(qz._RCP_INT8_MAX))
  s = np.where(absmax > 0, np.where(absmax < np.inf, s, absmax), F32(1))
  with np.errstate(divide="ignore"):
    return s.astype(F32), (F32(1) / s).astype(F32)   # rcp.rn.f32: IEEE reciprocal


def gpu_codes(x, scale, rcp):
  return cvt_rmi_s8(markstein(x, scale, rcp))


def ieee_codes(x, scale):
  """The reference: IEEE f32 division, floor(q + 0.5) in f32, clip, int8."""
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    q = np.asarray(x, F32) / np.asarray(scale, F32)
    y = np.clip(np.floor(q + F32(0.5)), -127, 127)
  return np.where(np.isnan(y), 0, y).astype(np.int8)


def exact_fma32(a, b, c):
  """Slow exact reference for ``fma32``: rationals, then one RN to f32."""
  v = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
  lo = F32(float(v))                 # f64 round; then search the f32 neighbours
  cands = [np.nextafter(lo, F32(-np.inf)), lo, np.nextafter(lo, F32(np.inf))]
  dist = [abs(Fraction(float(z)) - v) for z in cands]
  best = min(dist)
  ties = [z for z, d in zip(cands, dist) if d == best]
  if len(ties) > 1:                  # ties to even significand
    ties = [z for z in ties if not np.asarray(z, F32).view(np.uint32) & 1]
  return ties[0]


def rng_f32(rng, n, lo_exp, hi_exp):
  """Random f32 with uniform significands and exponents in [lo_exp, hi_exp)."""
  m = rng.integers(1 << 23, 1 << 24, n).astype(F64)
  e = rng.integers(lo_exp, hi_exp, n)
  return (m * np.exp2(e - 23.0)).astype(F32)


def assert_same_bits(a, b):
  np.testing.assert_array_equal(np.asarray(a, F32).view(np.uint32),
                                np.asarray(b, F32).view(np.uint32))


# --- the emulation itself ---------------------------------------------------------


def test_fma32_matches_rational_arithmetic():
  rng = np.random.default_rng(0)
  n = 3000
  a = rng_f32(rng, n, -10, 10) * rng.choice([-1, 1], n).astype(F32)
  b = rng_f32(rng, n, -10, 10)
  # c near -a*b (cancellation) half the time, anything the other half.
  c = np.where(rng.random(n) < 0.5, -(a.astype(F64) * b).astype(F32),
               rng_f32(rng, n, -30, 10))
  got = fma32(a, b, c)
  want = np.array([exact_fma32(*t) for t in zip(a, b, c)], F32)
  assert_same_bits(got, want)


def test_fma32_beats_double_rounding():
  # a * b + c = 1 + 3 * 2**-24 - 2**-54: f64 rounds it onto the f32 midpoint
  # 1 + 3 * 2**-24, which then rounds to even (up); the exact value rounds down.
  a, b, c = F32(2.0 ** -24 * (1 + 2.0 ** -15)), F32(1 - 2.0 ** -15), F32(1 + 2.0 ** -23)
  naive = F32(F64(a) * F64(b) + F64(c))
  assert naive == F32(1 + 2.0 ** -22)
  assert fma32(a, b, c) == exact_fma32(a, b, c) == c


def test_rcp_of_127_is_correctly_rounded():
  r = Fraction(float(F32(qz._RCP_INT8_MAX)))
  assert F32(qz._RCP_INT8_MAX) == qz._RCP_INT8_MAX
  ulp = Fraction(float(np.spacing(F32(qz._RCP_INT8_MAX))))
  assert abs(r - Fraction(1, 127)) < ulp / 2


def test_emulated_ptx_is_the_kernels():
  """The emulation above models exactly these instructions."""
  assert qz._QUOTIENT_PTX == ("mul.rn.f32 q, $1, $3; neg.f32 r, q; fma.rn.f32 r, r, $2, $1; "
                              "fma.rn.f32 q, r, $3, q; ")
  assert qz._CODE_PTX == "add.rn.f32 q, q, 0f3F000000; cvt.rmi.s8.f32 $0, q; "


# --- Markstein's quotient is the IEEE quotient -------------------------------------


def _round(v: Fraction, p: int) -> Fraction:
  """Round-to-nearest-even of a positive rational to ``p`` significant bits."""
  e = v.numerator.bit_length() - v.denominator.bit_length()
  while v >= Fraction(2) ** (e + 1):
    e += 1
  while v < Fraction(2) ** e:
    e -= 1
  m = v / Fraction(2) ** (e - p + 1)
  n, frac = divmod(m.numerator, m.denominator)
  if 2 * frac > m.denominator or (2 * frac == m.denominator and n & 1):
    n += 1
  return n * Fraction(2) ** (e - p + 1)


def _signed_round(v: Fraction, p: int) -> Fraction:
  return v if v == 0 else (_round(v, p) if v > 0 else -_round(-v, p))


@pytest.mark.parametrize("p", [5, 7, 8])
def test_markstein_exhaustive_low_precision(p):
  """Every pair of p-bit significands (1 <= a, b < 2) in a p-bit binary format.

  The argument is precision-generic; offline the same loop passed for p = 5..13
  (16.7M pairs at p = 13), with the remainder ``r`` rounded by the FMA as here.
  """
  one = Fraction(1, 2 ** (p - 1))
  for bm in range(2 ** (p - 1), 2 ** p):
    b = bm * one
    y = _round(1 / b, p)
    for am in range(2 ** (p - 1), 2 ** p):
      a = am * one
      q0 = _round(a * y, p)
      r = _signed_round(a - b * q0, p)
      assert _signed_round(q0 + r * y, p) == _round(a / b, p), (a, b)


def test_markstein_random_f32():
  rng = np.random.default_rng(1)
  n = 1_000_000
  y = rng_f32(rng, n, -100, 100)
  x = (rng_f32(rng, n, -20, 20) * y * rng.choice([-1, 1], n).astype(F32)).astype(F32)
  rcp = F32(1) / y
  assert_same_bits(markstein(x, y, rcp), x / y)


def test_markstein_hard_to_round_quotients():
  """x / y within a few f32 ulps of a midpoint between two f32 numbers."""
  rng = np.random.default_rng(2)
  n = 500_000
  y = rng_f32(rng, n, -60, 60)
  q = rng_f32(rng, n, -8, 8).astype(F64)
  mid = q + np.spacing(q.astype(F32)).astype(F64) / 2         # 25-bit midpoints
  x = (mid * y.astype(F64)).astype(F32)
  x = np.concatenate([np.nextafter(x, F32(np.inf)), x, np.nextafter(x, F32(-np.inf))])
  y = np.tile(y, 3)
  assert_same_bits(markstein(x, y, F32(1) / y), x / y)


def test_scales_of_every_bf16_absmax():
  """``scale = absmax / 127`` and its reciprocal for all positive finite bf16 values."""
  bits = np.arange(1, 0x7F80, dtype=np.uint32) << 16
  absmax = bits.view(F32)
  absmax = absmax[absmax >= MIN_SCALE * 127]
  s, rcp = gpu_scale(absmax)
  assert_same_bits(s, absmax / F32(127))
  assert_same_bits(rcp, F32(1) / (absmax / F32(127)))


def test_scales_of_random_f32_absmax():
  rng = np.random.default_rng(3)
  absmax = rng_f32(rng, 1_000_000, -93, 128)
  absmax = absmax[np.isfinite(absmax)]
  assert_same_bits(gpu_scale(absmax)[0], absmax / F32(127))


# --- the codes ------------------------------------------------------------------------


def _tie_cases(rng, scales):
  """x near (k + 1/2) * scale for every k in [-128, 127], +-3 ulps, and +-absmax."""
  k = np.arange(-128, 128, dtype=F64) + 0.5
  x = (k[None, :] * scales.astype(F64)[:, None]).astype(F32)
  steps = [x]
  for _ in range(3):
    steps += [np.nextafter(steps[-1], F32(np.inf))]
  down = [x]
  for _ in range(3):
    down += [np.nextafter(down[-1], F32(-np.inf))]
  x = np.concatenate(steps + down[1:], axis=1)
  return x, np.broadcast_to(scales[:, None], x.shape)


@pytest.mark.parametrize("lo, hi", [(-100, -60), (-60, -1), (-1, 20), (20, 120)])
def test_codes_at_half_integer_ties(lo, hi):
  """Quotients at and next to every .5 tie, from tiny to bf16-max scales."""
  rng = np.random.default_rng(lo + 1000)
  absmax = rng_f32(rng, 2000, lo + 7, hi + 7)
  scale, rcp = gpu_scale(absmax)
  x, s = _tie_cases(rng, scale)
  keep = np.abs(x) <= absmax[:, None]           # a tile's values never exceed its absmax
  r = np.broadcast_to(rcp[:, None], x.shape)
  got, want = gpu_codes(x, s, r)[keep], ieee_codes(x, s)[keep]
  np.testing.assert_array_equal(got, want)
  assert_same_bits(markstein(x, s, r)[keep], (x / s)[keep])
  assert np.sum(np.abs(want) == 127) > 0 and np.all(np.abs(got) <= 127)


def test_codes_of_bf16_tiles():
  """Random bf16 tiles (normal, zero and negative values, absmax on +-127 ulps)."""
  rng = np.random.default_rng(4)
  for lo, hi in [(-80, -60), (-20, 20), (100, 127)]:
    x = rng_f32(rng, (256 * 64), lo, hi) * rng.choice([-1, 0, 1], 256 * 64).astype(F32)
    x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)).reshape(256, 64)
    absmax = np.max(np.abs(x), axis=-1)
    scale, rcp = gpu_scale(absmax)
    np.testing.assert_array_equal(gpu_codes(x, scale[:, None], rcp[:, None]),
                                  ieee_codes(x, scale[:, None]))


def test_codes_never_need_the_minus_127_clamp():
  """``|x| <= absmax`` keeps ``floor(x / scale + .5)`` in [-127, 127] (cvt saturates at -128)."""
  rng = np.random.default_rng(5)
  absmax = np.concatenate([rng_f32(rng, 1_000_000, -93, 127),
                           (np.arange(1, 0x7F80, dtype=np.uint32) << 16).view(F32)])
  absmax = absmax[absmax >= MIN_SCALE * 127]
  scale, rcp = gpu_scale(absmax)
  assert np.all(markstein(absmax, scale, rcp) <= 127.00002)
  np.testing.assert_array_equal(gpu_codes(-absmax, scale, rcp), -127)
  np.testing.assert_array_equal(gpu_codes(absmax, scale, rcp), 127)


def test_codes_of_zero_and_non_finite_tiles():
  """All-zero tiles (scale 1), inf and NaN tiles: the reference's codes, all 0."""
  for tile in ([0.0, -0.0, 0.0], [np.inf, 1.0, -2.0], [-np.inf, np.inf, 0.0],
               [np.nan, 1.0, 0.0]):
    x = np.asarray(tile, F32)
    with np.errstate(invalid="ignore"):
      absmax = np.max(np.abs(x))
      s_ref = np.where(absmax > 0, absmax / F32(127), F32(1)).astype(F32)
    scale, rcp = gpu_scale(absmax)
    assert_same_bits(scale, s_ref)
    np.testing.assert_array_equal(gpu_codes(x, scale, rcp), ieee_codes(x, s_ref))


# --- the kernels (interpret mode) on adversarial tiles -------------------------------


def _adversarial_qkv(rng, b=1, h=2, t=128, d=64):
  """bf16 tiles whose quotients hit .5 ties: values k + 1/2 with absmax 127 * 2**e."""
  halves = (rng.integers(-127, 127, (b, h, t, d)) + 0.5).astype(F64)
  e = rng.integers(-90, 100, (b, h, t // 64, 1)).repeat(64, axis=2)
  x = halves * np.exp2(e)
  x[:, :, ::64, 0] = 127 * np.exp2(e[:, :, ::64, 0])  # absmax of each 64-token tile
  x[:, :, 64:72] = 0.0                              # an all-zero run of tokens
  x[:, 1, 96:128] = -x[:, 1, 96:128]
  return (jnp.asarray(x, jnp.bfloat16),) * 3


@pytest.mark.parametrize("k_per_token", [False, True])
def test_kernels_interpret_on_ties(k_per_token):
  rng = np.random.default_rng(6)
  q, k, v = _adversarial_qkv(rng)
  kw = dict(block_q=64, block_k=64, sm_scale=0.125, log2e_fold=True, smooth_k=False,
            k_per_token=k_per_token)
  out = qz.quantize_qkv(q, k, v, interpret=True, **kw)
  ref = qz.quantize_qkv_reference(q, k, v, **kw)
  for field, a, r in zip(out._fields, out, ref):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(r), err_msg=field)
  # And the emulated compiled path gives the reference's codes on the same tiles
  # (Q per token; K, unsmoothed here, per tile or per token).
  for x, per_token, codes_ref in ((q, True, ref.q), (k, k_per_token, ref.k)):
    x = np.asarray(x, F32)
    tiles = x.reshape(1, 2, 2, 64, 64)
    absmax = np.max(np.abs(tiles), axis=-1, keepdims=True)
    if not per_token:
      absmax = np.max(absmax, axis=-2, keepdims=True)
    scale, rcp = gpu_scale(absmax)
    codes = gpu_codes(tiles, scale, rcp).reshape(x.shape)
    np.testing.assert_array_equal(codes, np.asarray(codes_ref))
    assert np.mean(np.asarray(codes_ref) % 2 != 0) > 0.3   # ties did round up (odd codes)


def test_smoothed_keys_interpret_on_ties():
  rng = np.random.default_rng(7)
  q, k, v = _adversarial_qkv(rng)
  lengths = np.asarray([100], np.int32)
  kw = dict(block_q=64, block_k=64, sm_scale=0.125, log2e_fold=False, smooth_k=True,
            kv_lengths=lengths, k_mean=jnp.zeros((1, 2, 64), jnp.float32).at[:, :, 3].set(0.25))
  out = qz.quantize_qkv(q, k, v, interpret=True, **kw)
  ref = qz.quantize_qkv_reference(q, k, v, **kw)
  for field, a, r in zip(out._fields, out, ref):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(r), err_msg=field)


def test_lowers_for_cuda_without_divisions():
  """The compiled kernels carry no per-element ``div.rn`` any more."""
  s = jax.ShapeDtypeStruct((1, 2, 128, 64), jnp.bfloat16)
  f = jax.jit(lambda q, k, v: qz.quantize_qkv(
      q, k, v, block_q=64, block_k=64, sm_scale=0.1, log2e_fold=True, smooth_k=True))
  text = jax.export.export(
      f, platforms=["cuda"], disabled_checks=[
          jax.export.DisabledSafetyCheck.custom_call(qz.compat.TRITON_CUSTOM_CALL_TARGET)],
  )(s, s, s).mlir_module()
  assert "fma.rn.f32" in text and "div.rn" not in text

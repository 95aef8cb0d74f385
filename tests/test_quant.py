import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pallas_kernels import packing
from turbojax import quant

@st.composite
def int8_arrays(draw):
  groups = draw(st.integers(1, 3))
  group = draw(st.sampled_from([4, 16, 64]))
  rows = draw(st.integers(1, 3))
  seed = draw(st.integers(0, 2**31 - 1))
  spread = draw(st.integers(0, 127))
  rng = np.random.default_rng(seed)
  center = rng.integers(-127 + spread // 2, 128 - spread // 2 + 1) if spread < 254 else 0
  x = np.clip(center + rng.integers(-spread // 2, spread // 2 + 1, size=(rows, groups * group)),
              -127, 127)
  return jnp.asarray(x, jnp.int8), group


# The fuzz tests draw a new shape per example: one jitted call compiles once
# where eager dispatch compiles every op (several times slower). The eager path
# is checked by test_progressive_dequantize_matches_stages and
# test_runs_under_jit_vmap_and_scan (eager == jit).
@functools.partial(jax.jit, static_argnums=1)
def _pack_unpack(codes, bits):
  packed = quant.pack(codes, bits)
  return packed, quant.unpack(packed, bits)


@given(data=st.data(), bits=st.sampled_from([2, 4]))
def test_pack_unpack_bit_exact(data, bits):
  n = data.draw(st.integers(1, 8)) * (8 // bits) * 4
  rows = data.draw(st.integers(1, 4))
  seed = data.draw(st.integers(0, 2**31 - 1))
  codes = np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, n)).astype(np.uint8)
  packed, unpacked = _pack_unpack(jnp.asarray(codes), bits)
  assert packed.shape == (rows, n * bits // 8) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(unpacked), codes)


def test_stage2_rounding_division_is_exact_over_its_whole_range():
  """``packing._div_round`` (f32) against exact rounding, ties to even."""
  r = packing.STAGE2_DIV_RANGE
  a = np.arange(-r, r + 1, dtype=np.int32)[:, None]
  b = np.arange(1, r + 1, dtype=np.int32)[None, :]
  got = jax.jit(packing._div_round)(jnp.asarray(a), jnp.asarray(b))
  np.testing.assert_array_equal(np.asarray(got), np.rint(a / b).astype(np.int32))


def test_stage2_rounding_is_unbiased():
  """Over the symmetric INT8 range, the stage-2 round trip's errors cancel for
  every scale: no value is pushed up more often than down. (Rounding ties up,
  as before, biased V by +0.25 INT8 steps on average, and attention's average
  over many tokens kept the bias: the INT4 cache's error was 0.200, not 0.135.)"""
  q8 = np.arange(-127, 128, dtype=np.int32)
  for s2 in range(1, 18):
    s2_arr = np.full_like(q8, s2)
    codes = np.asarray(packing.stage2_encode(jnp.asarray(q8), jnp.asarray(s2_arr, jnp.uint8),
                                             jnp.asarray(np.full_like(q8, 127), jnp.int8), 8))
    back = (codes.astype(np.int32) - 127) * s2
    assert np.all(2 * np.abs(back - q8) <= s2), s2
    assert (back - q8).sum() == 0, s2


def test_stage2_scale_is_the_finest_step_and_its_one_overflow_is_clipped():
  """A range of exactly ``levels`` steps gets ``s2 = range / levels``; with
  ``lo / s2`` a tie (1 / 2 -> 0) ``hi``'s code would be 16 (31 / 2 -> 16):
  clipped to 15, it decodes to 30, half a step from 31."""
  q8 = jnp.asarray([[1, 31, 7, 16]], jnp.int32)
  s2, z = packing.stage2_params(q8, 4, axis=1)
  assert int(s2[0, 0]) == 2 and int(z[0, 0]) == 0
  codes = np.asarray(packing.stage2_encode(q8, s2, z, 4))
  np.testing.assert_array_equal(codes, [[0, 15, 4, 8]])
  np.testing.assert_array_equal((codes.astype(np.int32) - 0) * 2, [[0, 30, 8, 16]])


@functools.partial(jax.jit, static_argnames=("bits", "group"))
def _stage2_round_trip(x, bits, group):
  pq = quant.quantize_asym(x, bits, group_size=group, axis=-1)
  return pq, quant.to_int8(pq).qvalue, quant.unpack(pq.codes, bits)


def _whole_range_squared_error(q8, bits, group):
  """Per group, the squared error of stage 2 over the whole range (the rule
  before the step search), in Python integers."""
  levels = (1 << bits) - 1
  x = np.asarray(q8, np.int64).reshape(q8.shape[0], -1, group)
  lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
  s2 = np.maximum(-(-(hi - lo) // levels), 1)
  z = -np.rint(lo / s2).astype(np.int64)
  codes = np.clip(np.rint(x / s2).astype(np.int64) + z, 0, levels)
  return (((codes - z) * s2 - x) ** 2).sum(-1)


@given(arr=int8_arrays(), bits=st.sampled_from([2, 4]))
def test_stage2_is_exact_integer_arithmetic_and_no_worse_than_the_whole_range(arr, bits):
  """Decoding is ``(code - z) * s2`` in integers; a value the grid covers is
  within half a step of it; and the searched step's squared error is never
  above the whole range's."""
  q8, group = arr
  levels = (1 << bits) - 1
  x = quant.QArray(q8, jnp.ones((q8.shape[0], 1), jnp.float32), None, (1, q8.shape[1]))
  pq, back, codes = _stage2_round_trip(x, bits, group)
  assert pq.scale2.dtype == jnp.uint8 and pq.zero_point.dtype == jnp.int8
  back = np.asarray(back, np.int32)
  # Reconstruct independently with Python integers: (code - z) * s2.
  codes = np.asarray(codes, np.int64)
  s2 = np.repeat(np.asarray(pq.scale2, np.int64), group, axis=-1)
  z = np.repeat(np.asarray(pq.zero_point, np.int64), group, axis=-1)
  affine = (codes - z) * s2
  q = np.asarray(q8, np.int64)
  np.testing.assert_array_equal(back, np.clip(affine, -127, 127))
  assert codes.min() >= 0 and codes.max() <= levels
  inside = (q >= -z * s2 - s2 / 2) & (q <= (levels - z) * s2 + s2 / 2)
  assert np.all(2 * np.abs(affine - q)[inside] <= s2[inside])
  assert bits == 2 or inside.all()  # INT4 keeps the whole range: nothing clipped
  err = ((affine - q) ** 2).reshape(q.shape[0], -1, group).sum(-1)
  assert np.all(err <= _whole_range_squared_error(q, bits, group))


@pytest.mark.parametrize("bits", [2, 4])
def test_stage2_clips_gaussian_int2_groups_for_a_smaller_error(bits):
  """On bell-shaped groups INT2's search clips the tails: a finer step, and a
  smaller squared error than the whole range (the decode error it buys is in
  ``packing.STAGE2_RANGE_EIGHTHS``' comment); INT4 keeps the whole range."""
  rng = np.random.default_rng(0)
  q8 = np.clip(np.rint(rng.normal(0, 30, (256, 64))), -127, 127).astype(np.int8)
  s2, z = packing.stage2_params(jnp.asarray(q8), bits, axis=1)
  codes = np.asarray(packing.stage2_encode(jnp.asarray(q8), s2, z, bits), np.int64)
  err = (((codes - np.asarray(z, np.int64)) * np.asarray(s2, np.int64) - q8) ** 2).sum(-1)
  whole = _whole_range_squared_error(q8, bits, 64)[:, 0]
  levels = (1 << bits) - 1
  whole_s2 = np.maximum(-(-(q8.max(-1).astype(int) - q8.min(-1)) // levels), 1)
  if bits == 4:
    np.testing.assert_array_equal(np.asarray(s2)[:, 0], whole_s2)
    np.testing.assert_array_equal(err, whole)
    return
  assert np.mean(np.asarray(s2)[:, 0] < whole_s2) > 0.5
  assert err.sum() < 0.75 * whole.sum()


@functools.partial(jax.jit, static_argnums=1)  # see _pack_unpack
def _int8_sym_round_trip(x, tile):
  q = quant.quantize_int8_sym(x, channelwise_axes=(0, 2), tiled_axes={1: tile})
  return q, q.full_scale(), quant.dequantize(q)


@given(seed=st.integers(0, 2**31 - 1), t=st.sampled_from([1, 37, 64, 130]), tile=st.sampled_from([1, 16, 64]),
       magnitude=st.sampled_from([1e-3, 1.0, 1e4]))
def test_int8_sym_round_trip_within_half_a_step(seed, t, tile, magnitude):
  x = jax.random.normal(jax.random.PRNGKey(seed), (2, t, 3, 8)) * magnitude
  q, step, back = _int8_sym_round_trip(x, tile)
  assert q.scale.shape == (2, -(-t // tile), 3, 1)
  step = np.asarray(step)
  err = np.abs(np.asarray(back) - np.asarray(x))
  # Half a step, plus float32's rounding of the dequantized value (code * scale).
  assert np.all(err <= 0.5 * step + 4 * np.finfo(np.float32).eps * np.abs(np.asarray(x)))


def test_zero_input_has_unit_scale_and_zero_codes():
  q = quant.quantize_int8_sym(jnp.zeros((2, 4)), channelwise_axes=(0,))
  np.testing.assert_array_equal(np.asarray(q.scale), 1.0)
  np.testing.assert_array_equal(np.asarray(q.qvalue), 0)


def test_granularities():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 128, 4, 16))
  assert quant.quantize_int8_sym(x, channelwise_axes=(0, 1, 2)).scale.shape == (2, 128, 4, 1)
  assert quant.quantize_int8_sym(x, channelwise_axes=(0, 2, 3)).scale.shape == (2, 1, 4, 16)
  assert quant.quantize_int8_sym(
      x, channelwise_axes=(0, 2), tiled_axes={1: 64}).scale.shape == (2, 2, 4, 1)


def test_progressive_dequantize_matches_stages():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 128, 4, 16))
  q8 = quant.quantize_int8_sym(x, channelwise_axes=(0, 1, 2))
  pq = quant.quantize_asym(q8, 4, group_size=64, axis=1)
  # dequantize is the affine decode; to_int8 saturates it, so they agree
  # wherever the affine value is an INT8.
  codes = np.asarray(quant.unpack(pq.codes, 4), np.int64)
  s2 = np.repeat(np.asarray(pq.scale2, np.int64), 64, axis=1)
  z = np.repeat(np.asarray(pq.zero_point, np.int64), 64, axis=1)
  affine = (codes - z) * s2
  np.testing.assert_allclose(np.asarray(quant.dequantize(pq)),
                             affine * np.asarray(q8.full_scale()), rtol=1e-6)
  in_range = np.abs(affine) <= 127
  assert in_range.mean() > 0.9
  np.testing.assert_allclose(np.asarray(quant.dequantize(pq))[in_range],
                             np.asarray(quant.dequantize(quant.to_int8(pq)))[in_range])
  err = float(jnp.linalg.norm(quant.dequantize(pq) - x) / jnp.linalg.norm(x))
  assert 0.0 < err < 0.2


def test_runs_under_jit_vmap_and_scan():
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 64, 2, 16))

  def f(x):
    q8 = quant.quantize_int8_sym(x, channelwise_axes=(0, 1))
    return quant.dequantize(quant.quantize_asym(q8, 2, group_size=16, axis=-1))

  eager = np.asarray(jax.vmap(f)(x))
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(f))(x)), eager, rtol=1e-6)
  _, scanned = jax.lax.scan(lambda c, xi: (c, f(xi)), 0, x)
  np.testing.assert_allclose(np.asarray(scanned), eager, rtol=1e-6)
  pr = jax.jit(quant.head_priority)(x)
  assert pr.shape == (2,)


def test_head_priority_and_bits():
  k = jax.random.normal(jax.random.PRNGKey(3), (2, 256, 4, 32))
  # Head 2 gets uneven channel ranges (outlier channels): the most sensitive.
  k = k.at[:, :, 2, :4].multiply(8.0).at[:, :, 0].multiply(0.1)
  pr = np.asarray(quant.head_priority(k))
  assert np.argmax(pr) == 2 and np.argmin(pr) == 0
  # priority = mean_c(gap) * std_c(gap)
  gap = np.asarray(k).max(axis=(0, 1)) - np.asarray(k).min(axis=(0, 1))
  np.testing.assert_allclose(pr, gap.mean(-1) * gap.std(-1), rtol=1e-5)
  bits = np.asarray(quant.assign_head_bits(jnp.asarray(pr), 2))
  assert bits[0] == 2 and bits[2] == 4 and (bits == 2).sum() == 2
  order = np.asarray(quant.head_order(jnp.asarray(bits)))
  assert list(bits[order]) == sorted(bits, reverse=True)


@pytest.mark.parametrize("bad, error", [
    (lambda: quant.quantize_int8_sym(jnp.ones((2, 4), jnp.int32)), TypeError),
    (lambda: quant.quantize_int8_sym(jnp.ones((2, 4)), channelwise_axes=(3,)), ValueError),
    (lambda: quant.quantize_asym(quant.quantize_int8_sym(jnp.ones((2, 8))), 3), ValueError),
    (lambda: quant.quantize_asym(quant.quantize_int8_sym(jnp.ones((2, 8))), 4, group_size=3,
                                 axis=-1), ValueError),
    (lambda: quant.pack(jnp.ones((2, 3), jnp.uint8), 4), ValueError),
    (lambda: quant.assign_head_bits(jnp.ones(4), 5), ValueError),
])
def test_bad_input_errors(bad, error):
  with pytest.raises(error):
    bad()

"""The GPU prefill kernels' element-wise softmax steps (``pallas_kernels.gpu.softmax``)
against ``pallas_kernels.sas`` / ``pallas_kernels.common`` (CPU): same bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common
from pallas_kernels import sas as sas_lib
from pallas_kernels.gpu import softmax as gs
from pallas_kernels.sas import SASParams

SAS_F32 = SASParams(dtype="float32")
SAS_BF16 = SASParams()
SAS_EXACT = SASParams(exact=True)


@pytest.mark.parametrize("convert", ["magic", "cvt"])
@pytest.mark.parametrize("sas", [
    SAS_BF16, SAS_F32, SAS_EXACT, SASParams(degree=2), SASParams(threshold=5.0)],
    ids=["bf16", "f32", "exact", "deg2", "thr5"])
def test_sas_exp_matches_library(sas, convert):
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.uniform(0, 20, 20000), np.arange(0, 20, 0.5),
                      rng.uniform(0, 1e-3, 100), [0.0, sas.threshold]])
  x = jnp.asarray(x, jnp.float32)
  got = jax.jit(lambda v: gs.sas_exp(v, sas, convert))(x)
  want = jax.jit(lambda v: sas_lib.sas_exp(v, sas))(x)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("convert", ["magic", "cvt"])
def test_quantize_rows_matches_library(convert):
  rng = np.random.default_rng(1)
  p = rng.uniform(0, 1, (64, 1024)).astype(np.float32)
  p[:, ::7] = 0.0
  p[3] = 0.0                                  # an all-zero row
  p[5] = np.round(p[5] * 254) / 254           # many exact ties at .5
  p = jnp.asarray(p)
  codes, scale, code_sum = jax.jit(lambda v: gs.quantize_rows(v, convert))(p)
  want_codes, want_scale = jax.jit(common.quantize_rows)(p)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(want_codes))
  np.testing.assert_array_equal(np.asarray(scale), np.asarray(want_scale))
  np.testing.assert_array_equal(
      np.asarray(code_sum), np.asarray(jnp.sum(want_codes.astype(jnp.float32), -1)))


def test_quantize_rows_nearest_even_differs_only_at_ties():
  rng = np.random.default_rng(2)
  p = jnp.asarray(rng.uniform(0, 1, (64, 1024)).astype(np.float32))
  codes, scale, code_sum = jax.jit(
      lambda v: gs.quantize_rows(v, rounding="nearest_even"))(p)
  want_codes, want_scale = jax.jit(common.quantize_rows)(p)
  diff = np.abs(np.asarray(codes, np.int32) - np.asarray(want_codes, np.int32))
  assert diff.max() <= 1 and diff.mean() < 1e-3
  np.testing.assert_array_equal(np.asarray(scale), np.asarray(want_scale))
  np.testing.assert_array_equal(
      np.asarray(code_sum), np.asarray(jnp.sum(codes.astype(jnp.float32), -1)))


def test_i32_to_f32_is_exact_in_range():
  x = np.concatenate([np.arange(-1000, 1000), [-(2**22) + 1, 2**22 - 1, 127 * 127 * 128]])
  x = jnp.asarray(x, jnp.int32)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(gs.i32_to_f32)(x)), np.asarray(x, np.float32))


@pytest.mark.parametrize("convert", ["magic", "cvt"])
@pytest.mark.parametrize("signed", [True, False])
def test_requantize_rows_matches_library(convert, signed):
  """Same int8 codes and scales as ``common.requantize_rows`` (half-up, ties
  included, negative values too), and float codes equal to the int8 ones."""
  rng = np.random.default_rng(3)
  parts = [rng.uniform(-1 if signed else 0, 1, (16, n)).astype(np.float32) for n in (64, 32)]
  parts[0][2] = 0.0
  parts[1][2] = 0.0                                        # an all-zero row
  parts[0][4] = np.round(parts[0][4] * 254) / 254          # exact ties at +-.5:
  parts[0][4, 0] = 1.0                                     # codes 127 k / 254
  parts[1][5, ::3] = -parts[1][5, ::3] if signed else 0.0
  parts = [jnp.asarray(x) for x in parts]
  codes, scale = jax.jit(lambda xs: gs.requantize_rows(xs, convert))(parts)
  want_codes, want_scale = jax.jit(common.requantize_rows)(parts)
  np.testing.assert_array_equal(np.asarray(scale), np.asarray(want_scale))
  for (f, c), want in zip(codes, want_codes):
    np.testing.assert_array_equal(np.asarray(c), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(f), np.asarray(want, np.float32))

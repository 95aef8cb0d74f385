import math

import jax.numpy as jnp
import numpy as np
import pytest

from turbojax import sas


@pytest.mark.parametrize("base", [2.0, math.e])
def test_degree3_fit_within_1e3_in_float32(base):
  x = jnp.linspace(0.0, 8.0, 40001)
  approx = sas.sas_exp(x, threshold=8.0, degree=3, base=base, dtype="float32")
  rel = np.max(np.abs(np.asarray(approx) / np.exp(-np.asarray(x)) - 1.0))
  assert rel <= 1e-3, rel


@pytest.mark.parametrize("base", [2.0, math.e])
def test_past_threshold_is_exactly_zero_and_zero_maps_to_one(base):
  x = jnp.array([0.0, 8.0, 8.0001, 9.0, 50.0, 1e30])
  y = np.asarray(sas.sas_exp(x, threshold=8.0, base=base, dtype="float32"))
  assert y[0] == 1.0
  assert y[1] > 0
  assert np.all(y[2:] == 0.0)


def test_fit_is_least_squares_and_constrained():
  coeffs = sas.fit_exp_poly(3, math.e)
  assert np.polyval(coeffs, 0.0) == pytest.approx(1.0, abs=1e-12)
  assert np.polyval(coeffs, 1.0) == pytest.approx(math.exp(-1.0), abs=1e-12)
  # Close to the paper's unconstrained fit -0.1025 t^3 + 0.4626 t^2 - 0.9922 t + 0.9996.
  np.testing.assert_allclose(coeffs, [-0.1025, 0.4626, -0.9922, 0.9996], atol=0.01)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dtype_is_kept(dtype):
  y = sas.sas_exp(jnp.linspace(0, 5, 11), dtype=dtype)
  assert y.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.exp(-np.linspace(0, 5, 11)),
                             rtol=1e-2)


def test_softmax_rows_sum_to_one_and_masked_rows_are_zero():
  logits = jnp.array([[0.0, 1.0, 2.0, -30.0], [1.0, 1.0, 1.0, 1.0]])
  where = jnp.array([[True, True, True, True], [False, False, False, False]])
  p = np.asarray(sas.sas_softmax(logits, where=where, dtype="float32"))
  assert p[0].sum() == pytest.approx(1.0, abs=1e-6)
  assert p[0, 3] == 0.0  # 32 below the max: past the threshold
  assert np.all(p[1] == 0.0)
  exact = np.exp([0, 1, 2]) / np.exp([0, 1, 2]).sum()
  np.testing.assert_allclose(p[0, :3], exact, rtol=1e-3)


def test_error_sparsity_tradeoff_printed():
  """Prints the error/sparsity curve over thresholds on attention-like logits."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(256, 1024)) * 2.0, jnp.float32)
  exact = np.asarray(jnp.exp(logits - logits.max(-1, keepdims=True)))
  exact = exact / exact.sum(-1, keepdims=True)
  errors = []
  for n_r in (2, 4, 6, 8, 10):
    p = np.asarray(sas.sas_softmax(logits, threshold=n_r))
    err = np.linalg.norm(p - exact) / np.linalg.norm(exact)
    sparsity = float(np.mean(p == 0))
    errors.append(err)
    print(f"n_r={n_r:2d}  rel err={err:.2e}  sparsity={sparsity:.3f}")
  assert all(a > b for a, b in zip(errors, errors[1:]))  # larger n_r, less error
  assert errors[3] < 2e-2  # n_r = 8 in bf16 on these diffuse rows

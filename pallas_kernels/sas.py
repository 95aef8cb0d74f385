"""SAS exponent: a lookup table for the integer part times a polynomial for the fraction.

TurboAttention's softmax approximation (Kang et al. 2024, §4): for ``x >= 0``,
``base**-x = LUT[floor(x)] * POLY(x - floor(x))`` where ``LUT[i] = base**-i`` and
``POLY`` is a low-degree least-squares fit of ``base**-t`` on ``[0, 1)``. Values
with ``x`` past the threshold are exactly zero, which makes P sparse.

These are plain ``jnp`` functions so that the same code runs in the pure-JAX
path and inside Pallas kernel bodies (Triton and Mosaic). For base 2 the table
is the float exponent field, built with an integer shift; base e uses a gather.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

LOG2_E = math.log2(math.e)


@functools.cache
def fit_exp_poly(degree: int = 3, base: float = 2.0) -> tuple[float, ...]:
  """Least-squares fit of ``base**-t`` on ``[0, 1)``, highest power first.

  The fit is constrained to ``POLY(0) = 1`` and ``POLY(1) = 1/base`` so the
  approximation is continuous across integers and ``sas_exp(0) == 1`` exactly
  (an online-softmax rescale by ``sas_exp(0)`` must not shrink the state).
  """
  if degree not in (2, 3, 4):
    raise ValueError(f"degree must be 2, 3 or 4, got {degree!r}")
  if base <= 1.0:
    raise ValueError(f"base must be > 1, got {base!r}")
  t = np.linspace(0.0, 1.0, 2049)
  target = base ** -t
  # POLY(t) = 1 + (1/base - 1) t + t (t - 1) * R(t), R of degree `degree - 2`.
  # The constraint terms are fixed; fit R by least squares.
  fixed = 1.0 + (1.0 / base - 1.0) * t
  basis = np.stack([t * (t - 1.0) * t**j for j in range(degree - 1)], axis=1)
  r, *_ = np.linalg.lstsq(basis, target - fixed, rcond=None)
  poly = np.polynomial.Polynomial([1.0, 1.0 / base - 1.0])
  for j, c in enumerate(r):
    poly = poly + c * np.polynomial.Polynomial([0.0, -1.0, 1.0]) * (
        np.polynomial.Polynomial([0.0, 1.0]) ** j)
  return tuple(float(c) for c in poly.coef[::-1])


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SASParams:
  """Static parameters of the SAS exponent, in the units of its input.

  Attributes:
    threshold: inputs ``x > threshold`` give exactly 0 (same units as ``x``).
    degree: degree of the polynomial for the fractional part.
    base: 2.0 (exponent-field table) or ``math.e`` (gathered table).
    dtype: dtype of the polynomial and the product (bf16/f16 on accelerators).
    exact: use the exact exponential (no table, no polynomial, no sparsity).
  """

  threshold: float = 8.0 * LOG2_E
  degree: int = 3
  base: float = 2.0
  dtype: str = "bfloat16"
  exact: bool = False

  def __post_init__(self):
    if not self.threshold > 0:
      raise ValueError(f"threshold must be > 0, got {self.threshold!r}")
    fit_exp_poly(self.degree, self.base)  # validates degree and base
    jnp.dtype(self.dtype)

  @property
  def coefficients(self) -> tuple[float, ...]:
    return fit_exp_poly(self.degree, self.base)


def _pow2_neg_int(x_int: jax.Array) -> jax.Array:
  """Exact ``2.0**-x_int`` for int32 ``0 <= x_int <= 126`` via the exponent field."""
  return jax.lax.bitcast_convert_type((127 - x_int) << 23, jnp.float32)


def sas_exp(x: jax.Array, params: SASParams) -> jax.Array:
  """``params.base ** -x`` for ``x >= 0``; exactly 0 where ``x > threshold``.

  Negative inputs are treated as 0 (they only arise from rounding of a row max);
  NaN stays NaN.
  Returns ``params.dtype`` (float32 in exact mode).
  """
  x = jnp.maximum(x.astype(jnp.float32), 0.0)
  if params.exact:
    return jnp.exp2(-x * math.log2(params.base))
  dtype = jnp.dtype(params.dtype)
  past = x > params.threshold  # NaN is not past: it propagates
  # Past the threshold the value is zeroed; clamp so the table index stays small.
  x = jnp.minimum(x, math.floor(params.threshold) + 1.0)
  x_int_f = jnp.floor(x)
  frac = (x - x_int_f).astype(dtype)
  coeffs = params.coefficients
  poly = jnp.full_like(frac, coeffs[0])
  for c in coeffs[1:]:
    poly = poly * frac + jnp.asarray(c, dtype)
  x_int = x_int_f.astype(jnp.int32)
  if params.base == 2.0:
    table = _pow2_neg_int(x_int)
  else:
    n = math.floor(params.threshold) + 2
    lut = jnp.asarray([params.base**-i for i in range(n)], jnp.float32)
    table = lut[x_int]
  return jnp.where(past, jnp.zeros((), dtype), poly * table.astype(dtype))

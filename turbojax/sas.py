"""SAS: TurboAttention's sparsity-based softmax approximation, in pure JAX.

``sas_exp(x) ≈ exp(-x)`` for ``x >= 0``: a table of ``base**-i`` for the
integer part times a least-squares polynomial for the fraction, computed in
a low-precision dtype, and exactly 0 past the threshold ``n_r`` (a score more
than ``n_r`` below the row max gets no weight). ``fit_exp_poly`` does the fit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.sas import SASParams, fit_exp_poly
from pallas_kernels.sas import sas_exp as _sas_exp_units

__all__ = ["SASParams", "fit_exp_poly", "sas_exp", "sas_softmax"]


def _params(threshold, degree, base, dtype) -> SASParams:
  return SASParams(threshold=threshold * math.log2(math.e) if base == 2.0 else threshold,
                   degree=degree, base=base, dtype=jnp.dtype(dtype).name)


def sas_exp(x: jax.Array, *, threshold: float = 8.0, degree: int = 3,
            base: float = 2.0, dtype="bfloat16") -> jax.Array:
  """``exp(-x)`` for ``x >= 0`` (natural units), exactly 0 where ``x > threshold``.

  ``base`` picks the table: 2 (``2**-i`` built from the float exponent field)
  or ``math.e`` (a gathered table of ``e**-i``). The polynomial and product run
  in ``dtype``, which is also the result's dtype.
  """
  params = _params(threshold, degree, base, dtype)
  scale = math.log2(math.e) if base == 2.0 else 1.0
  return _sas_exp_units(jnp.asarray(x, jnp.float32) * scale, params)


def sas_softmax(logits: jax.Array, axis: int = -1, *, where: jax.Array | None = None,
                threshold: float = 8.0, degree: int = 3, base: float = 2.0,
                dtype="bfloat16") -> jax.Array:
  """Softmax with the SAS exponent; masked entries (``where=False``) get 0.

  Rows with no unmasked entry are all 0 (never NaN). Returns float32.
  """
  logits = jnp.asarray(logits, jnp.float32)
  if where is None:
    where = jnp.ones(logits.shape, jnp.bool_)
  masked = jnp.where(where, logits, -jnp.inf)
  m = jnp.max(masked, axis=axis, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = sas_exp(m - logits, threshold=threshold, degree=degree, base=base, dtype=dtype)
  p = jnp.where(where, p.astype(jnp.float32), 0.0)
  total = jnp.sum(p, axis=axis, keepdims=True)
  return jnp.where(total == 0, 0.0, p / jnp.where(total == 0, 1.0, total))

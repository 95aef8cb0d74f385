"""Quantized array pytrees: ``QArray`` (one stage) and ``PQArray`` (progressive)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


def expand_scale(scale: jax.Array, tiles: tuple[int, ...], shape) -> jax.Array:
  """Repeats a per-tile array to the full ``shape`` (crops ragged last tiles)."""
  for axis, (tile, n) in enumerate(zip(tiles, shape)):
    if scale.shape[axis] != n:
      scale = jnp.repeat(scale, tile, axis=axis)
      scale = jax.lax.slice_in_dim(scale, 0, n, axis=axis)
  return scale


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("qvalue", "scale", "zero_point"),
    meta_fields=("tiles", "dtype"))
@dataclasses.dataclass(frozen=True)
class QArray:
  """An integer array with per-tile float scales: ``x ≈ (qvalue - zero_point) * scale``.

  ``scale`` (and ``zero_point`` if any) have one entry per tile; ``tiles[i]``
  is the tile length along axis ``i`` (1 = per index, ``shape[i]`` = reduced),
  so ``scale.shape[i] == ceil(shape[i] / tiles[i])``. Symmetric INT8 has no
  zero point, so integer matmuls on ``qvalue`` need no correction terms.
  """

  qvalue: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  tiles: tuple[int, ...]
  dtype: str = "float32"

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.qvalue.shape)

  @property
  def ndim(self) -> int:
    return self.qvalue.ndim

  def full_scale(self) -> jax.Array:
    """``scale`` repeated to ``shape`` (for kernels that take per-element scales)."""
    return expand_scale(self.scale, self.tiles, self.shape)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("codes", "scale2", "zero_point", "scale"),
    meta_fields=("bits", "group_axis", "group_size", "tiles", "shape", "dtype"))
@dataclasses.dataclass(frozen=True)
class PQArray:
  """Progressively quantized array: INT4/INT2 codes on top of INT8 codes.

  Two stages, each with its own scale (as AQT writes ``dequant(q) = q*s0*s1 - b``):
    ``int8  = (unpack(codes) - zero_point) * scale2``  (exact integer arithmetic;
      ``scale2`` uint8 and ``zero_point`` int8, one per group of ``group_size``
      along ``group_axis``), then
    ``float = int8 * scale``  (the stage-1 float scale, per ``tiles``).
  ``codes`` are packed along the last axis in the split layout of
  ``pallas_kernels.packing``.
  """

  codes: jax.Array
  scale2: jax.Array
  zero_point: jax.Array
  scale: jax.Array
  bits: int
  group_axis: int
  group_size: int
  tiles: tuple[int, ...]
  shape: tuple[int, ...]
  dtype: str = "float32"

  @property
  def ndim(self) -> int:
    return len(self.shape)

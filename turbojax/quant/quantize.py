"""Pure, jittable quantization functions (no internal ``jit``; they run under
``jit``, ``vmap`` and ``lax.scan``).

Stage 1 (``quantize_int8_sym``): symmetric INT8 with ``scale = absmax / 127``,
``q = clip(round(x / scale), -127, 127)``. Stage 2 (``quantize_asym``): from the
INT8 codes, groups get an integer scale ``s2 = (hi - lo) // (2**bits - 1) + 1``
and integer zero point ``z = -round(lo / s2)``, ``code = round(q / s2) + z``,
so ``q ≈ (code - z) * s2`` with error at most ``s2 / 2`` and no float math.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import common, packing
from pallas_kernels.packing import stage2_encode, stage2_params
from turbojax.quant.qarray import PQArray, QArray, expand_scale

INT8_MAX = 127


def _normalize_axes(axes, ndim, name):
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"{name} contains axis {a}, out of range for rank {ndim}")
    out.append(a % ndim)
  return out


def tiles_for(shape, channelwise_axes: Sequence[int] = (),
              tiled_axes: Mapping[int, int] | None = None) -> tuple[int, ...]:
  """Tile lengths in qwix's vocabulary: channelwise axes get 1, tiled axes
  their tile, every other axis is reduced whole."""
  ndim = len(shape)
  channelwise = _normalize_axes(channelwise_axes, ndim, "channelwise_axes")
  tiled = dict(zip(_normalize_axes((tiled_axes or {}).keys(), ndim, "tiled_axes"),
                   (tiled_axes or {}).values()))
  tiles = []
  for axis, n in enumerate(shape):
    if axis in channelwise:
      tiles.append(1)
    elif axis in tiled:
      tile = tiled[axis]
      if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tiled_axes[{axis}] must be a positive int, got {tile!r}")
      tiles.append(min(tile, n))
    else:
      tiles.append(n)
  return tuple(tiles)


def _tile_reduce(x, tiles, reducer, pad_value):
  """Reduces each tile of ``x`` (ragged tiles padded with ``pad_value``)."""
  shape = []
  pads = []
  for n, t in zip(x.shape, tiles):
    nt = -(-n // t)
    pads.append((0, nt * t - n))
    shape += [nt, t]
  x = jnp.pad(x, pads, constant_values=pad_value)
  x = x.reshape(shape)
  return reducer(x, axis=tuple(range(1, 2 * len(tiles), 2)))


def _check_float(x, name):
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array, got dtype {jnp.asarray(x).dtype}")


def quantize_int8_sym(x: jax.Array, *, channelwise_axes: Sequence[int] = (),
                      tiled_axes: Mapping[int, int] | None = None,
                      scale_dtype=jnp.float32) -> QArray:
  """Symmetric INT8 quantization with one scale per tile.

  Per head and block of 64 tokens for ``[B, T, H, D]``:
  ``channelwise_axes=(0, 2), tiled_axes={1: 64}``; per token:
  ``channelwise_axes=(0, 1, 2)``; per channel: ``channelwise_axes=(0, 2, 3)``.
  An all-zero tile gets scale 1 (codes 0), never a division by zero; a tile
  holding NaN or inf gets a NaN/inf scale, so the non-finite value propagates
  to everything computed from it instead of vanishing into the codes.
  ``scale_dtype`` narrower than f32 is applied before quantizing, so the codes
  are exact for the stored scale.
  """
  _check_float(x, "x")
  tiles = tiles_for(x.shape, channelwise_axes, tiled_axes)
  x32 = x.astype(jnp.float32)
  absmax = _tile_reduce(jnp.abs(x32), tiles, jnp.max, 0.0)
  # XLA:CPU's vectorized max may drop NaN; a sum never does (inf * 0 is NaN).
  absmax = absmax + _tile_reduce(x32 * 0.0, tiles, jnp.sum, 0.0)
  # Only an all-zero tile gets scale 1; NaN/inf propagate into the scale.
  scale = jnp.where(absmax == 0, 1.0, absmax / INT8_MAX).astype(scale_dtype)
  full = expand_scale(scale.astype(jnp.float32), tiles, x.shape)
  q = jnp.clip(common.round_half_up(x32 / full), -INT8_MAX, INT8_MAX)
  return QArray(q.astype(jnp.int8), scale, None, tiles, jnp.dtype(x.dtype).name)


def _group(x, axis, group):
  """Splits ``axis`` into ``(n/group, group)``; returns the array and the new group axis."""
  n = x.shape[axis]
  return x.reshape(x.shape[:axis] + (n // group, group) + x.shape[axis + 1:]), axis + 1


def quantize_asym(q: QArray, bits: int, *, group_size: int = 64, axis: int = -2) -> PQArray:
  """Stage 2: INT8 ``QArray`` -> packed INT4/INT2 ``PQArray`` (integer arithmetic).

  Groups are ``group_size`` consecutive entries along ``axis`` (KIVI: K along
  tokens per channel, V along channels per token). Codes are packed along
  the last axis, which must hold a multiple of ``8 // bits`` entries.
  """
  if not isinstance(q, QArray) or q.qvalue.dtype != jnp.int8 or q.zero_point is not None:
    raise TypeError("quantize_asym expects a symmetric INT8 QArray (from quantize_int8_sym)")
  packing.codes_per_byte(bits)
  axis = _normalize_axes([axis], q.ndim, "axis")[0]
  n = q.shape[axis]
  if group_size < 1 or n % group_size:
    raise ValueError(
        f"group_size={group_size} must divide the size of axis {axis} ({n})")
  grouped, gaxis = _group(q.qvalue, axis, group_size)
  scale2, zero = stage2_params(grouped, bits, gaxis)
  codes = stage2_encode(grouped, scale2, zero, bits).reshape(q.shape)
  return PQArray(
      codes=packing.pack(codes, bits), scale2=jnp.squeeze(scale2, gaxis),
      zero_point=jnp.squeeze(zero, gaxis), scale=q.scale, bits=bits,
      group_axis=axis, group_size=group_size, tiles=q.tiles, shape=q.shape,
      dtype=q.dtype)


def _stage2_values(pq: PQArray, decode):
  codes = packing.unpack(pq.codes, pq.bits)
  scale2 = jnp.repeat(pq.scale2, pq.group_size, axis=pq.group_axis)
  zero = jnp.repeat(pq.zero_point, pq.group_size, axis=pq.group_axis)
  return decode(codes, scale2, zero)


def to_int8(pq: PQArray) -> QArray:
  """Stage-2 decode to the nearest INT8 ``QArray`` (exact integer arithmetic,
  ``common.stage2_to_int8``)."""
  return QArray(_stage2_values(pq, common.stage2_to_int8), pq.scale, None, pq.tiles, pq.dtype)


def dequantize(q: QArray | PQArray, dtype=None) -> jax.Array:
  """Float values of a ``QArray`` or ``PQArray`` (``dtype`` defaults to the original).

  A ``PQArray`` dequantizes through the affine stage-2 decode
  (``common.stage2_decode``), the values the decode kernels attend over.
  """
  if isinstance(q, PQArray):
    values = _stage2_values(q, common.stage2_decode).astype(jnp.float32)
    values = values * expand_scale(q.scale.astype(jnp.float32), q.tiles, q.shape)
    return values.astype(dtype or q.dtype)
  if not isinstance(q, QArray):
    raise TypeError(f"dequantize expects a QArray or PQArray, got {type(q).__name__}")
  values = q.qvalue.astype(jnp.float32)
  if q.zero_point is not None:
    values = values - expand_scale(q.zero_point.astype(jnp.float32), q.tiles, q.shape)
  values = values * expand_scale(q.scale.astype(jnp.float32), q.tiles, q.shape)
  return values.astype(dtype or q.dtype)


def head_priority(key: jax.Array, *, lengths: jax.Array | None = None) -> jax.Array:
  """TurboAttention's head priority of ``key`` ``[B, T, H, D]``: ``[H]`` float32.

  ``gap[h, c] = max_t K - min_t K`` over batch and valid tokens, and
  ``priority[h] = mean_c(gap[h]) * std_c(gap[h])``: heads with wide and uneven
  channel ranges are the most sensitive to low-bit quantization.
  """
  _check_float(key, "key")
  if key.ndim != 4:
    raise ValueError(f"key must have rank 4 [batch, seq, heads, head_dim], got shape {key.shape}")
  k = key.astype(jnp.float32)
  if lengths is not None:
    valid = jnp.arange(k.shape[1])[None, :] < jnp.asarray(lengths)[:, None]
    valid = valid[:, :, None, None]
    hi = jnp.max(jnp.where(valid, k, -jnp.inf), axis=(0, 1))
    lo = jnp.min(jnp.where(valid, k, jnp.inf), axis=(0, 1))
    gap = jnp.where(jnp.isfinite(hi - lo), hi - lo, 0.0)
  else:
    gap = jnp.max(k, axis=(0, 1)) - jnp.min(k, axis=(0, 1))
  return jnp.mean(gap, axis=-1) * jnp.std(gap, axis=-1)


def assign_head_bits(priority: jax.Array, int2_heads: int, *, high_bits: int = 4,
                     low_bits: int = 2) -> jax.Array:
  """Bits per head: the ``int2_heads`` lowest-priority heads get ``low_bits``."""
  n = priority.shape[-1]
  if not 0 <= int2_heads <= n:
    raise ValueError(f"int2_heads must be in [0, {n}] for {n} heads, got {int2_heads}")
  rank = jnp.argsort(jnp.argsort(priority, stable=True), stable=True)  # 0 = lowest
  return jnp.where(rank < int2_heads, low_bits, high_bits).astype(jnp.int32)


def head_order(bits: jax.Array, low_bits: int = 2) -> jax.Array:
  """Slot order of heads: high-bit heads first, then low-bit, each ascending."""
  return jnp.argsort((bits == low_bits).astype(jnp.int32), stable=True).astype(jnp.int32)

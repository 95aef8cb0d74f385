"""Float inputs -> the FlashQ kernels' inputs (stage-1 quantization, layouts)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.gpu.quantize import channel_stats_reference
from turbojax.attention.base import Call
from turbojax.config import TurboConfig
from turbojax.kv_cache import QuantizedKVCache
from turbojax.quant import QArray, dequantize, quantize_int8_sym
from turbojax.quant.qarray import expand_scale


class PrefillInputs(NamedTuple):
  """Kernel-layout INT8 inputs (``[B, H, T, D]``; ``T`` padded to the tiles)."""

  q: jax.Array        # int8 [B, Hq, Tq, D]
  q_scale: jax.Array  # f32 [B, Hq, Tq], includes the softmax scale (exponent units)
  k: jax.Array        # int8 [B, Hk, Tk, D], smoothed
  k_scale: jax.Array  # f32 [B, Hk, Tk]
  v: jax.Array        # int8 [B, Hk, Tk, D]
  v_scale: jax.Array  # f32 [B, Hk, Tk // block_k]


def pad_axis(x, axis: int, multiple: int, value=0):
  n = x.shape[axis]
  extra = -n % multiple
  if not extra:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, extra)
  return jnp.pad(x, pads, constant_values=value)


def _token_scale(q: QArray) -> jax.Array:
  """Per-token scale ``[B, H, T]`` of a ``[B, T, H, D]`` QArray whose scale is
  constant over head_dim."""
  tiles = q.tiles[:3] + (1,)
  scale = expand_scale(q.scale.astype(jnp.float32), tiles, q.shape[:3] + (q.scale.shape[3],))
  return jnp.transpose(scale[..., 0], (0, 2, 1))


def _to_int8(x, block: int, per_token: bool) -> QArray:
  """INT8 QArray of ``x`` (``[B, T, N, H]``) padded to ``block`` tokens."""
  if isinstance(x, QArray):
    if x.qvalue.dtype != jnp.int8 or x.zero_point is not None or x.tiles[3] != x.shape[3]:
      raise ValueError("pre-quantized inputs must be symmetric INT8 QArrays with one "
                       "scale per head_dim vector (head_dim reduced)")
    return x
  x = pad_axis(x, 1, block)
  if per_token:
    return quantize_int8_sym(x, channelwise_axes=(0, 1, 2))
  return quantize_int8_sym(x, channelwise_axes=(0, 2), tiled_axes={1: block})


def migration_scale(q_absmax, k_absmax):
  """Per-channel power of two ``s`` (f32 ``[B, Hk, H]``) that moves K's outlier
  channels into Q: Q times ``s``, K divided by it, leave Q.K^T unchanged.

  SmoothQuant's balance with strength 1/2, ``s = sqrt(max|K| / max|Q|)`` per
  channel, rounded to a power of two so that both products are exact. K's
  channels with a large range then no longer set every tile's scale: on the
  design's outlier data block scales for K go from 4.6e-2 to 2.8e-2 (NumPy
  model, 1024 keys, 64-key blocks); unit-normal data is unchanged.
  ``q_absmax`` ``[B, Hq, H]`` is reduced over each KV head's query heads;
  channels where either max is 0 or not finite keep ``s = 1``. Inputs:
  ``quantize.channel_stats``' absmax (K's about its smoothing mean).
  """
  b, hq, d = q_absmax.shape
  hk = k_absmax.shape[1]
  q_absmax = jnp.max(q_absmax.reshape(b, hk, hq // hk, d), axis=2)
  ratio = k_absmax / q_absmax
  ok = jnp.isfinite(ratio) & (ratio > 0)
  log2_s = jnp.clip(jnp.round(0.5 * jnp.log2(jnp.where(ok, ratio, 1.0))), -32, 32)
  return jnp.exp2(log2_s)


def quantize_for_prefill(query, key, value, *, config: TurboConfig, block_q: int,
                         block_k: int, softmax_scale: float,
                         key_value_seq_lengths=None) -> PrefillInputs:
  """Float (or INT8 ``QArray``) ``[B, T, N, H]`` Q/K/V -> ``PrefillInputs``.

  Q gets one scale per head and token (a per-row factor in every kernel: free,
  and a non-finite query stays in its row), K one per head and ``block_k``
  tokens (or per token), V one per head and key tile. Unless pre-quantized, K
  is smoothed (``config.smooth_k``; keys past the lengths become 0) and its
  outlier channels move into Q (``config.qk_migration``, ``migration_scale``).
  """
  migrate = config.qk_migration and not isinstance(query, QArray)
  if not isinstance(key, QArray) and (config.smooth_k or migrate):
    mean, k_absmax = channel_stats_reference(key, key_value_seq_lengths,
                                             smooth=config.smooth_k, layout="bthd")
    key = key.astype(jnp.float32)
    if config.smooth_k:
      key = key - mean[:, None]
      if key_value_seq_lengths is not None:
        valid = jnp.arange(key.shape[1]) < jnp.asarray(key_value_seq_lengths)[:, None]
        key = jnp.where(valid[:, :, None, None], key, 0.0)
    if migrate:
      _, q_absmax = channel_stats_reference(query, smooth=False, layout="bthd")
      s = migration_scale(q_absmax, k_absmax)
      group = query.shape[2] // key.shape[2]
      query = query.astype(jnp.float32) * jnp.repeat(s, group, axis=1)[:, None]
      key = key / s[:, None]
  if isinstance(value, QArray):  # V's scale must follow the kernel's key tile
    value = dequantize(value, jnp.float32)

  q8 = _to_int8(query, block_q, per_token=True)
  k8 = _to_int8(key, block_k, config.per_token_scales)
  v8 = _to_int8(value, block_k, per_token=False)

  def layout(q: QArray, multiple):
    codes = pad_axis(jnp.transpose(q.qvalue, (0, 2, 1, 3)), 2, multiple)
    return codes, pad_axis(_token_scale(q), 2, multiple, value=1.0)

  q_codes, q_scale = layout(q8, block_q)
  k_codes, k_scale = layout(k8, block_k)
  v_codes = jnp.transpose(v8.qvalue, (0, 2, 1, 3))
  v_scale = jnp.transpose(v8.scale[..., 0], (0, 2, 1)).astype(jnp.float32)
  q_scale = q_scale * (softmax_scale * config.log2_base)
  return PrefillInputs(q_codes, q_scale, k_codes, k_scale, v_codes, v_scale)


def poison_nonfinite_kv(inputs: PrefillInputs) -> PrefillInputs:
  """``inputs`` with ``q_scale`` NaN on every row of a KV head whose K or V
  scale is not finite, so that the rows NaN/inf inputs reach are exactly the
  rows with a non-finite ``q_scale`` (conservatively: masks are not consulted).

  The scales carry non-finite inputs (see ``quantize_int8_sym``), but a
  kernel's max reductions need not propagate NaN, so the dispatch makes the
  rows explicit: every prefill kernel (and the reference) NaNs a row whose
  ``q_scale`` is not finite.
  """
  hq, hk = inputs.q_scale.shape[1], inputs.k_scale.shape[1]
  bad_kv = (jnp.any(~jnp.isfinite(inputs.k_scale), axis=-1)
            | jnp.any(~jnp.isfinite(inputs.v_scale), axis=-1))  # [B, Hk]
  bad = jnp.repeat(bad_kv, hq // hk, axis=1)[..., None]
  return inputs._replace(q_scale=jnp.where(bad, jnp.nan, inputs.q_scale))


def decode_with(kernel, query, cache: QuantizedKVCache, call: Call, sas=None):
  """Runs ``kernel`` (the reference's or a Pallas kernel's decode signature)
  once per bit width of the cache and puts the heads back in order.

  ``sas``: the exponent's parameters (default: the config's SAS).

  Query rows of KV slot ``h`` are its GQA query heads x new tokens; the new
  tokens sit at positions ``lengths - Tq + i`` (they are already cached), so
  attention is causal among them.
  """
  b, tq, hq, d = query.shape
  hk = cache.num_kv_heads
  g = hq // hk
  q = query.astype(jnp.float32).reshape(b, tq, hk, g, d)
  if cache.mixed:
    q = jnp.take(q, cache.head_perm, axis=2)
  q8 = quantize_int8_sym(q, channelwise_axes=(0, 1, 2, 3))
  rows = jnp.transpose(q8.qvalue, (0, 2, 3, 1, 4)).reshape(b, hk, g * tq, d)
  q_scale = jnp.transpose(q8.scale[..., 0], (0, 2, 3, 1)).reshape(b, hk, g * tq)
  q_scale = q_scale * (call.scale * call.config.log2_base)
  q_pos = cache.lengths[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)
  q_pos = jnp.tile(q_pos, (1, g))
  outs = []
  for seg, residual, bits, sl in zip(cache.segments, cache.residuals, cache.segment_bits,
                                     cache.segment_slices):
    outs.append(kernel(rows[:, sl], q_scale[:, sl], q_pos, seg, residual, cache.lengths,
                       bits=bits, group=cache.group_size,
                       sas=call.config.sas_params() if sas is None else sas))
  out = jnp.concatenate(outs, axis=1).reshape(b, hk, g, tq, d)
  if cache.mixed:
    out = jnp.take(out, jnp.argsort(cache.head_perm), axis=1)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, tq, hq, d)

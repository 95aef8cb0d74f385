"""Pure-JAX FlashQ attention: the algorithm every kernel is checked against.

These functions take exactly the kernels' inputs (INT8 codes, scales, packed
INT4/INT2 cache arrays) and run the same blockwise algorithm: int8 x int8 ->
int32 Q.K^T, the SAS online softmax, P quantized per row and key tile with a
dynamic scale, and an int8 P.V. They are also turbojax's ``"xla"`` backend, so
they are jit-compiled end to end and run on any platform.

Units: ``q_scale`` already holds the softmax scale (and ``log2 e`` when the SAS
base is 2), so ``q_scale * k_scale * (q8 . k8)`` is the logit in the exponent's
units. ``bias`` is in the same units.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.packing import codes_per_byte, unpack
from pallas_kernels.sas import SASParams


class PackedKV(NamedTuple):
  """One bit width's share of a progressive KV cache (``B, H, T, D`` = batch,
  KV heads of this width, capacity, head_dim; ``G`` = group size).

  K is grouped along tokens per channel, V along channels per token (KIVI):
    k_codes:  uint8 [B, H, T, D*bits/8]  packed stage-2 codes (split layout)
    k_scale2: uint8 [B, H, T/G, D]       integer stage-2 scale per group
    k_zero:   int8  [B, H, T/G, D]       integer stage-2 zero point
    k_scale:  bf16  [B, H, T]            stage-1 float scale per token
    v_codes:  uint8 [B, H, T, D*bits/8]
    v_scale2: uint8 [B, H, T, D/G]
    v_zero:   int8  [B, H, T, D/G]
    v_scale:  bf16  [B, H, T]
  The stage-1 value is ``(code - zero) * scale2`` (``common.stage2_decode``),
  the float value that times ``scale``.
  """

  k_codes: jax.Array
  k_scale2: jax.Array
  k_zero: jax.Array
  k_scale: jax.Array
  v_codes: jax.Array
  v_scale2: jax.Array
  v_zero: jax.Array
  v_scale: jax.Array


class ResidualKV(NamedTuple):
  """The INT8 (stage-1) residual window: ``[B, H, G, D]`` codes, ``[B, H, G]`` scales."""

  k: jax.Array
  k_scale: jax.Array
  v: jax.Array
  v_scale: jax.Array


def cache_specs(batch: int, heads: int, capacity: int, head_dim: int, *, bits: int,
                group: int) -> tuple[PackedKV, ResidualKV]:
  """``jax.ShapeDtypeStruct``s of one bit width's cache arrays (see ``PackedKV``)."""
  b, h, t, d = batch, heads, capacity, head_dim
  w, gv = d // codes_per_byte(bits), min(group, d)
  s = jax.ShapeDtypeStruct
  packed = PackedKV(
      s((b, h, t, w), jnp.uint8), s((b, h, t // group, d), jnp.uint8),
      s((b, h, t // group, d), jnp.int8), s((b, h, t), jnp.bfloat16),
      s((b, h, t, w), jnp.uint8), s((b, h, t, d // gv), jnp.uint8),
      s((b, h, t, d // gv), jnp.int8), s((b, h, t), jnp.bfloat16))
  residual = ResidualKV(s((b, h, group, d), jnp.int8), s((b, h, group), jnp.bfloat16),
                        s((b, h, group, d), jnp.int8), s((b, h, group), jnp.bfloat16))
  return packed, residual


def check_cache_shapes(packed: PackedKV, residual: ResidualKV, *, batch: int, heads: int,
                       head_dim: int, bits: int, group: int) -> None:
  """Raises ``ValueError`` naming the first cache array whose shape is not
  ``cache_specs``'s for these sizes (capacity from ``packed.k_codes``)."""
  t = packed.k_codes.shape[2]
  if t % group:
    raise ValueError(f"cache capacity {t=} must be a multiple of {group=}")
  want = cache_specs(batch, heads, t, head_dim, bits=bits, group=group)
  for kind, got, expected in zip(("packed", "residual"), (packed, residual), want):
    for name, x, spec in zip(got._fields, got, expected):
      if x.shape != spec.shape:
        raise ValueError(f"{kind}.{name} has shape {x.shape}, expected {spec.shape} "
                         f"for {bits=} {group=}")


def unpack_keys(packed: PackedKV, bits: int, group: int) -> jax.Array:
  """Stage-1 keys ``[B, H, T, D]`` (int32, ``common.stage2_decode``) from the packed cache."""
  codes = unpack(packed.k_codes, bits)
  scale2 = jnp.repeat(packed.k_scale2, group, axis=-2)
  zero = jnp.repeat(packed.k_zero, group, axis=-2)
  return common.stage2_decode(codes, scale2, zero)


def unpack_values(packed: PackedKV, bits: int, group: int) -> jax.Array:
  """Stage-1 values ``[B, H, T, D]`` (int32, ``common.stage2_decode``) from the packed cache."""
  codes = unpack(packed.v_codes, bits)
  head_dim = codes.shape[-1]
  g = min(group, head_dim)
  scale2 = jnp.repeat(packed.v_scale2, g, axis=-1)
  zero = jnp.repeat(packed.v_zero, g, axis=-1)
  return common.stage2_decode(codes, scale2, zero)


def _tiles(x, axis: int, n: int):
  """Splits ``axis`` into ``n`` equal tiles and moves the tile index to the front."""
  shape = x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1:]
  return jnp.moveaxis(x.reshape(shape), axis, 0)


class SoftmaxState(NamedTuple):
  m: jax.Array    # running row max, f32 [..., M]
  l: jax.Array    # running row sum of the quantized weights, f32 [..., M]
  acc: jax.Array  # unnormalized output, f32 [..., M, D]


def init_state(rows_shape, head_dim) -> SoftmaxState:
  return SoftmaxState(
      m=jnp.full(rows_shape, common.MASKED_MAX, jnp.float32),
      l=jnp.zeros(rows_shape, jnp.float32),
      acc=jnp.zeros(rows_shape + (head_dim,), jnp.float32))


def tile_update(state: SoftmaxState, s, keep, v8, v_scale, sas: SASParams,
                quantize_p: bool = True) -> SoftmaxState:
  """Folds one prefill key tile into the online-softmax state.

  ``s``: f32 logits ``[..., M, N]``; ``v8``: int8 ``[..., N, D]``; ``v_scale``:
  the tile's V scale, broadcastable to the rows ``[..., M]``.
  ``acc += (P_q @ V_q) * p_scale * v_scale``, and ``l`` sums exactly the
  quantized weights that were multiplied. ``quantize_p=False``: P enters the
  product rounded to bf16 instead of INT8 codes (a bf16 P.V on V's codes,
  ``l`` the f32 sum of P), the Mosaic GPU kernel's cheaper option.
  """
  m_new, alpha, p = common.online_softmax_update(state.m, s, keep, sas)
  if quantize_p:
    p_q, p_scale = common.quantize_rows(p)
    pv = common.int8_dot(p_q, v8, "...mn,...nd->...md").astype(jnp.float32)
    pv = pv * (p_scale * v_scale)[..., None]
    l_tile = jnp.sum(p_q.astype(jnp.float32), axis=-1) * p_scale
  else:
    p_bf16 = p.astype(jnp.bfloat16).astype(jnp.float32)
    pv = jnp.einsum("...mn,...nd->...md", p_bf16, v8.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
    pv = pv * v_scale[..., None]
    l_tile = jnp.sum(p, axis=-1)
  return SoftmaxState(
      m=m_new,
      l=state.l * alpha + l_tile,
      acc=state.acc * alpha[..., None] + pv)


def fold_key_scale2(q8, k_scale2):
  """Folds K's per-channel integer stage-2 scales into the query rows.

  ``q8``: int8 ``[..., M, D]``; ``k_scale2``: ``[..., D]``. Returns int8
  ``q2`` and the f32 row scale ``r`` with ``q8 * s2 ~ q2 * r``, so that
  ``q8 . ((code - z) * s2) ~ r * (q2 . code - q2 . z)``: the raw packed codes
  go straight into an int8 dot, and the zero point is one correction per row.
  """
  y = q8.astype(jnp.float32) * k_scale2.astype(jnp.float32)[..., None, :]
  (q2,), r = common.requantize_rows([y])
  return q2, r


def packed_key_logits(q8, q_scale, k_codes, k_scale2, k_zero, k_scale):
  """Logits of a packed K tile: ``[..., M, N]`` f32 in the exponent's units.

  ``k_codes``: unpacked stage-2 codes ``[..., N, D]`` (0..2**bits-1);
  ``k_scale2``/``k_zero``: ``[..., D]`` (this tile's group); ``k_scale``:
  stage-1 per-token scales ``[..., N]``.
  """
  q2, r = fold_key_scale2(q8, k_scale2)
  s = common.int8_dot(q2, k_codes.astype(jnp.int8), "...md,...nd->...mn")
  s = s.astype(jnp.float32) - common.zero_point_correction(q2, k_zero)[..., None]
  return s * (r * q_scale)[..., None] * k_scale.astype(jnp.float32)[..., None, :]


def decode_tile_update(state: SoftmaxState, s, keep, v_codes, v_scale, sas: SASParams,
                       v_scale2=None, v_zero=None) -> SoftmaxState:
  """Folds one decode key tile into the online-softmax state.

  ``s``: f32 logits ``[..., M, N]``; ``v_codes``: ``[..., N, D]`` INT8 values
  (the residual window) or unpacked stage-2 codes with ``v_scale2``/``v_zero``
  ``[..., N, D / Gv]`` per (token, channel group); ``v_scale``: per-token
  stage-1 scales ``[..., N]``.
  Per channel group, V's per-token scales (stage 1 and 2) are folded into P
  before P is quantized per row, and the zero point is one correction per row:
  ``acc_g += (P_g . codes_g - P_g . z_g) * p_scale_g`` with int8 dots on the
  raw codes. ``l`` sums the unquantized weights ``p``.
  """
  m_new, alpha, p = common.online_softmax_update(state.m, s, keep, sas)
  head_dim = v_codes.shape[-1]
  n_groups = 1 if v_scale2 is None else v_scale2.shape[-1]
  gv = head_dim // n_groups
  v_scale = v_scale.astype(jnp.float32)
  pvs = []
  for g in range(n_groups):
    w = v_scale if v_scale2 is None else v_scale * v_scale2[..., g].astype(jnp.float32)
    p_q, p_scale = common.quantize_rows(p * w[..., None, :])
    codes = v_codes[..., g * gv:(g + 1) * gv].astype(jnp.int8)
    pv = common.int8_dot(p_q, codes, "...mn,...nd->...md").astype(jnp.float32)
    if v_zero is not None:
      pv = pv - common.zero_point_correction(p_q, v_zero[..., g])[..., None]
    pvs.append(pv * p_scale[..., None])
  pv = pvs[0] if n_groups == 1 else jnp.concatenate(pvs, axis=-1)
  return SoftmaxState(
      m=m_new,
      l=state.l * alpha + jnp.sum(p, axis=-1),
      acc=state.acc * alpha[..., None] + pv)


def finalize(state: SoftmaxState, q_scale=None) -> jax.Array:
  """``acc / l``, with 0 for rows that saw no key and, given the rows'
  ``q_scale`` (``[..., rows, 1]``, broadcast against ``acc``), NaN for rows
  whose scale is not finite: how the dispatch marks the rows that NaN/inf
  inputs reach (``common.finite_rows``; a kernel's max need not propagate NaN)."""
  l = state.l[..., None]
  out = jnp.where(l == 0, 0.0, state.acc / jnp.where(l == 0, 1.0, l))
  if q_scale is None:
    return out
  return jnp.where(common.finite_rows(q_scale), out, jnp.nan)


def flashq_prefill_reference(
    q, q_scale, k, k_scale, v, v_scale, *, block_k: int, sas: SASParams,
    causal: bool = False, query_offset=0, q_lengths=None, kv_lengths=None,
    local_window=None, bias=None, mask=None, return_residuals: bool = False,
    quantize_p: bool = True):
  """FlashQ prefill over INT8 Q/K/V.

  Args:
    q: int8 [B, Hq, Tq, D]; q_scale: f32 [B, Hq, Tq] (per token; block scales
      repeated), including the softmax scale in the exponent's units.
    k: int8 [B, Hk, Tk, D] (K smoothed); k_scale: f32 [B, Hk, Tk].
    v: int8 [B, Hk, Tk, D]; v_scale: f32 [B, Hk, Tk // block_k] (per key tile).
    block_k: key tile; ``Tk`` must be a multiple of it.
    causal: keep keys at positions ``<= query_offset + i`` for query ``i``.
    query_offset: int or int32 [B], position of query 0 among the keys.
    q_lengths, kv_lengths: optional int32 [B] valid lengths.
    local_window: optional ``(left, right)``.
    bias: optional f32 broadcastable to [B, Hq, Tq, Tk], exponent units.
    mask: optional bool broadcastable to [B, Hq, Tq, Tk], True keeps.
    quantize_p: P as INT8 codes (default) or rounded to bf16 (``tile_update``).
  Returns:
    f32 [B, Hq, Tq, D] (rows with no visible key are 0, rows whose ``q_scale``
    is NaN/inf are NaN), and with ``return_residuals`` also ``(m, l)`` f32
    [B, Hq, Tq].
  """
  b, hq, tq, d = q.shape
  hk, tk = k.shape[1], k.shape[2]
  if tk % block_k:
    raise ValueError(f"{tk=} must be a multiple of {block_k=}")
  g = hq // hk
  nk = tk // block_k
  q5 = q.reshape(b, hk, g, tq, d)
  qs5 = q_scale.astype(jnp.float32).reshape(b, hk, g, tq)
  offset = jnp.broadcast_to(jnp.asarray(query_offset, jnp.int32), (b,))
  q_pos = offset[:, None] + jnp.arange(tq, dtype=jnp.int32)[None, :]  # [B, Tq]
  q_pos = q_pos[:, None, None, :]
  q_len = None if q_lengths is None else (
      jnp.asarray(q_lengths, jnp.int32) + offset)[:, None, None, None, None]
  kv_len = None if kv_lengths is None else (
      jnp.asarray(kv_lengths, jnp.int32)[:, None, None, None, None])

  def as5(x):  # user bias/mask -> [B, Hk, g, Tq, Tk]
    return jnp.broadcast_to(x, (b, hq, tq, tk)).reshape(b, hk, g, tq, tk)

  xs = {
      "k": _tiles(k, 2, nk), "k_scale": _tiles(k_scale.astype(jnp.float32), 2, nk),
      "v": _tiles(v, 2, nk), "v_scale": jnp.moveaxis(v_scale.astype(jnp.float32), -1, 0),
      "k_pos": jnp.arange(tk, dtype=jnp.int32).reshape(nk, block_k),
  }
  if bias is not None:
    xs["bias"] = _tiles(as5(bias.astype(jnp.float32)), 4, nk)
  if mask is not None:
    xs["mask"] = _tiles(as5(mask), 4, nk)

  def body(state, x):
    s = common.int8_dot(q5, x["k"][:, :, None], "bhgqd,bhgkd->bhgqk")
    s = s.astype(jnp.float32) * qs5[..., None] * x["k_scale"][:, :, None, None, :]
    if bias is not None:
      s = s + x["bias"]
    keep = common.attention_mask(
        q_pos, x["k_pos"], causal=causal, local_window=local_window,
        q_len=q_len, kv_len=kv_len)
    if mask is not None:
      keep &= x["mask"]
    state = tile_update(state, s, keep, x["v"][:, :, None],
                        x["v_scale"][:, :, None, None], sas, quantize_p)
    return state, None

  state, _ = jax.lax.scan(body, init_state((b, hk, g, tq), d), xs)
  out = finalize(state, qs5[..., None]).reshape(b, hq, tq, d)
  if return_residuals:
    return out, (state.m.reshape(b, hq, tq), state.l.reshape(b, hq, tq))
  return out


def flashq_decode_reference(
    q, q_scale, q_pos, packed: PackedKV, residual: ResidualKV, lengths, *,
    bits: int, group: int, sas: SASParams, return_residuals: bool = False):
  """Attention of a few new query rows over a progressive INT4/INT2 cache.

  Args:
    q: int8 [B, H, M, D], the query rows of each KV head (GQA group x tokens);
      q_scale: f32 [B, H, M] including the softmax scale.
    q_pos: int32 [B, M], the position of each row (causal: keys ``<= q_pos``).
    packed, residual: the cache arrays of these heads (see ``PackedKV``).
    lengths: int32 [B], tokens in the cache; ``(lengths // group) * group`` are
      packed, the remaining ``lengths % group`` are in the residual window.
  Returns:
    f32 [B, H, M, D] and, with ``return_residuals``, ``(m, l)``.
  Every cached token is attended exactly once: packed tiles first (one per
  stage-2 group; ``packed_key_logits`` and ``decode_tile_update`` with the
  stage-2 scales folded into Q and P, so the raw codes meet int8 dots), then
  the INT8 residual window.
  """
  codes_per_byte(bits)
  b, h, m, d = q.shape
  t_max = packed.k_codes.shape[2]
  n_tiles = t_max // group
  lengths = jnp.asarray(lengths, jnp.int32)
  packed_len = (lengths // group) * group
  qf = q_scale.astype(jnp.float32)
  q_pos = q_pos[:, None, :]  # [B, 1, M]

  xs = dict(
      k_codes=_tiles(unpack(packed.k_codes, bits), 2, n_tiles),
      k_scale2=jnp.moveaxis(packed.k_scale2, 2, 0),
      k_zero=jnp.moveaxis(packed.k_zero, 2, 0),
      k_scale=_tiles(packed.k_scale, 2, n_tiles),
      v_codes=_tiles(unpack(packed.v_codes, bits), 2, n_tiles),
      v_scale2=_tiles(packed.v_scale2, 2, n_tiles),
      v_zero=_tiles(packed.v_zero, 2, n_tiles),
      v_scale=_tiles(packed.v_scale, 2, n_tiles),
      k_pos=jnp.arange(t_max, dtype=jnp.int32).reshape(n_tiles, group))

  def body(state, x):
    s = packed_key_logits(q, qf, x["k_codes"], x["k_scale2"], x["k_zero"], x["k_scale"])
    keep = common.attention_mask(q_pos, jnp.broadcast_to(x["k_pos"], (b, 1, group)),
                                 causal=True, local_window=None,
                                 kv_len=packed_len[:, None, None, None])
    return decode_tile_update(state, s, keep, x["v_codes"], x["v_scale"], sas,
                              x["v_scale2"], x["v_zero"]), None

  state, _ = jax.lax.scan(body, init_state((b, h, m), d), xs)
  state = _attend_residual(state, q, qf, q_pos, residual, lengths, group=group, sas=sas)
  out = finalize(state)
  if return_residuals:
    return out, (state.m, state.l)
  return out


def _attend_residual(state, q, q_scale, q_pos, residual: ResidualKV, lengths, *,
                     group: int, sas: SASParams) -> SoftmaxState:
  """Folds the INT8 residual window (tokens ``[packed_len, length)``) into ``state``.

  ``q_scale``: f32 [B, H, M]; ``q_pos``: int32 [B, 1, M].
  """
  packed_len = (lengths // group) * group
  res_pos = packed_len[:, None, None] + jnp.arange(group, dtype=jnp.int32)  # [B,1,G]
  s = common.int8_dot(q, residual.k, "bhmd,bhnd->bhmn").astype(jnp.float32)
  s = s * q_scale[..., None] * residual.k_scale.astype(jnp.float32)[:, :, None, :]
  keep = common.attention_mask(q_pos, res_pos, causal=True, local_window=None,
                               kv_len=lengths[:, None, None, None])
  return decode_tile_update(state, s, keep, residual.v, residual.v_scale, sas)


def residual_window_partial(q, q_scale, q_pos, residual: ResidualKV, lengths, *,
                            group: int, sas: SASParams):
  """The residual window alone as a normalized partial ``(out, m, l)``, for
  ``combine_partial_results`` with split-K partials over the packed tiles."""
  b, h, m, d = q.shape
  state = _attend_residual(init_state((b, h, m), d), q, q_scale.astype(jnp.float32),
                           q_pos[:, None, :], residual, jnp.asarray(lengths, jnp.int32),
                           group=group, sas=sas)
  return finalize(state), state.m, state.l


def combine_partial_results(outs, ms, ls, *, base: float = 2.0):
  """Merges normalized partials ``(out_i, m_i, l_i)`` over disjoint key sets.

  ``out_i``: [..., M, D]; ``m_i``, ``l_i``: [..., M] in the exponent's units of
  ``base``, as returned with ``return_residuals``. Returns ``(out, m, l)``; rows
  that no partial saw stay 0.
  """
  ms = jnp.stack(ms)
  ls = jnp.stack(ls)
  m = jnp.max(ms, axis=0)
  w = ls * jnp.exp2((ms - m) * jnp.log2(base))
  l = jnp.sum(w, axis=0)
  out = sum(o * wi[..., None] for o, wi in zip(outs, w))
  out = jnp.where(l[..., None] == 0, 0.0, out / jnp.where(l == 0, 1.0, l)[..., None])
  return out, m, l

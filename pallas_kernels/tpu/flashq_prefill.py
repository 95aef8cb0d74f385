"""FlashQ prefill attention for TPU (Pallas, Mosaic TPU backend).

INT8 Q, K and V (stage 1 of FlashQ); ``Q.K^T`` and ``P.V`` are int8 x int8 ->
int32 matmuls on the MXU; the softmax is the SAS exponent on the VPU
(``common.online_softmax_update``) with P quantized per row and key tile
(``common.quantize_rows``). The algorithm, tile by tile, is
``reference.flashq_prefill_reference``: the kernel folds each key tile into the
online-softmax state with ``reference.tile_update`` itself, so the two cannot
round differently.

Grid ``(batch, kv_heads, q_blocks, k_blocks)``: the ``g = Hq / Hk`` query heads
of one KV head form one ``[g * block_q, D]`` LHS (GQA: each K/V tile is read
from HBM once per q block, and the MXU sees ``g`` times more rows). The key
axis is innermost and "arbitrary" (the softmax state lives in VMEM scratch),
the rest "parallel" (megacore / multi-core sharding). ``query_offset``, the
query lengths and the key lengths are scalar-prefetched into SMEM: the index
maps clamp the K/V block index to the visible range, so skipped tiles (past
the lengths, above the causal diagonal, outside the local window) cost neither
a DMA nor compute.

Layouts (``pallas_kernels`` conventions): ``q`` int8 ``[B, Hq, Tq, D]`` with a
per-token f32 ``q_scale`` (softmax scale folded in, exponent units); ``k`` int8
``[B, Hk, Tk, D]`` with per-token ``k_scale``; ``v`` int8 ``[B, Hk, Tk, D]``
(not transposed on TPU) with one scale per key tile, ``[B, Hk, Tk // block_k]``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels import compat
from pallas_kernels import reference
from pallas_kernels.sas import SASParams

NUM_LANES = 128
NUM_SUBLANES = 8
# int8 packs 4 rows per 32-bit sublane: int8 row blocks are multiples of 32.
INT8_SUBLANES = 32
# Target rows of the fused GQA LHS (g * block_q) for the default block_q.
DEFAULT_ROWS = 512
DEFAULT_BLOCK_K = 128
MAX_BLOCK_Q = 256
_NT_DIMS = (((1,), (1,)), ((), ()))  # [M, D] x [N, D] -> [M, N]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BlockSizes:
  """Tiles of the TPU prefill kernel.

  Attributes:
    block_q: query rows per grid step and per query head (multiple of 32:
      int8 sublane tiling). The kernel's LHS has ``g * block_q`` rows.
    block_k: keys per grid step (multiple of 128: the logits' lane axis). It
      is also FlashQ's V-scale tile: ``v_scale`` has ``Tk // block_k`` entries,
      so choose it before quantizing V.
  """

  block_q: int = 128
  block_k: int = DEFAULT_BLOCK_K

  def __post_init__(self):
    if self.block_q <= 0 or self.block_q % INT8_SUBLANES:
      raise ValueError(
          f"{self.block_q=} must be a positive multiple of {INT8_SUBLANES}")
    if self.block_k <= 0 or self.block_k % NUM_LANES:
      raise ValueError(
          f"{self.block_k=} must be a positive multiple of {NUM_LANES}")

  @classmethod
  def get_default(cls, *, head_dim: int, seq_len_q: int, seq_len_k: int,
                  num_q_heads_per_kv_head: int = 1) -> BlockSizes:
    """Default tiles; callable before quantizing (``block_k`` = V-scale tile).

    ``block_q`` is clamped to the (32-rounded) query length and chosen so the
    fused GQA LHS has about ``DEFAULT_ROWS`` rows; ``block_k`` is 128 (the
    finest V-scale tile the lane width allows).
    """
    del head_dim, seq_len_k  # The same tiles serve D=64/128 and any Tk.
    g = max(1, num_q_heads_per_kv_head)
    block_q = max(INT8_SUBLANES, min(MAX_BLOCK_Q, DEFAULT_ROWS // g))
    block_q = block_q // INT8_SUBLANES * INT8_SUBLANES
    block_q = min(block_q, common.cdiv(max(seq_len_q, 1), INT8_SUBLANES) * INT8_SUBLANES)
    return cls(block_q=block_q, block_k=DEFAULT_BLOCK_K)


def _visible_k_blocks(off, q_len, kv_len, qi, *, block_q, block_k, causal,
                      local_window):
  """``(lo, hi, q_valid)``: key blocks ``lo..hi`` hold every key that a valid
  row of query block ``qi`` may see (scalar int32 math, SMEM values).

  ``q_len`` counts rows (not positions); ``hi < lo`` when nothing is visible.
  """
  q_first = off + qi * block_q
  q_last = off + jnp.minimum(qi * block_q + block_q, q_len) - 1
  k_min = jnp.int32(0)
  k_max = kv_len - 1
  if causal:
    k_max = jnp.minimum(k_max, q_last)
  if local_window is not None:
    left, right = local_window
    k_min = jnp.maximum(k_min, q_first - left)
    k_max = jnp.minimum(k_max, q_last + right)
  lo = jax.lax.div(k_min, jnp.int32(block_k))  # k_min >= 0: floor == trunc
  hi = jnp.where(k_max >= 0, jax.lax.div(jnp.maximum(k_max, 0), jnp.int32(block_k)), -1)
  return lo, hi, qi * block_q < q_len


def _interior_tile(off, q_len, kv_len, qi, ki, *, block_q, block_k, causal,
                   local_window):
  """Whether every (row, key) of tile ``(qi, ki)`` is visible (scalar math).

  Such tiles skip the mask; the result is identical, since the reference's
  mask is all True there.
  """
  q_first = off + qi * block_q
  q_last = q_first + block_q - 1
  k_first = ki * block_k
  k_last = k_first + block_k - 1
  full = (qi * block_q + block_q <= q_len) & (k_last < kv_len)
  if causal:
    full &= k_last <= q_first
  if local_window is not None:
    left, right = local_window
    full &= (k_first >= q_last - left) & (k_last <= q_first + right)
  return full


def _prefill_kernel(
    off_ref,     # SMEM int32 [B]  query_offset
    q_len_ref,   # SMEM int32 [B]  valid query rows
    kv_len_ref,  # SMEM int32 [B]  valid keys
    q_ref,       # int8 [g, block_q, D]
    qs_ref,      # f32  [g, block_q, 1]
    k_ref,       # int8 [block_k, D]
    ks_ref,      # f32  [1, block_k]
    v_ref,       # int8 [block_k, D]
    vs_ref,      # SMEM f32 [1, num_k_blocks]  V scale per key tile
    o_ref,       # f32  [g, block_q, D]
    *refs,       # (m_out [g, block_q, 128], l_out [g, block_q, 128])?, scratch
    sas: SASParams,
    causal: bool,
    local_window,
    return_residuals: bool,
):
  if return_residuals:
    m_out_ref, l_out_ref, m_sc, l_sc, acc_sc = refs
  else:
    m_sc, l_sc, acc_sc = refs  # f32 [R, 128], [R, 128] (lane-replicated), [R, D]
  b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  g, block_q, head_dim = q_ref.shape
  block_k = k_ref.shape[0]
  rows = g * block_q

  @pl.when(ki == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, common.MASKED_MAX, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  off, q_len, kv_len = off_ref[b], q_len_ref[b], kv_len_ref[b]
  lo, hi, q_valid = _visible_k_blocks(
      off, q_len, kv_len, qi, block_q=block_q, block_k=block_k, causal=causal,
      local_window=local_window)

  def tile(masked: bool):
    q = q_ref[...].reshape(rows, head_dim)
    s = jax.lax.dot_general(q, k_ref[...], _NT_DIMS,
                            preferred_element_type=jnp.int32)  # [R, block_k]
    qs = qs_ref[...].reshape(rows, 1)
    s = s.astype(jnp.float32) * qs * ks_ref[...]
    if masked:
      # Positions as 1-D vectors (rows: token index within the q block, the
      # g heads stacked; columns: key index), for common.attention_mask.
      row = jax.lax.broadcasted_iota(jnp.int32, (rows, NUM_LANES), 0)
      tok = row
      for j in range(1, g):
        tok = jnp.where(row >= j * block_q, row - j * block_q, tok)
      q_pos = jnp.max(tok, axis=1) + (off + qi * block_q)             # [R]
      col = jax.lax.broadcasted_iota(jnp.int32, (NUM_SUBLANES, block_k), 1)
      k_pos = jnp.max(col, axis=0) + ki * block_k                     # [block_k]
      keep = common.attention_mask(
          q_pos, k_pos, causal=causal, local_window=local_window,
          q_len=q_len + off, kv_len=kv_len)
    else:
      keep = True  # Interior tile: every (row, key) is visible; no mask work.
    state = reference.SoftmaxState(
        m=jnp.max(m_sc[...], axis=1), l=jnp.max(l_sc[...], axis=1),
        acc=acc_sc[...])
    state = reference.tile_update(state, s, keep, v_ref[...], vs_ref[0, ki], sas)
    m_sc[...] = jnp.broadcast_to(state.m[:, None], m_sc.shape)
    l_sc[...] = jnp.broadcast_to(state.l[:, None], l_sc.shape)
    acc_sc[...] = state.acc

  visible = q_valid & (ki >= lo) & (ki <= hi)
  interior = _interior_tile(off, q_len, kv_len, qi, ki, block_q=block_q,
                            block_k=block_k, causal=causal,
                            local_window=local_window)
  pl.when(visible & interior)(functools.partial(tile, False))
  pl.when(visible & jnp.logical_not(interior))(functools.partial(tile, True))

  @pl.when(ki == pl.num_programs(3) - 1)
  def _store():
    state = reference.SoftmaxState(
        m=jnp.max(m_sc[...], axis=1), l=jnp.max(l_sc[...], axis=1),
        acc=acc_sc[...])
    o_ref[...] = reference.finalize(state, qs_ref[...].reshape(rows, 1)).reshape(o_ref.shape)
    if return_residuals:
      m_out_ref[...] = m_sc[...].reshape(m_out_ref.shape)
      l_out_ref[...] = l_sc[...].reshape(l_out_ref.shape)


def _lengths(x, batch, default):
  if x is None:
    return jnp.full((batch,), default, jnp.int32)
  return jnp.broadcast_to(jnp.asarray(x, jnp.int32), (batch,))


def flashq_prefill(
    q, q_scale, k, k_scale, v, v_scale, *, sas: SASParams, causal: bool = False,
    query_offset=0, q_lengths=None, kv_lengths=None, local_window=None,
    block_sizes: BlockSizes | None = None, interpret=False,
    return_residuals: bool = False):
  """FlashQ prefill on TPU; same inputs and outputs as ``flashq_prefill_reference``.

  Args:
    q: int8 [B, Hq, Tq, D]; ``Tq`` a multiple of ``block_q`` (pad and pass
      ``q_lengths``). q_scale: f32 [B, Hq, Tq], softmax scale folded in.
    k: int8 [B, Hk, Tk, D] (``Hq % Hk == 0``; ``Tk`` a multiple of
      ``block_k``); k_scale: f32 [B, Hk, Tk].
    v: int8 [B, Hk, Tk, D]; v_scale: f32 [B, Hk, Tk // block_k].
    sas: the SAS exponent parameters (``sas.dtype`` is the polynomial's dtype).
    causal: keys at positions ``<= query_offset + i`` for query row ``i``.
    query_offset: int or int32 [B].
    q_lengths, kv_lengths: optional int32 [B] valid rows / keys.
    local_window: optional ``(left, right)`` ints.
    block_sizes: tiles; ``block_k`` must be the tile ``v_scale`` was made with.
    interpret: run in the Pallas TPU interpreter (``True`` or a
      ``pltpu.InterpretParams``); for CPU tests.
    return_residuals: also return ``(m, l)`` f32 [B, Hq, Tq].
  Returns:
    f32 [B, Hq, Tq, D] (rows with no visible key are 0) [, (m, l)].
  """
  if not sas.exact and sas.base != 2.0:
    raise NotImplementedError(
        "the TPU kernels support the base-2 SAS exponent (or exact=True); the "
        "base-e table is a gather that Mosaic TPU does not lower")
  b, hq, tq, d = q.shape
  _, hk, tk, dk = k.shape
  if dk != d or v.shape != k.shape:
    raise ValueError(f"shape mismatch: {q.shape=} {k.shape=} {v.shape=}")
  if hq % hk:
    raise ValueError(f"{hq=} must be a multiple of {hk=}")
  if q.dtype != jnp.int8 or k.dtype != jnp.int8 or v.dtype != jnp.int8:
    raise ValueError(f"q, k, v must be int8, got {q.dtype}, {k.dtype}, {v.dtype}")
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(
        head_dim=d, seq_len_q=tq, seq_len_k=tk, num_q_heads_per_kv_head=hq // hk)
  block_q, block_k = block_sizes.block_q, block_sizes.block_k
  if tq % block_q:
    raise ValueError(f"{tq=} must be a multiple of {block_q=} (pad the queries)")
  if tk % block_k:
    raise ValueError(f"{tk=} must be a multiple of {block_k=} (pad the keys)")
  nq, nk = tq // block_q, tk // block_k
  if v_scale.shape != (b, hk, nk):
    raise ValueError(f"{v_scale.shape=} must be {(b, hk, nk)} (one per key tile)")
  if local_window is not None:
    local_window = tuple(int(w) for w in local_window)
  g = hq // hk
  rows = g * block_q

  off = _lengths(query_offset, b, 0)
  q_len = _lengths(q_lengths, b, tq)
  kv_len = _lengths(kv_lengths, b, tk)
  visible = functools.partial(_visible_k_blocks, block_q=block_q,
                              block_k=block_k, causal=causal,
                              local_window=local_window)

  def q_map(bi, hi, qi, ki, off_ref, q_len_ref, kv_len_ref):
    del ki, off_ref, q_len_ref, kv_len_ref
    return bi, hi, 0, qi, 0

  def kv_block(bi, qi, ki, off_ref, q_len_ref, kv_len_ref):
    # Skipped steps re-use a visible block index, so they issue no DMA.
    lo, hi, _ = visible(off_ref[bi], q_len_ref[bi], kv_len_ref[bi], qi)
    return jnp.clip(jnp.clip(ki, lo, jnp.maximum(hi, lo)), 0, nk - 1)

  def kv_map(bi, hi, qi, ki, *scalars):
    return bi, hi, kv_block(bi, qi, ki, *scalars), 0

  def ks_map(bi, hi, qi, ki, *scalars):
    return bi, hi, 0, kv_block(bi, qi, ki, *scalars)

  def vs_map(bi, hi, qi, ki, *scalars):
    del qi, ki, scalars
    return bi, hi, 0, 0

  smem = compat.TPU_SMEM
  in_specs = [
      pl.BlockSpec((None, None, g, block_q, d), q_map),
      pl.BlockSpec((None, None, g, block_q, 1), q_map),
      pl.BlockSpec((None, None, block_k, d), kv_map),
      pl.BlockSpec((None, None, 1, block_k), ks_map),
      pl.BlockSpec((None, None, block_k, d), kv_map),
      pl.BlockSpec((None, None, 1, nk), vs_map, memory_space=smem),
  ]
  out_shape = [jax.ShapeDtypeStruct((b, hk, g, tq, d), jnp.float32)]
  out_specs = [pl.BlockSpec((None, None, g, block_q, d), q_map)]
  if return_residuals:
    for _ in range(2):
      out_shape.append(jax.ShapeDtypeStruct((b, hk, g, tq, NUM_LANES), jnp.float32))
      out_specs.append(pl.BlockSpec((None, None, g, block_q, NUM_LANES), q_map))
  vmem = compat.TPU_VMEM
  scratch_shapes = [vmem((rows, NUM_LANES), jnp.float32),
                    vmem((rows, NUM_LANES), jnp.float32),
                    vmem((rows, d), jnp.float32)]

  kernel = functools.partial(
      _prefill_kernel, sas=sas, causal=causal, local_window=local_window,
      return_residuals=return_residuals)
  flops = 4 * b * hq * tq * tk * d
  if causal:
    flops //= 2
  bytes_accessed = (q.size + q_scale.size * 4 + nq * (2 * k.size + k_scale.size * 4)
                    + b * hq * tq * d * 4)
  outs = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid_spec=compat.TPU_PREFETCH_SCALAR_GRID_SPEC(
          num_scalar_prefetch=3,
          grid=(b, hk, nq, nk),
          in_specs=in_specs,
          out_specs=out_specs,
          scratch_shapes=scratch_shapes),
      compiler_params=compat.tpu_compiler_params(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=flops, bytes_accessed=int(bytes_accessed),
          transcendentals=b * hq * tq * tk if sas.exact else 0),
      interpret=compat.tpu_interpret(interpret),
      name="flashq_prefill_tpu",
  )(off, q_len, kv_len,
    q.reshape(b, hk, g, tq, d),
    q_scale.astype(jnp.float32).reshape(b, hk, g, tq, 1),
    k,
    k_scale.astype(jnp.float32).reshape(b, hk, 1, tk),
    v,
    v_scale.astype(jnp.float32).reshape(b, hk, 1, nk))
  out = outs[0].reshape(b, hq, tq, d)
  if return_residuals:
    m = outs[1][..., 0].reshape(b, hq, tq)
    l = outs[2][..., 0].reshape(b, hq, tq)
    return out, (m, l)
  return out


def flashq_prefill_reference(
    q, q_scale, k, k_scale, v, v_scale, *, sas: SASParams, causal: bool = False,
    query_offset=0, q_lengths=None, kv_lengths=None, local_window=None,
    block_sizes: BlockSizes | None = None, interpret=False,
    return_residuals: bool = False):
  """``flashq_prefill``'s inputs into ``reference.flashq_prefill_reference``."""
  del interpret
  b, hq, tq, d = q.shape
  hk, tk = k.shape[1], k.shape[2]
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(
        head_dim=d, seq_len_q=tq, seq_len_k=tk, num_q_heads_per_kv_head=hq // hk)
  return reference.flashq_prefill_reference(
      q, q_scale, k, k_scale, v, v_scale, block_k=block_sizes.block_k, sas=sas,
      causal=causal, query_offset=query_offset, q_lengths=q_lengths,
      kv_lengths=kv_lengths, local_window=local_window,
      return_residuals=return_residuals)

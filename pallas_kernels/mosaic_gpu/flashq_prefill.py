"""FlashQ prefill attention for Hopper in Pallas Mosaic GPU (``plgpu``).

The algorithm of ``pallas_kernels.reference.flashq_prefill_reference`` (same
entry-point contract as ``pallas_kernels.gpu.flashq_prefill``: V transposed),
laid out like JAX's FlashAttention-3 example (``attention_mgpu``):

* one CTA per (query head, 2 * ``block_q`` query rows, batch; causal: query
  blocks in reverse, so the CTAs with the most key tiles start first), three
  warpgroups: two compute warpgroups of ``block_q`` = 64 rows each and one
  memory warpgroup that streams K/V tiles (with their scales) through a
  ``max_concurrent_steps``-deep ring of shared-memory slots with TMA;
* per key tile, on each compute warpgroup::

    s    = wgmma(q8 [SMEM], k8^T [SMEM]) -> s32            (int8 tensor cores)
    t    = f32(s) * k_scale[col]                           (logits / q_scale[row])
    m, alpha, p = SAS online-softmax update of q_scale * t  (``online_softmax``)
    p8, p_scale = per-row dynamic INT8 quantization of p    (``quantize_rows``)
    p8  -> SMEM (swizzled), fence
    pv   = wgmma(p8 [SMEM], v_t8^T [SMEM]) -> s32          (int8 tensor cores)
    acc  = acc * alpha + f32(pv) * p_scale * v_scale[tile]
    l    = l * alpha + sum(p8) * p_scale

  8-bit ``wgmma`` needs K-major operands in shared memory for B (and an s32
  accumulator), so both dots read K and ``v_t`` tiles as stored (rows of
  ``head_dim`` resp. ``block_k`` bytes, 128- or 64-byte swizzle); P goes
  through shared memory because Mosaic GPU has no relayout from the
  accumulator layout to the 8-bit A-operand register layout. With
  ``BlockSizes(pv_dtype="bfloat16")`` (tuned on for H100) P.V is instead a bf16
  wgmma on the same integer codes (exact in bf16): P from registers, V's codes
  as bf16, accumulating into ``acc`` in place (``acc`` kept in units of the
  tile's ``p_scale * v_scale``, the ratio folded into the ``alpha`` rescale),
  and with ``quantize_p=False`` (tuned on for the H200) P enters that wgmma as
  bf16 values instead of INT8 codes;
* the two compute warpgroups ping-pong through a schedule barrier, so one
  warpgroup's softmax overlaps the other's matmuls.

Causal masking and per-sequence ``kv_lengths`` / ``q_lengths`` /
``query_offset`` only mask the tiles that straddle a boundary; tiles past the
causal diagonal or ``kv_lengths`` are never visited. GQA: query head ``h``
reads KV head ``h // (Hq // Hk)``.

The in-kernel SAS exponent and row quantization are ``pallas_kernels.gpu.softmax``'s,
re-spelled without ``floor`` (Mosaic GPU has none) and, by default, with exact
integer <-> float conversions on the FMA/ALU pipes instead of the convert unit
(``BlockSizes.convert``).

``python3 -m pallas_kernels.mosaic_gpu.flashq_prefill`` checks the compiled
kernel against the reference and times its variants against cuDNN (``main``);
notes in ``benchmarks/results/mosaic_gpu_notes.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common, compat, tuned_block_sizes
from pallas_kernels.sas import SASParams
from pallas_kernels.gpu import flashq_prefill as gpu_flashq_prefill
from pallas_kernels.gpu.softmax import (
    broadcast_cols, broadcast_rows, i32_to_f32, online_softmax, online_softmax_tile_scale,
    quantize_rows, rescale_to_tile_unit)

plgpu = compat.plmgpu

KERNEL_NAME = "mosaic_gpu_flashq_prefill"
NUM_COMPUTE_WGS = 2
WGMMA_M = 64  # Hopper's wgmma M; one compute warpgroup owns 64 query rows
HEAD_DIMS = (64, 128)
BLOCK_KS = (64, 128)
_MEMORY_REGISTERS = 40
_COMPUTE_REGISTERS = 232
# TMA copies move a multiple of 128 bytes (one per thread of a warpgroup).
_META_WIDTH = 32
_MAX_SMEM_BYTES = 227 * 1024  # Hopper's shared memory per CTA
_SMEM_ALIGN_SLACK = 8 * 1024  # room for the buffers' alignment and the barriers


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BlockSizes:
  """Tiles of ``flashq_prefill`` (Mosaic GPU).

  Attributes:
    block_q: query rows per compute warpgroup; a CTA covers ``2 * block_q``.
      Only 64 (one wgmma M) is supported.
    block_k: keys per tile; also the V scale tile, so the dispatcher must
      quantize V with this block (call ``get_default`` before quantizing).
    max_concurrent_steps: depth of the K/V shared-memory ring (>= 2); fewer
      slots are used where shared memory cannot hold them next to this call's
      output tile (``ring_depth``).
    convert: "magic" converts int32 <-> f32 exactly with a bit cast and an add
      (FMA/ALU pipes); "cvt" with hardware conversions (I2F/F2I, a quarter of
      the FP32 rate, shared with exp2). Same results.
    p_rounding: "half_up" quantizes P exactly as the reference
      (``floor(x + 0.5)``); "nearest_even" saves element-wise work and
      differs only at exact ties.
    pv_dtype: "int8" runs P.V as an int8 wgmma (P through shared memory, an
      s32 accumulator per tile added to the f32 output); "bfloat16" as a bf16
      wgmma on the same integer codes (exact in bf16) with P in registers and
      V's codes in bf16 [.., Tk, D], accumulating into the f32 output in
      place (the tile's scales folded into the rescale by ``alpha``): fewer
      element-wise instructions per logit at half the int8 tensor rate.
    quantize_p: False (with ``pv_dtype="bfloat16"`` only) feeds P to the bf16
      P.V wgmma as bf16 values instead of INT8 codes: no per-logit
      quantization, ``l`` a float sum (``reference.tile_update``).
  """

  block_q: int = WGMMA_M
  block_k: int = 128
  max_concurrent_steps: int = 2
  convert: str = "magic"
  p_rounding: str = "half_up"
  pv_dtype: str = "int8"
  quantize_p: bool = True

  def __post_init__(self):
    if self.block_q != WGMMA_M:
      raise ValueError(f"block_q={self.block_q!r} must be {WGMMA_M} (one wgmma M)")
    if self.block_k not in BLOCK_KS:
      raise ValueError(f"block_k={self.block_k!r} must be one of {BLOCK_KS}")
    if self.p_rounding not in ("half_up", "nearest_even"):
      raise ValueError(f"p_rounding={self.p_rounding!r} must be 'half_up' or 'nearest_even'")
    if self.pv_dtype not in ("int8", "bfloat16"):
      raise ValueError(f"pv_dtype={self.pv_dtype!r} must be 'int8' or 'bfloat16'")
    if not self.quantize_p and self.pv_dtype != "bfloat16":
      raise ValueError("quantize_p=False needs pv_dtype='bfloat16' (an int8 P.V takes codes)")
    if self.convert not in ("magic", "cvt"):
      raise ValueError(f"convert={self.convert!r} must be 'magic' or 'cvt'")
    if not isinstance(self.max_concurrent_steps, int) or self.max_concurrent_steps < 2:
      raise ValueError(
          f"max_concurrent_steps={self.max_concurrent_steps!r} must be an int >= 2")

  @classmethod
  def get_default(cls, *, head_dim: int, seq_len_q: int, seq_len_k: int,
                  device_kind: str | None = None, dtype: str = "int8") -> BlockSizes:
    """Tuned sizes for this device and shape (heuristic when untuned).

    Callable before quantizing: ``block_k`` is the V scale tile.
    """
    del seq_len_q  # the query block is fixed by wgmma's M
    if device_kind is None:
      device_kind = tuned_block_sizes.current_device_kind()
    entry = tuned_block_sizes.lookup(
        KERNEL_NAME, device_kind=device_kind, dtype=dtype, head_dim=head_dim,
        seq_len=seq_len_k)
    entry = entry or {}
    # 128-key tiles: a 128-byte swizzled int8 row for v_t and P, N = 128
    # for Q.K^T, and half the per-tile accumulator rescales of 64.
    entry.setdefault("block_k", 128 if seq_len_k % 128 == 0 else 64)
    return cls(**entry)


# --- kernel ----------------------------------------------------------------------


def _int8_dot_t(a, b):
  """``a @ b.T`` of int8 values with int32 sums (the interpreter's wgmma)."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.int32)


def _tile_bounds(meta, row0, *, block_q: int, block_k: int, num_k_tiles: int,
                 causal: bool):
  """Key tiles ``[0, hi)`` that rows ``row0 .. row0 + block_q`` see, and the
  unmasked prefix ``[0, hi_full)`` (int32 scalars)."""
  offset, q_len, kv_len = meta
  n_rows = jnp.clip(q_len - row0, 0, block_q)
  hi = jnp.minimum(num_k_tiles, lax.div(kv_len + (block_k - 1), block_k))
  hi_full = jnp.minimum(num_k_tiles, lax.div(kv_len, block_k))
  if causal:
    q_first = offset + row0
    q_last = q_first + jnp.maximum(n_rows, 1) - 1
    hi = jnp.minimum(hi, lax.div(jnp.maximum(q_last + block_k, 0), block_k))
    hi_full = jnp.minimum(hi_full, lax.div(jnp.maximum(q_first + 1, 0), block_k))
  hi = jnp.where(n_rows > 0, jnp.maximum(hi, 0), 0)
  hi_full = jnp.clip(hi_full, 0, hi)
  return hi, hi_full


def _prefill_kernel(
    meta_ref,     # [B, 32] int32: (query_offset, q_len, kv_len, 0...) per batch
    q_ref,        # [B, Hq, Tq, D] int8
    q_scale_ref,  # [B, Hq, Tq] f32 (softmax scale folded in)
    k_ref,        # [B, Hk, Tk, D] int8
    k_scale_ref,  # [B, Hk, Tk] f32, or [B, Hk, Tk // block_k, 32] (scale, 0, ...) per tile
    v_t_ref,      # [B, Hk, D, Tk] int8
    v_scale_ref,  # [B, Hk, Tk // block_k, 32] f32 (scale, 0, ...)
    o_ref,        # [B, Hq, Tq, D] or [B, Tq, Hq, D] out_dtype
    m_out_ref,    # [B, Hq, Tq] f32 or None
    l_out_ref,    # [B, Hq, Tq] f32 or None
    scratch,
    *, sas: SASParams, causal: bool, static_full: bool, block_q: int,
    block_k: int, num_k_tiles: int, steps: int, groups: int, out_layout: str,
    convert: str, p_rounding: str, pv_dtype: str, quantize_p: bool, num_q_blocks: int,
    k_scale_per_tile: bool, interpret: bool):
  # pv_dtype "bfloat16": ``v_t_ref`` / ``v_t_smem`` hold V's codes as bf16 [.., Tk, D],
  # v_scale arrives with K, and there is no P scratch.
  (q_smem, q_scale_smem, meta_smem, k_smem, k_scale_smem, v_t_smem,
   v_scale_smem, p_smem, o_smem, m_smem, l_smem) = scratch[0]
  (meta_bar, q_bar, k_bar, v_bar, k_consumed, v_consumed, schedule_bar) = scratch[1]
  batch = lax.axis_index("batch")
  q_head = lax.axis_index("heads")
  kv_head = lax.div(q_head, jnp.int32(groups))
  wg = lax.axis_index("wg")
  q_block = lax.axis_index("q_seq")
  if causal:  # CTAs start in grid order: the longest key ranges first (2% at T4096)
    q_block = num_q_blocks - 1 - q_block
  cta_row0 = q_block * (NUM_COMPUTE_WGS * block_q)
  head_dim = q_ref.shape[-1]
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  col_layout = plgpu.Layout.WGMMA.reduce(0)
  bounds = functools.partial(_tile_bounds, block_q=block_q, block_k=block_k,
                             num_k_tiles=num_k_tiles, causal=causal)

  def load(ref, layout):
    return ref[...] if interpret else compat.mgpu_load(ref, layout=layout)

  def cast(x, layout):
    return x if interpret else plgpu.layout_cast(x, layout)

  def iota(shape, dim, layout):
    return cast(lax.broadcasted_iota(jnp.int32, shape, dim), layout)

  def cta_tiles(meta):
    """Key tiles the memory warpgroup streams: the union of both warpgroups'."""
    his = [bounds(meta, cta_row0 + i * block_q)[0] for i in range(NUM_COMPUTE_WGS)]
    return functools.reduce(jnp.maximum, his)

  def read_meta(i):
    plgpu.copy_gmem_to_smem(meta_ref.at[batch], meta_smem.at[i], meta_bar.at[i])
    plgpu.barrier_wait(meta_bar.at[i])
    return meta_smem[i, 0], meta_smem[i, 1], meta_smem[i, 2]

  def schedule():
    plgpu.barrier_arrive(schedule_bar)
    plgpu.barrier_wait(schedule_bar)

  @pl.when(wg < NUM_COMPUTE_WGS)
  def _compute_wg():
    plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
    row0 = cta_row0 + wg * block_q
    q_smem_wg, o_smem_wg = q_smem.at[wg], o_smem.at[wg]
    p_smem_wg = None if p_smem is None else p_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[batch, q_head, pl.ds(row0, block_q)],
                            q_smem_wg, q_bar.at[wg])
    plgpu.copy_gmem_to_smem(q_scale_ref.at[batch, q_head, pl.ds(row0, block_q)],
                            q_scale_smem.at[wg], q_bar.at[wg])
    meta = read_meta(wg)
    if static_full:
      hi = hi_full = hi_cta = num_k_tiles
    else:
      hi, hi_full = bounds(meta, row0)
      hi_cta = cta_tiles(meta)
    plgpu.barrier_wait(q_bar.at[wg])
    q_scale = load(q_scale_smem.at[wg], row_layout)

    m = cast(jnp.full((block_q,), common.MASKED_MAX, jnp.float32), row_layout)
    l = cast(jnp.zeros((block_q,), jnp.float32), row_layout)
    acc = cast(jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA)
    # bf16 P.V: ``acc`` is kept in units of the last tile's p_scale * v_scale.
    unit = cast(jnp.ones((block_q,), jnp.float32), row_layout)

    pl.when(wg == 1)(schedule)

    def kv_step(j, carry, *, masked: bool):
      acc, m, l, unit = carry
      slot = lax.rem(j, jnp.int32(steps))
      plgpu.barrier_wait(k_bar.at[slot])

      def compute_qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem_wg, k_smem.at[slot].transpose((1, 0)))
        schedule()
        return acc_ref[...]

      if interpret:  # the interpreter's wgmma takes no transposed operand
        s = _int8_dot_t(q_smem_wg[...], k_smem[slot])
        schedule()
      else:
        s = pl.run_scoped(compute_qk, plgpu.ACC((block_q, block_k), jnp.int32))
      if k_scale_per_tile:
        k_scale = k_scale_smem[slot, 0]
      else:
        k_scale = load(k_scale_smem.at[slot], col_layout)
      if pv_dtype == "bfloat16":
        v_scale = v_scale_smem[slot, 0]
      plgpu.barrier_arrive(k_consumed.at[slot])
      shape = (block_q, block_k)

      keep = None
      if masked:
        offset, _, kv_len = meta
        q_pos = offset + row0 + iota(shape, 0, plgpu.Layout.WGMMA)
        k_pos = j * block_k + iota(shape, 1, plgpu.Layout.WGMMA)
        keep = k_pos < kv_len
        if causal:
          keep = keep & (k_pos <= q_pos)

      if k_scale_per_tile:
        m_new, alpha, p, p_max = online_softmax_tile_scale(
            m, s, keep, q_scale, k_scale, sas, convert, guard=interpret)
      else:
        t = i32_to_f32(s, convert) * broadcast_cols(k_scale, shape)  # the logits / q_scale
        m_new, alpha, p, p_max = online_softmax(m, t, keep, q_scale, sas, convert,
                                                guard=interpret)
      if quantize_p:
        p8, p_scale, code_sum = quantize_rows(
            p, convert, guard=interpret, rounding=p_rounding, row_max=p_max,
            codes_dtype=jnp.bfloat16 if pv_dtype == "bfloat16" else jnp.int8)
        l = l * alpha + code_sum * p_scale
      else:  # P itself in bf16: the tile's unit is V's scale alone
        p8, p_scale = p.astype(jnp.bfloat16), cast(jnp.ones_like(l), row_layout)
        l = l * alpha + p.sum(axis=1)
      if pv_dtype == "bfloat16":
        acc, unit = rescale_to_tile_unit(acc, alpha, unit, p_scale * v_scale)
        acc, l, m_new, unit, p8 = lax.optimization_barrier((acc, l, m_new, unit, p8))
      else:
        acc = acc * broadcast_rows(alpha, acc.shape)
        p_smem_wg[...] = p8
        plgpu.commit_smem()
        acc, l, m_new, p_scale = lax.optimization_barrier((acc, l, m_new, p_scale))
      plgpu.barrier_arrive(schedule_bar)  # done with the softmax
      plgpu.barrier_wait(v_bar.at[slot])
      plgpu.barrier_wait(schedule_bar)  # wait until the tensor cores are free

      if pv_dtype == "bfloat16":
        if interpret:
          acc = acc + lax.dot_general(p8.astype(jnp.float32), v_t_smem[slot].astype(jnp.float32),
                                      (((1,), (0,)), ((), ())))
        else:
          def accumulate_pv(acc_ref):
            plgpu.wgmma(acc_ref, p8, v_t_smem.at[slot])
          acc = pl.run_state(accumulate_pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_consumed.at[slot])
        return acc, m_new, l, unit

      def compute_pv(acc_ref):
        plgpu.wgmma(acc_ref, p_smem_wg, v_t_smem.at[slot].transpose((1, 0)))
        return acc_ref[...]

      if interpret:
        pv_ = _int8_dot_t(p_smem_wg[...], v_t_smem[slot])
      else:
        pv_ = pl.run_scoped(compute_pv, plgpu.ACC((block_q, head_dim), jnp.int32))
      v_scale = v_scale_smem[slot, 0]
      plgpu.barrier_arrive(v_consumed.at[slot])
      acc = acc + i32_to_f32(pv_, convert) * broadcast_rows(p_scale * v_scale, acc.shape)
      return acc, m_new, l, unit

    carry = (acc, m, l, unit)
    carry = lax.fori_loop(0, hi_full, functools.partial(kv_step, masked=False), carry)
    if not static_full:
      carry = lax.fori_loop(hi_full, hi, functools.partial(kv_step, masked=True), carry)

      def drain(j, _):
        # Tiles only the other warpgroup needs: observe and release them, and
        # keep the schedule barrier in step (two phases per tile).
        slot = lax.rem(j, jnp.int32(steps))
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_arrive(k_consumed.at[slot])
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_arrive(v_consumed.at[slot])
        schedule()
        schedule()

      lax.fori_loop(hi, hi_cta, drain, None)
    acc, m, l, unit = carry
    if pv_dtype == "bfloat16":
      acc = acc * broadcast_rows(unit, acc.shape)
    pl.when(wg == 0)(schedule)

    # acc / l, 0 for rows that saw no key or lie past q_len, NaN where q_scale is not finite.
    _, q_len, _ = meta
    rows = row0 + iota((block_q,), 0, row_layout)
    valid = (rows < q_len) & (l != 0.0)
    inv_l = jnp.where(valid, 1.0 / jnp.where(valid, l, 1.0), 0.0)
    inv_l = jnp.where(common.finite_rows(q_scale), inv_l, jnp.nan)
    out = acc * broadcast_rows(inv_l, acc.shape)
    o_smem_wg[...] = out.astype(o_smem.dtype)
    if m_smem is not None:
      row_ok = rows < q_len
      # m is kept in units of logits / q_scale (``online_softmax``).
      m_smem.at[wg][...] = jnp.where(row_ok & (m > common.MASKED_MAX), m * q_scale,
                                     common.MASKED_MAX)
      l_smem.at[wg][...] = jnp.where(row_ok, l, 0.0)
    plgpu.commit_smem()
    if out_layout == "bhtd":
      o_dst = o_ref.at[batch, q_head, pl.ds(row0, block_q)]
    else:
      o_dst = o_ref.at[batch, pl.ds(row0, block_q), q_head]
    plgpu.copy_smem_to_gmem(o_smem_wg, o_dst)
    if m_smem is not None:
      plgpu.copy_smem_to_gmem(m_smem.at[wg], m_out_ref.at[batch, q_head, pl.ds(row0, block_q)])
      plgpu.copy_smem_to_gmem(l_smem.at[wg], l_out_ref.at[batch, q_head, pl.ds(row0, block_q)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == NUM_COMPUTE_WGS)
  def _memory_wg():
    plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")
    if static_full:
      hi_cta = num_k_tiles
    else:
      hi_cta = cta_tiles(read_meta(NUM_COMPUTE_WGS))

    def issue_k(j, slot):
      keys = pl.ds(j * block_k, block_k)
      plgpu.copy_gmem_to_smem(k_ref.at[batch, kv_head, keys], k_smem.at[slot],
                              k_bar.at[slot])
      k_scale_src = (k_scale_ref.at[batch, kv_head, j] if k_scale_per_tile
                     else k_scale_ref.at[batch, kv_head, keys])
      plgpu.copy_gmem_to_smem(k_scale_src, k_scale_smem.at[slot], k_bar.at[slot])
      if pv_dtype == "bfloat16":  # read before K's slot is released
        plgpu.copy_gmem_to_smem(v_scale_ref.at[batch, kv_head, j],
                                v_scale_smem.at[slot], k_bar.at[slot])

    def issue_v(j, slot):
      keys = pl.ds(j * block_k, block_k)
      if pv_dtype == "bfloat16":
        plgpu.copy_gmem_to_smem(v_t_ref.at[batch, kv_head, keys], v_t_smem.at[slot],
                                v_bar.at[slot])
        return
      plgpu.copy_gmem_to_smem(v_t_ref.at[batch, kv_head, :, keys], v_t_smem.at[slot],
                              v_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_scale_ref.at[batch, kv_head, j],
                              v_scale_smem.at[slot], v_bar.at[slot])

    for i in range(steps):
      @pl.when(i < hi_cta)
      def _prologue(i=i):
        issue_k(i, i)
        issue_v(i, i)

    @pl.loop(steps, hi_cta)
    def _steady(j):
      slot = lax.rem(j, jnp.int32(steps))
      plgpu.barrier_wait(k_consumed.at[slot])
      issue_k(j, slot)
      plgpu.barrier_wait(v_consumed.at[slot])
      issue_v(j, slot)

    # Observe the last releases too, so that every barrier phase is waited on
    # by each of its waiters (the interpreter checks this; free on hardware).
    @pl.loop(jnp.maximum(hi_cta - steps, 0), hi_cta)
    def _epilogue(j):
      slot = lax.rem(j, jnp.int32(steps))
      plgpu.barrier_wait(k_consumed.at[slot])
      plgpu.barrier_wait(v_consumed.at[slot])


def ring_depth(block_sizes: BlockSizes, *, head_dim: int, num_k_tiles: int, out_dtype,
               return_residuals: bool) -> int:
  """K/V ring slots: ``max_concurrent_steps``, fewer where shared memory is short."""
  bf16_pv = block_sizes.pv_dtype == "bfloat16"
  rows = NUM_COMPUTE_WGS * block_sizes.block_q
  fixed = rows * (head_dim + 4 + head_dim * jnp.dtype(out_dtype).itemsize
                  + (0 if bf16_pv else block_sizes.block_k) + (8 if return_residuals else 0))
  fixed += (NUM_COMPUTE_WGS + 1) * _META_WIDTH * 4 + _SMEM_ALIGN_SLACK
  per_step = (block_sizes.block_k * (head_dim * (3 if bf16_pv else 2) + 4) + _META_WIDTH * 4)
  fits = (_MAX_SMEM_BYTES - fixed) // per_step
  return max(1, min(block_sizes.max_concurrent_steps, fits, num_k_tiles))


def _swizzle(row_bytes: int) -> int:
  for swizzle in (128, 64, 32):
    if row_bytes % swizzle == 0:
      return swizzle
  raise NotImplementedError(f"rows of {row_bytes} bytes cannot be swizzled")


def _smem_tiled(shape, dtype):
  """SMEM scratch with the (8, swizzle) tiling + swizzle wgmma and TMA need."""
  row_bytes = shape[-1] * jnp.dtype(dtype).itemsize
  swizzle = _swizzle(row_bytes)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)))


@functools.partial(
    jax.jit, static_argnames=(
        "sas", "causal", "local_window", "block_sizes", "interpret", "debug",
        "return_residuals", "out_dtype", "out_layout"))
def flashq_prefill(
    q, q_scale, k, k_scale, v_t, v_scale, *, sas: SASParams, causal: bool = False,
    query_offset=0, q_lengths=None, kv_lengths=None, local_window=None,
    block_sizes: BlockSizes | None = None, interpret: bool = False,
    debug: bool = False, return_residuals: bool = False, out_dtype=jnp.float32,
    out_layout: str = "bhtd"):
  """FlashQ prefill over INT8 Q/K/V (V transposed), Pallas Mosaic GPU (Hopper).

  Args:
    q: int8 [B, Hq, Tq, D]; q_scale: f32 [B, Hq, Tq], per token, softmax scale
      (and ``log2 e`` for base 2) folded in.
    k: int8 [B, Hk, Tk, D] (smoothed); k_scale: f32 [B, Hk, Tk] (per token),
      or [B, Hk, Tk // block_k] (one scale per key tile, as quantized with
      ``per_token_scales=False``: about 11% faster, see
      ``online_softmax_tile_scale``).
    v_t: int8 [B, Hk, D, Tk] (or, for ``pv_dtype="bfloat16"``, the same codes
      as bf16 [B, Hk, Tk, D], as ``quantize_qkv(v_codes_dtype=...)`` writes
      them); v_scale: f32 [B, Hk, Tk // block_k], one scale per key tile
      (this shape fixes ``block_k``).
    sas: SAS exponent parameters (``exact=True``: ``exp2``, no sparsity;
      otherwise base 2 only).
    causal: keep keys at positions ``<= query_offset + i`` for query ``i``.
    query_offset: int or int32 [B].
    q_lengths, kv_lengths: optional int32 [B] valid lengths.
    local_window: not supported (``NotImplementedError``).
    block_sizes: ``BlockSizes``; ``None`` uses ``BlockSizes.get_default`` with
      ``block_k`` taken from ``v_scale``. ``Tq`` need not be a multiple of
      ``2 * block_q`` (the query rows are padded here).
    interpret: run in the Mosaic GPU interpreter (CPU; slow, for tests).
    out_dtype: dtype of the output (the reference returns f32).
    out_layout: "bhtd" ([B, Hq, Tq, D]) or "bthd" ([B, Tq, Hq, D], the
      ``jax.nn.dot_product_attention`` layout, written in place).
  Returns:
    [B, Hq, Tq, D] ``out_dtype`` (rows with no visible key are 0, rows whose
    ``q_scale`` is NaN/inf are NaN) and, with ``return_residuals``,
    ``(m, l)`` f32 [B, Hq, Tq] in the exponent's units.
  """
  if plgpu is None:  # pragma: no cover
    raise NotImplementedError("jax.experimental.pallas.mosaic_gpu is unavailable")
  b, hq, tq, d = q.shape
  hk, tk = k.shape[1], k.shape[2]
  v_codes_bf16 = v_t.dtype == jnp.bfloat16  # V's codes, not transposed
  block_k, k_scale_per_tile = gpu_flashq_prefill.check_inputs(
      q, q_scale, k, k_scale, v_t, v_scale, out_layout)
  n_v_tiles = tk // block_k
  if local_window is not None:
    raise NotImplementedError("Mosaic GPU FlashQ prefill: local_window is not supported")
  if d not in HEAD_DIMS:
    raise NotImplementedError(f"Mosaic GPU FlashQ prefill: head_dim {d} not in {HEAD_DIMS}")
  if block_k not in BLOCK_KS:
    raise NotImplementedError(
        f"Mosaic GPU FlashQ prefill: V scale tile {block_k=} (Tk={tk}, {n_v_tiles} "
        f"V scales) must be one of {BLOCK_KS}")
  if not sas.exact and sas.base != 2.0:
    raise NotImplementedError(
        f"Mosaic GPU FlashQ prefill: SAS base {sas.base} (only base 2 or exact)")
  if block_sizes is None:
    block_sizes = BlockSizes(block_k=block_k)
  if v_codes_bf16 and block_sizes.pv_dtype != "bfloat16":
    raise ValueError("bf16 V codes ([B, Hk, Tk, D]) need BlockSizes(pv_dtype='bfloat16')")
  elif block_sizes.block_k != block_k:
    raise ValueError(
        f"{block_sizes.block_k=} differs from the V scale tile {block_k=} "
        f"(Tk={tk}, {n_v_tiles} V scales)")
  out_dtype = jnp.dtype(out_dtype)
  if out_dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f"{out_dtype=} must be float32, bfloat16 or float16")
  block_q = block_sizes.block_q
  cta_rows = NUM_COMPUTE_WGS * block_q
  tq_pad = -(-tq // cta_rows) * cta_rows
  if tq_pad != tq:
    pad = ((0, 0), (0, 0), (0, tq_pad - tq))
    q = jnp.pad(q, pad + ((0, 0),))
    q_scale = jnp.pad(q_scale, pad)
  steps = ring_depth(block_sizes, head_dim=d, num_k_tiles=n_v_tiles, out_dtype=out_dtype,
                     return_residuals=return_residuals)

  offset, q_len, kv_len = gpu_flashq_prefill.row_bounds(
      query_offset, q_lengths, kv_lengths, b=b, tq=tq, tk=tk)
  meta = jnp.stack([offset, q_len, kv_len], axis=1)
  meta = jnp.pad(meta, ((0, 0), (0, _META_WIDTH - 3)))
  static_full = not causal and kv_lengths is None and tq_pad == tq
  def scale_rows(x):  # [B, Hk, tiles] -> [B, Hk, tiles, 32]: one TMA row per tile
    return jnp.pad(x.astype(jnp.float32)[..., None], ((0, 0),) * 3 + ((0, _META_WIDTH - 1),))

  v_scale4 = scale_rows(v_scale)
  k_scale = scale_rows(k_scale) if k_scale_per_tile else k_scale.astype(jnp.float32)

  if out_layout == "bhtd":
    o_type = jax.ShapeDtypeStruct((b, hq, tq_pad, d), out_dtype)
  else:
    o_type = jax.ShapeDtypeStruct((b, tq_pad, hq, d), out_dtype)
  res_type = jax.ShapeDtypeStruct((b, hq, tq_pad), jnp.float32)
  out_type = [o_type, res_type if return_residuals else None,
              res_type if return_residuals else None]

  kernel = functools.partial(
      _prefill_kernel, sas=sas, causal=causal, static_full=static_full,
      block_q=block_q, block_k=block_k, num_k_tiles=n_v_tiles, steps=steps,
      groups=hq // hk, out_layout=out_layout, convert=block_sizes.convert,
      p_rounding=block_sizes.p_rounding, pv_dtype=block_sizes.pv_dtype,
      quantize_p=block_sizes.quantize_p, num_q_blocks=tq_pad // cta_rows,
      k_scale_per_tile=k_scale_per_tile,
      interpret=bool(interpret))
  bf16_pv = block_sizes.pv_dtype == "bfloat16"
  if bf16_pv and not v_codes_bf16:  # the quantization pass can write these directly
    v_t = jnp.swapaxes(v_t, -1, -2).astype(jnp.bfloat16)

  def entry(meta_ref, q_ref, qs_ref, k_ref, ks_ref, vt_ref, vs_ref, o_ref, m_ref, l_ref):
    smem = (
        _smem_tiled((NUM_COMPUTE_WGS, block_q, d), jnp.int8),          # q
        plgpu.SMEM((NUM_COMPUTE_WGS, block_q), jnp.float32),           # q_scale
        plgpu.SMEM((NUM_COMPUTE_WGS + 1, _META_WIDTH), jnp.int32),     # meta
        _smem_tiled((steps, block_k, d), jnp.int8),                    # k
        plgpu.SMEM((steps, _META_WIDTH if k_scale_per_tile else block_k), jnp.float32),
        (_smem_tiled((steps, block_k, d), jnp.bfloat16) if bf16_pv     # v
         else _smem_tiled((steps, d, block_k), jnp.int8)),             # v_t
        plgpu.SMEM((steps, _META_WIDTH), jnp.float32),                 # v_scale
        None if bf16_pv else _smem_tiled((NUM_COMPUTE_WGS, block_q, block_k), jnp.int8),  # p
        _smem_tiled((NUM_COMPUTE_WGS, block_q, d), out_dtype),         # out
        plgpu.SMEM((NUM_COMPUTE_WGS, block_q), jnp.float32) if return_residuals else None,
        plgpu.SMEM((NUM_COMPUTE_WGS, block_q), jnp.float32) if return_residuals else None,
    )
    barriers = (
        plgpu.Barrier(num_barriers=NUM_COMPUTE_WGS + 1),                      # meta
        plgpu.Barrier(num_arrivals=2, num_barriers=NUM_COMPUTE_WGS),          # q
        plgpu.Barrier(num_arrivals=3 if bf16_pv else 2, num_barriers=steps),  # k
        plgpu.Barrier(num_arrivals=1 if bf16_pv else 2, num_barriers=steps),  # v
        plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS, num_barriers=steps),      # k consumed
        plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS, num_barriers=steps),      # v consumed
        plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS),                          # schedule
    )
    pl.run_scoped(
        lambda *scratch: kernel(meta_ref, q_ref, qs_ref, k_ref, ks_ref, vt_ref,
                                vs_ref, o_ref, m_ref, l_ref, scratch),
        smem, barriers, collective_axes="wg")

  o, m, l = plgpu.kernel(
      entry,
      out_type=out_type,
      grid=(hq, tq_pad // cta_rows, b),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=NUM_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=compat.mgpu_interpret(interpret),
      kernel_name=KERNEL_NAME,
  )(meta, q, q_scale.astype(jnp.float32), k, k_scale, v_t, v_scale4)
  del debug
  o = o[:, :, :tq] if out_layout == "bhtd" else o[:, :tq]
  if return_residuals:
    return o, (m[:, :, :tq], l[:, :, :tq])
  return o


def flashq_prefill_reference(q, q_scale, k, k_scale, v_t, v_scale, *,
                             block_sizes: BlockSizes | None = None, **kwargs):
  """``flashq_prefill``'s inputs (V transposed, as the Triton kernel's) through
  ``reference.flashq_prefill_reference``: the Triton kernel's reference adapter,
  with P quantized or not as ``block_sizes.quantize_p`` says, and a K scale
  per tile repeated over its keys."""
  quantize_p = block_sizes is None or block_sizes.quantize_p
  return gpu_flashq_prefill.flashq_prefill_reference(
      q, q_scale, k, k_scale, v_t, v_scale, quantize_p=quantize_p, **kwargs)


def main(argv=None):
  """Hopper check + benchmark: ``python3 -m pallas_kernels.mosaic_gpu.flashq_prefill``.

  Correctness against ``flashq_prefill_reference`` (same INT8 inputs), then
  the median time of each variant at B2, T4096, H32, D128 (causal and not)
  against ``jax.nn.dot_product_attention(implementation="cudnn")`` in bf16;
  the quantization pass (Triton ``quantize_qkv``) is timed separately. Writes
  ``$OUT/mosaic_gpu_flashq.json`` when ``OUT`` is set.
  """
  import argparse
  import json
  import os
  import statistics
  import time
  import traceback

  import numpy as np

  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--variants", default="all")
  parser.add_argument("--interpret", action="store_true", help="CPU smoke test")
  args = parser.parse_args(argv)
  b, t, h, d = args.batch, args.seq, args.heads, args.head_dim
  rows = []
  out_dir = os.environ.get("OUT")

  def emit(row):
    rows.append(row)
    print(json.dumps(row), flush=True)
    if out_dir:
      with open(os.path.join(out_dir, "mosaic_gpu_flashq.json"), "w") as f:
        json.dump(rows, f, indent=1)

  def timed(fn, *xs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*xs))
    compile_s = time.perf_counter() - start
    for _ in range(3):
      jax.block_until_ready(fn(*xs))
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(*xs))
      times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), compile_s

  def relerr(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))

  emit({"jax": jax.__version__, "device": jax.devices()[0].device_kind})
  rng = np.random.default_rng(0)
  key = jax.random.split(jax.random.key(0), 3)
  qf, kf, vf = (jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk in key)
  sm_scale = 1.0 / math.sqrt(d)
  block_k = BlockSizes.get_default(head_dim=d, seq_len_q=t, seq_len_k=t).block_k

  def quantize(x, per_head_block):  # per-block INT8 of [B, T, H, D] -> [B, H, T, D]
    x = jnp.swapaxes(x.astype(jnp.float32), 1, 2)
    xb = x.reshape(b, h, t // per_head_block, per_head_block, d)
    scale = jnp.max(jnp.abs(xb), axis=(-1, -2), keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(common.round_half_up(xb / scale), -127, 127).astype(jnp.int8)
    scale = jnp.broadcast_to(scale[..., 0], xb.shape[:-1])
    return codes.reshape(b, h, t, d), scale.reshape(b, h, t)

  q8, q_scale = quantize(qf, 64)
  q_scale = q_scale * sm_scale * math.log2(math.e)
  kf_s = kf - jnp.mean(kf.astype(jnp.float32), axis=1, keepdims=True).astype(kf.dtype)
  k8, k_scale = quantize(kf_s, 64)
  v8, v_scale_tok = quantize(vf, block_k)
  v_t = jnp.swapaxes(v8, -1, -2)
  v_scale = v_scale_tok[..., ::block_k]
  inputs = jax.block_until_ready((q8, q_scale, k8, k_scale, v_t, v_scale))
  del rng

  variants = {
      "exp2_magic": (SASParams(exact=True), BlockSizes(block_k=block_k)),
      "sas_bf16_magic": (SASParams(), BlockSizes(block_k=block_k)),
      "exp2_cvt": (SASParams(exact=True), BlockSizes(block_k=block_k, convert="cvt")),
      "sas_f32_magic": (SASParams(dtype="float32"), BlockSizes(block_k=block_k)),
      "exp2_magic_steps3": (SASParams(exact=True),
                            BlockSizes(block_k=block_k, max_concurrent_steps=3)),
      "exp2_magic_rne": (SASParams(exact=True),
                         BlockSizes(block_k=block_k, p_rounding="nearest_even")),
      "sas_bf16_magic_rne": (SASParams(),
                             BlockSizes(block_k=block_k, p_rounding="nearest_even")),
      "exp2_cvt_rne": (SASParams(exact=True),
                       BlockSizes(block_k=block_k, convert="cvt", p_rounding="nearest_even")),
  }
  if args.variants != "all":
    variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}

  # Correctness first (the same INT8 inputs through the pure-JAX reference).
  for causal in (False, True):
    for name in ("exp2_magic", "sas_bf16_magic", "exp2_cvt", "exp2_cvt_rne"):
      if name not in variants:
        continue
      sas, bs = variants[name]
      try:
        out = flashq_prefill(*inputs, sas=sas, causal=causal, block_sizes=bs,
                             interpret=args.interpret)
        ref = flashq_prefill_reference(*inputs, sas=sas, causal=causal)
        emit({"check": name, "causal": causal, "relerr": relerr(out, ref)})
      except Exception as e:  # noqa: BLE001 - report and go on: one run tells all
        emit({"check": name, "causal": causal, "error": repr(e)[:2000]})
        traceback.print_exc()

  for causal in (False, True):
    flops = 4.0 * b * t * t * h * d / (2 if causal else 1)
    try:
      ms, compile_s = timed(jax.jit(functools.partial(
          jax.nn.dot_product_attention, is_causal=causal, implementation="cudnn")),
          qf, kf, vf)
      cudnn_ms = ms
      emit({"impl": "cudnn_bf16", "causal": causal, "ms": ms,
            "tflops": flops / ms / 1e9, "compile_s": compile_s})
    except Exception as e:  # noqa: BLE001
      cudnn_ms = float("nan")
      emit({"impl": "cudnn_bf16", "causal": causal, "error": repr(e)[:2000]})
    for name, (sas, bs) in variants.items():
      if causal and not name.startswith("exp2"):
        continue
      fn = jax.jit(functools.partial(
          flashq_prefill, sas=sas, causal=causal, block_sizes=bs,
          out_dtype=jnp.bfloat16, out_layout="bthd", interpret=args.interpret))
      try:
        ms, compile_s = timed(fn, *inputs)
        emit({"impl": f"mosaic_int8_{name}", "causal": causal, "ms": ms,
              "tflops": flops / ms / 1e9, "vs_cudnn": cudnn_ms / ms,
              "compile_s": compile_s})
      except Exception as e:  # noqa: BLE001
        emit({"impl": f"mosaic_int8_{name}", "causal": causal, "error": repr(e)[:2000]})
        traceback.print_exc()

  try:  # the quantization pass (excluded above), through the Triton kernel
    from pallas_kernels.gpu import quantize as gpu_quantize
    quant = jax.jit(functools.partial(
        gpu_quantize.quantize_qkv, block_q=64, block_k=block_k, sm_scale=sm_scale,
        log2e_fold=True, smooth_k=True, layout="bthd"))
    ms, compile_s = timed(quant, qf, kf, vf)
    emit({"impl": "quantize_qkv_triton", "ms": ms, "compile_s": compile_s})
  except Exception as e:  # noqa: BLE001
    emit({"impl": "quantize_qkv_triton", "error": repr(e)[:2000]})


if __name__ == "__main__":
  main()

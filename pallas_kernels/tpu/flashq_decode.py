"""FlashQ decode attention over a progressive INT4/INT2 KV cache, for TPU.

A few new query rows per KV head (its GQA query heads x new tokens: the ``M``
rows) attend over one bit width's share of the cache (``reference.PackedKV``)
plus the INT8 residual window (``reference.ResidualKV``). The algorithm, tile by
tile, is ``reference.flashq_decode_reference``:

- one tile per stage-2 group of ``G`` tokens; the packed codes are unpacked in
  registers with shifts and masks (``packing.unpack_part``: the split layout
  yields contiguous channel slices, concatenated along lanes) and go, as raw
  codes ``0..2**bits-1``, straight into int8 x int8 -> int32 dots on the MXU;
- K (``reference.packed_key_logits``): the tile's per-channel integer stage-2
  scale is folded into the query, requantized per row to int8, and the zero
  point is one correction per row; the bf16 stage-1 scale per token scales
  the logits;
- V (``reference.decode_tile_update``): per channel group, the per-token
  stage-1 and stage-2 scales are folded into P before P is quantized per row,
  and the zero point is again one correction per row;
- the INT8 residual window is the last tile (``decode_tile_update`` on plain
  INT8 values).

The kernel calls ``reference.packed_key_logits`` and
``reference.decode_tile_update`` itself, so kernel and reference cannot drift
apart (only the order of float sums may differ).

Grid ``(batch, kv_heads, cache_blocks + 1)``: each step DMAs ``block_k`` tokens
(``block_k / G`` tiles, looped over in-kernel); the last step processes the
residual window and writes the output. ``lengths`` is scalar-prefetched: the
index maps clamp the block index to the last block holding packed tokens (no
DMA past the length) and tiles past the length are skipped.
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
from pallas_kernels.packing import codes_per_byte, unpack_part
from pallas_kernels.reference import PackedKV, ResidualKV
from pallas_kernels.sas import SASParams

NUM_LANES = 128
NUM_SUBLANES = 8
# int8/uint8 arrays tile as (32, 128): stage-2 groups (the tile) are multiples of 32.
INT8_SUBLANES = 32
# Tokens per grid step by default: ~128 KiB of INT4 codes per step for D=128,
# enough to amortize the per-step overhead (~0.35 us) against HBM time.
DEFAULT_BLOCK_K = 2048
_NT_DIMS = (((1,), (1,)), ((), ()))  # [M, D] x [N, D] -> [M, N]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BlockSizes:
  """Tiles of the TPU decode kernel.

  Attributes:
    block_k: cache tokens per grid step (one DMA per array); a multiple of the
      stage-2 group, which is the softmax tile (as in the reference).
  """

  block_k: int = DEFAULT_BLOCK_K

  def __post_init__(self):
    if self.block_k <= 0 or self.block_k % INT8_SUBLANES:
      raise ValueError(
          f"{self.block_k=} must be a positive multiple of {INT8_SUBLANES}")

  @classmethod
  def get_default(cls, *, seq_len_k: int, group: int,
                  head_dim: int | None = None) -> BlockSizes:
    """The largest multiple of ``group`` that divides the cache capacity
    ``seq_len_k`` and is at most ``DEFAULT_BLOCK_K``."""
    del head_dim
    n_tiles = max(seq_len_k // group, 1)
    n_sub = max(1, min(n_tiles, DEFAULT_BLOCK_K // group))
    while n_tiles % n_sub:
      n_sub -= 1
    return cls(block_k=n_sub * group)


def _unpack_codes(packed, bits):
  """uint8 ``[N, D * bits / 8]`` split-layout bytes -> int32 codes ``[N, D]``."""
  packed = packed.astype(jnp.int32)  # 32-bit VPU ops on every TPU generation
  parts = [unpack_part(packed, p, bits) for p in range(codes_per_byte(bits))]
  return jnp.concatenate(parts, axis=-1)


def _row_vector(x):
  """f32 ``[N]`` from a ``[1, N]`` row of scales or zero points (upcast before
  dropping the unit dim: 1-D vectors stay 32-bit)."""
  return jnp.max(x.astype(jnp.float32), axis=0)


def _decode_kernel(
    len_ref,    # SMEM int32 [B]  tokens in the cache
    q_ref,      # int8 [Mp, D]
    qs_ref,     # f32  [Mp, 1]
    qpos_ref,   # int32 [Mp, 1]  position of each row (-1: padding row)
    kc_ref,     # uint8 [n_sub, G, D*bits/8]  packed K codes
    ks2_ref,    # uint8 [n_sub, 1, D]  K stage-2 scale per (group, channel)
    kz_ref,     # int8  [n_sub, 1, D]  K stage-2 zero point
    ksc_ref,    # bf16  [n_sub, 1, G]  K stage-1 scale per token
    vc_ref,     # uint8 [n_sub, G, D*bits/8]  packed V codes
    vs2_ref,    # uint8 [n_sub, G, D/g]  V stage-2 scale per (token, channel group)
    vz_ref,     # int8  [n_sub, G, D/g]
    vsc_ref,    # bf16  [n_sub, 1, G]  V stage-1 scale per token
    rk_ref,     # int8  [G, D]  residual window (INT8)
    rks_ref,    # [1, G]
    rv_ref,     # int8  [G, D]
    rvs_ref,    # [1, G]
    o_ref,      # f32 [Mp, D]
    *refs,      # (m_out [Mp, 128], l_out [Mp, 128])?, m_sc, l_sc, acc_sc
    bits: int,
    sas: SASParams,
    return_residuals: bool,
):
  if return_residuals:
    m_out_ref, l_out_ref, m_sc, l_sc, acc_sc = refs
  else:
    m_sc, l_sc, acc_sc = refs  # f32 [Mp, 128], [Mp, 128] (lane-replicated), [Mp, D]
  b, j = pl.program_id(0), pl.program_id(2)
  last_step = pl.num_programs(2) - 1
  n_sub, group, _ = kc_ref.shape
  length = len_ref[b]
  n_packed = jax.lax.div(length, jnp.int32(group))  # packed tiles (length >= 0)
  packed_len = n_packed * group

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, common.MASKED_MAX, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def attend(s, k_start, kv_len, v_codes, v_scale, v_scale2=None, v_zero=None):
    """Folds one tile's logits ``s`` [Mp, G] into the state with
    ``reference.decode_tile_update`` (``v_scale`` [G]; ``v_scale2``/``v_zero``
    [G, D/g] for a packed tile, None for the INT8 residual window)."""
    q_pos = jnp.max(qpos_ref[...], axis=1)                              # [Mp]
    col = jax.lax.broadcasted_iota(jnp.int32, (NUM_SUBLANES, group), 1)
    k_pos = jnp.max(col, axis=0) + k_start                              # [G]
    keep = common.attention_mask(q_pos, k_pos, causal=True, local_window=None,
                                 kv_len=kv_len)
    state = reference.SoftmaxState(
        m=jnp.max(m_sc[...], axis=1), l=jnp.max(l_sc[...], axis=1),
        acc=acc_sc[...])
    state = reference.decode_tile_update(state, s, keep, v_codes, v_scale, sas,
                                         v_scale2, v_zero)
    m_sc[...] = jnp.broadcast_to(state.m[:, None], m_sc.shape)
    l_sc[...] = jnp.broadcast_to(state.l[:, None], l_sc.shape)
    acc_sc[...] = state.acc

  @pl.when(j < last_step)
  def _packed_block():
    q_scale = jnp.max(qs_ref[...], axis=1)                              # [Mp]

    def body(i, carry):
      tile = j * n_sub + i

      @pl.when(tile < n_packed)
      def _tile():
        s = reference.packed_key_logits(
            q_ref[...], q_scale, _unpack_codes(kc_ref[i], bits),
            _row_vector(ks2_ref[i]), _row_vector(kz_ref[i]),
            _row_vector(ksc_ref[i]))                                    # [Mp, G]
        # int32 before the per-group columns are taken: 1-D vectors stay 32-bit.
        attend(s, tile * group, packed_len, _unpack_codes(vc_ref[i], bits),
               _row_vector(vsc_ref[i]), vs2_ref[i].astype(jnp.int32),
               vz_ref[i].astype(jnp.int32))

      return carry

    jax.lax.fori_loop(0, n_sub, body, 0)

  @pl.when(j == last_step)
  def _residual_and_store():
    s = jax.lax.dot_general(q_ref[...], rk_ref[...], _NT_DIMS,
                            preferred_element_type=jnp.int32)           # [Mp, G]
    s = s.astype(jnp.float32) * qs_ref[...] * rks_ref[...].astype(jnp.float32)
    attend(s, packed_len, length, rv_ref[...], _row_vector(rvs_ref[...]))
    state = reference.SoftmaxState(
        m=jnp.max(m_sc[...], axis=1), l=jnp.max(l_sc[...], axis=1),
        acc=acc_sc[...])
    o_ref[...] = reference.finalize(state)
    if return_residuals:
      m_out_ref[...] = m_sc[...]
      l_out_ref[...] = l_sc[...]


def _check_inputs(q, q_scale, q_pos, packed, residual, bits, group):
  codes_per_byte(bits)
  b, h, m, d = q.shape
  if group % INT8_SUBLANES:
    raise ValueError(f"{group=} must be a multiple of {INT8_SUBLANES} on TPU")
  reference.check_cache_shapes(packed, residual, batch=b, heads=h, head_dim=d, bits=bits,
                               group=group)
  if q.dtype != jnp.int8:
    raise ValueError(f"q must be int8, got {q.dtype}")
  if q_scale.shape != (b, h, m) or q_pos.shape != (b, m):
    raise ValueError(f"{q_scale.shape=} must be {(b, h, m)}, {q_pos.shape=} {(b, m)}")


def flashq_decode(
    q, q_scale, q_pos, packed: PackedKV, residual: ResidualKV, lengths, *,
    bits: int, group: int, sas: SASParams,
    block_sizes: BlockSizes | None = None, interpret=False,
    return_residuals: bool = False):
  """FlashQ decode on TPU; same inputs and outputs as ``flashq_decode_reference``.

  Args:
    q: int8 [B, H, M, D], the query rows of each KV head (GQA group x new
      tokens); q_scale: f32 [B, H, M] including the softmax scale.
    q_pos: int32 [B, M], position of each row (keys ``<= q_pos`` are visible).
    packed, residual: this bit width's share of the cache (``PackedKV``,
      ``ResidualKV``; capacity ``T`` a multiple of ``group`` and of
      ``block_k``).
    lengths: int32 [B] tokens in the cache (``(lengths // group) * group``
      packed, the rest in the residual window).
    bits: 4 or 2; group: stage-2 group size (the softmax tile).
    sas: SAS exponent parameters (base 2 or exact).
    block_sizes: cache tokens per grid step.
    interpret: run in the Pallas TPU interpreter (``True`` or a
      ``pltpu.InterpretParams``); for CPU tests.
    return_residuals: also return ``(m, l)`` f32 [B, H, M].
  Returns:
    f32 [B, H, M, D] [, (m, l)].
  """
  if not sas.exact and sas.base != 2.0:
    raise NotImplementedError(
        "the TPU kernels support the base-2 SAS exponent (or exact=True); the "
        "base-e table is a gather that Mosaic TPU does not lower")
  _check_inputs(q, q_scale, q_pos, packed, residual, bits, group)
  b, h, m, d = q.shape
  t = packed.k_codes.shape[2]
  dk = packed.k_codes.shape[-1]
  dg = packed.v_scale2.shape[-1]
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(seq_len_k=t, group=group, head_dim=d)
  block_k = block_sizes.block_k
  if block_k % group or t % block_k:
    raise ValueError(
        f"{block_k=} must be a multiple of {group=} and divide the capacity {t=}")
  n_sub = block_k // group
  n_blocks = t // block_k
  mp = common.cdiv(m, NUM_SUBLANES) * NUM_SUBLANES  # f32 sublane tile
  pad = ((0, 0), (0, 0), (0, mp - m))
  q_p = jnp.pad(q, pad + ((0, 0),))
  qs_p = jnp.pad(q_scale.astype(jnp.float32), pad)[..., None]
  qpos_p = jnp.pad(jnp.asarray(q_pos, jnp.int32), pad[1:], constant_values=-1)[..., None]
  lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (b,))

  def row_map(bi, hi, j, len_ref):
    del j, len_ref
    return bi, hi, 0, 0

  def pos_map(bi, hi, j, len_ref):
    del hi, j, len_ref
    return bi, 0, 0

  def cache_map(bi, hi, j, len_ref):
    # Past the last block with packed tokens (and at the residual step) the
    # block index stays put, so no DMA is issued.
    n_packed = jax.lax.div(len_ref[bi], jnp.int32(group))
    last = jax.lax.div(n_packed + (n_sub - 1), jnp.int32(n_sub)) - 1
    return bi, hi, jnp.minimum(j, jnp.clip(last, 0, n_blocks - 1)), 0, 0

  def tiles(x, width):  # [B, H, T, width] -> [B, H, T/G, G, width] (free)
    return x.reshape(b, h, t // group, group, width)

  def per_group(x, width):  # [B, H, T/G * ?, width] -> [B, H, T/G, 1, width]
    return x.reshape(b, h, t // group, 1, width)

  cache_args = [
      (tiles(packed.k_codes, dk), (n_sub, group, dk)),
      (per_group(packed.k_scale2, d), (n_sub, 1, d)),
      (per_group(packed.k_zero, d), (n_sub, 1, d)),
      (per_group(packed.k_scale, group), (n_sub, 1, group)),
      (tiles(packed.v_codes, dk), (n_sub, group, dk)),
      (tiles(packed.v_scale2, dg), (n_sub, group, dg)),
      (tiles(packed.v_zero, dg), (n_sub, group, dg)),
      (per_group(packed.v_scale, group), (n_sub, 1, group)),
  ]
  residual_args = [residual.k, residual.k_scale.reshape(b, h, 1, group),
                   residual.v, residual.v_scale.reshape(b, h, 1, group)]
  in_specs = [
      pl.BlockSpec((None, None, mp, d), row_map),
      pl.BlockSpec((None, None, mp, 1), row_map),
      pl.BlockSpec((None, mp, 1), pos_map),
      *[pl.BlockSpec((None, None, *shape), cache_map) for _, shape in cache_args],
      *[pl.BlockSpec((None, None, *x.shape[2:]), row_map) for x in residual_args],
  ]
  out_shape = [jax.ShapeDtypeStruct((b, h, mp, d), jnp.float32)]
  out_specs = [pl.BlockSpec((None, None, mp, d), row_map)]
  if return_residuals:
    for _ in range(2):
      out_shape.append(jax.ShapeDtypeStruct((b, h, mp, NUM_LANES), jnp.float32))
      out_specs.append(pl.BlockSpec((None, None, mp, NUM_LANES), row_map))
  vmem = compat.TPU_VMEM
  scratch_shapes = [vmem((mp, NUM_LANES), jnp.float32),
                    vmem((mp, NUM_LANES), jnp.float32),
                    vmem((mp, d), jnp.float32)]
  kernel = functools.partial(_decode_kernel, bits=bits, sas=sas,
                             return_residuals=return_residuals)
  cache_bytes = sum(x.size * x.dtype.itemsize for x, _ in cache_args)
  outs = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid_spec=compat.TPU_PREFETCH_SCALAR_GRID_SPEC(
          num_scalar_prefetch=1,
          grid=(b, h, n_blocks + 1),
          in_specs=in_specs,
          out_specs=out_specs,
          scratch_shapes=scratch_shapes),
      compiler_params=compat.tpu_compiler_params(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=4 * b * h * mp * (t + group) * d,
          transcendentals=b * h * mp * (t + group) if sas.exact else 0,
          bytes_accessed=int(cache_bytes + q_p.size + b * h * mp * d * 4)),
      interpret=compat.tpu_interpret(interpret),
      name=f"flashq_decode_int{bits}_tpu",
  )(lengths, q_p, qs_p, qpos_p, *[x for x, _ in cache_args], *residual_args)
  out = outs[0][:, :, :m]
  if return_residuals:
    return out, (outs[1][:, :, :m, 0], outs[2][:, :, :m, 0])
  return out


def flashq_decode_reference(
    q, q_scale, q_pos, packed: PackedKV, residual: ResidualKV, lengths, *,
    bits: int, group: int, sas: SASParams,
    block_sizes: BlockSizes | None = None, interpret=False,
    return_residuals: bool = False):
  """``flashq_decode``'s inputs into ``reference.flashq_decode_reference``."""
  del block_sizes, interpret  # Tiles do not change the result.
  return reference.flashq_decode_reference(
      q, q_scale, q_pos, packed, residual, lengths, bits=bits, group=group,
      sas=sas, return_residuals=return_residuals)

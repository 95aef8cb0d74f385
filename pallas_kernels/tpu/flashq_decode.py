"""FlashQ decode attention over a progressive INT4/INT2 KV cache, for TPU.

A few new query rows per KV head (its GQA query heads x new tokens: the ``M``
rows) attend over one bit width's share of the cache (``reference.PackedKV``)
plus the INT8 residual window (``reference.ResidualKV``). The algorithm, tile by
tile, is ``reference.flashq_decode_reference``:

- one tile per stage-2 group of ``G`` tokens; the packed codes are unpacked in
  registers with shifts and masks (``packing.unpack_part``: the split layout
  yields contiguous channel slices, concatenated along lanes) and decoded to
  INT8 with exact integer arithmetic (``common.stage2_to_int8``): K with one
  ``(scale2, zero)`` per (group, channel), V with one per (token, channel group);
- int8 x int8 -> int32 ``Q.K^T`` and ``P.V`` on the MXU, per-token bf16
  stage-1 scales on the logits (K) and folded into P before P is quantized (V),
  exactly ``reference.tile_update(..., v_scale_per_token=True)``, which the
  kernel calls itself;
- the residual window is the last tile.

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


def _expand_channel_groups(x, head_dim):
  """``[N, D / g]`` per-(token, channel group) values -> int32 ``[N, D]``.

  Channel ``c`` takes column ``c // g`` (``jnp.repeat(x, g, axis=-1)``), built
  with lane masks and reductions only (no lane slicing or reshapes).
  """
  x = x.astype(jnp.int32)
  n, n_groups = x.shape
  if n_groups == 1:
    return jnp.broadcast_to(x, (n, head_dim))
  g = head_dim // n_groups
  col = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
  lane = jax.lax.broadcasted_iota(jnp.int32, (n, head_dim), 1)
  out = None
  for j in range(n_groups):
    xj = jnp.sum(jnp.where(col == j, x, 0), axis=1, keepdims=True)  # [N, 1]
    xj = jnp.broadcast_to(xj, (n, head_dim))
    out = xj if out is None else jnp.where(lane >= j * g, xj, out)
  return out


def _row_vector(x):
  """f32 ``[G]`` from a ``[1, G]`` scale row (upcast before dropping the unit
  dim: 1-D vectors stay 32-bit)."""
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
  head_dim = q_ref.shape[-1]
  length = len_ref[b]
  n_packed = jax.lax.div(length, jnp.int32(group))  # packed tiles (length >= 0)
  packed_len = n_packed * group

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, common.MASKED_MAX, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def attend(k8, k_scale, v8, v_scale, k_start, kv_len):
    """One tile through ``reference.tile_update``; k_scale [1, G], v_scale [G]."""
    s = jax.lax.dot_general(q_ref[...], k8, _NT_DIMS,
                            preferred_element_type=jnp.int32)  # [Mp, G]
    s = s.astype(jnp.float32) * qs_ref[...] * k_scale.astype(jnp.float32)
    q_pos = jnp.max(qpos_ref[...], axis=1)                              # [Mp]
    col = jax.lax.broadcasted_iota(jnp.int32, (NUM_SUBLANES, group), 1)
    k_pos = jnp.max(col, axis=0) + k_start                              # [G]
    keep = common.attention_mask(q_pos, k_pos, causal=True, local_window=None,
                                 kv_len=kv_len)
    state = reference.SoftmaxState(
        m=jnp.max(m_sc[...], axis=1), l=jnp.max(l_sc[...], axis=1),
        acc=acc_sc[...])
    state = reference.tile_update(state, s, keep, v8, v_scale, sas,
                                  v_scale_per_token=True)
    m_sc[...] = jnp.broadcast_to(state.m[:, None], m_sc.shape)
    l_sc[...] = jnp.broadcast_to(state.l[:, None], l_sc.shape)
    acc_sc[...] = state.acc

  @pl.when(j < last_step)
  def _packed_block():
    def body(i, carry):
      tile = j * n_sub + i

      @pl.when(tile < n_packed)
      def _tile():
        k8 = common.stage2_to_int8(_unpack_codes(kc_ref[i], bits),
                                   ks2_ref[i], kz_ref[i])               # [G, D]
        v8 = common.stage2_to_int8(
            _unpack_codes(vc_ref[i], bits),
            _expand_channel_groups(vs2_ref[i], head_dim),
            _expand_channel_groups(vz_ref[i], head_dim))                # [G, D]
        attend(k8, ksc_ref[i], v8, _row_vector(vsc_ref[i]), tile * group,
               packed_len)

      return carry

    jax.lax.fori_loop(0, n_sub, body, 0)

  @pl.when(j == last_step)
  def _residual_and_store():
    attend(rk_ref[...], rks_ref[...], rv_ref[...], _row_vector(rvs_ref[...]),
           packed_len, length)
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
  t = packed.k_codes.shape[2]
  if group % INT8_SUBLANES:
    raise ValueError(f"{group=} must be a multiple of {INT8_SUBLANES} on TPU")
  if t % group:
    raise ValueError(f"cache capacity {t=} must be a multiple of {group=}")
  g = min(group, d)
  expected = {
      "k_codes": (b, h, t, d * bits // 8), "k_scale2": (b, h, t // group, d),
      "k_zero": (b, h, t // group, d), "k_scale": (b, h, t),
      "v_codes": (b, h, t, d * bits // 8), "v_scale2": (b, h, t, d // g),
      "v_zero": (b, h, t, d // g), "v_scale": (b, h, t),
  }
  for name, shape in expected.items():
    if getattr(packed, name).shape != shape:
      raise ValueError(
          f"packed.{name} has shape {getattr(packed, name).shape}, expected {shape}")
  for name, shape in {"k": (b, h, group, d), "k_scale": (b, h, group),
                      "v": (b, h, group, d), "v_scale": (b, h, group)}.items():
    if getattr(residual, name).shape != shape:
      raise ValueError(
          f"residual.{name} has shape {getattr(residual, name).shape}, expected {shape}")
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

"""FlashQ decode attention over a packed INT4/INT2 KV cache, Pallas Triton.

The algorithm of ``pallas_kernels.reference.flashq_decode_reference`` as a
split-K (flash-decoding) kernel. The grid runs over (batch, KV head, split);
the ``M`` query rows of a KV head (its GQA query heads x new tokens) form the
M dimension of every dot, padded to 16 for the tensor cores. Each program walks
its share of the packed tiles (one stage-2 group of ``G`` tokens each) in one
loop. Per tile, the raw packed codes go straight into int8 dots; the stage-2
scales and zero points never touch a code:

  q2, r = requantize_rows(q8 * k_scale2)         K's per-channel s2 folded into Q
  s  = (q2 . codes_k^T - q2 . k_zero) * r * q_scale * k_scale
  m, alpha, p = SAS online-softmax update         (common.online_softmax_update)
  p8, p_scale = quantize_rows(p * v_scale * v_scale2)   per V channel group
  acc = acc * alpha + (p8 . codes_v - p8 . v_zero) * p_scale

so the per-code work is one shift and one mask of the loaded bytes (the split
packing layout puts codes ``[part*w, (part+1)*w)`` of a row in bit field
``part`` of bytes ``[0, w)``: each part is a contiguous channel range, and the
query and the accumulator are kept per part). The INT8 residual window (at
most ``G`` tokens) is one more partial computed outside the kernel
(``reference.residual_window_partial``): in the kernel, its second code path
raised registers from 189 to 239 per thread (4 warps). The partials
``(out, m, l)`` are merged by log-sum-exp (``reference.combine_partial_results``).

Split-K changes the order of the online softmax, so the result equals the
sequential reference only up to P's quantization rounding and the SAS
threshold, which apply per split; ``flashq_decode_reference`` below runs the
reference per split and combines, the exact counterpart of this kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common, compat, reference, tuned_block_sizes
from pallas_kernels.packing import codes_per_byte
from pallas_kernels.reference import PackedKV, ResidualKV
from pallas_kernels.sas import SASParams

KERNEL_NAME = "flashq_decode"
MIN_ROWS = 16        # tensor-core M; query rows are padded to this
NUM_SMS_FALLBACK = 132  # H100 SXM; only used when the device is unknown
_NUM_WARPS = (1, 2, 4, 8)
_DOT_DTYPES = ("int8", "bfloat16")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BlockSizes:
  """Launch parameters of ``flashq_decode`` (the key tile is the stage-2 group).

  Attributes:
    num_splits: programs per (batch, KV head) along the cache (split-K).
    num_warps, num_stages: Triton launch parameters.
    dot_dtype: "int8" dots, or "bfloat16" dots on the same integer values
      (exact: |products| < 2**14 and sums < 2**24 in f32), for tiles that
      8-bit tensor-core dots do not accept (K < 32).
  """

  num_splits: int = 8
  num_warps: int = 4
  num_stages: int = 3
  dot_dtype: str = "int8"

  def __post_init__(self):
    for name in ("num_splits", "num_stages"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1")
    if self.num_warps not in _NUM_WARPS:
      raise ValueError(f"num_warps={self.num_warps!r} must be one of {_NUM_WARPS}")
    if self.dot_dtype not in _DOT_DTYPES:
      raise ValueError(f"dot_dtype={self.dot_dtype!r} must be one of {_DOT_DTYPES}")

  @classmethod
  def get_default(cls, *, batch: int, num_kv_heads: int, head_dim: int,
                  capacity: int, group: int, bits: int,
                  device_kind: str | None = None) -> BlockSizes:
    """Tuned sizes for this device (heuristic: about 16 programs per SM)."""
    if device_kind is None:
      device_kind = tuned_block_sizes.current_device_kind()
    entry = tuned_block_sizes.lookup(
        KERNEL_NAME, device_kind=device_kind, dtype=f"int{bits}", head_dim=head_dim,
        seq_len=capacity)
    n_tiles = max(capacity // group, 1)
    if entry is None:
      # Heuristic (from the H100 sweep): ~16 programs per SM.
      entry = dict(num_programs=16 * NUM_SMS_FALLBACK, num_warps=4, num_stages=3)
    if "num_programs" in entry:
      programs = entry.pop("num_programs")
      entry["num_splits"] = -(-programs // max(batch * num_kv_heads, 1))
    entry["num_splits"] = max(1, min(entry["num_splits"], n_tiles))
    if head_dim // codes_per_byte(bits) < 32:
      entry["dot_dtype"] = "bfloat16"
    return cls(**entry)


def _sizes_or_default(block_sizes, q, packed: PackedKV, *, group: int, bits: int):
  if block_sizes is not None:
    return block_sizes
  b, h, _, d = q.shape
  return BlockSizes.get_default(batch=b, num_kv_heads=h, head_dim=d,
                                capacity=packed.k_codes.shape[2], group=group, bits=bits)


def _dot_i32(a, b, *, trans_b: bool, dot_dtype: str):
  """Exact int32 ``a @ b`` (``a @ b.T``) of int8-valued operands."""
  if dot_dtype == "int8":
    return compat.triton_dot(a, b, trans_b=trans_b, preferred_element_type=jnp.int32)
  out = compat.triton_dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                          trans_b=trans_b, preferred_element_type=jnp.float32)
  return out.astype(jnp.int32)


def _decode_kernel(
    len_ref,      # [] int32: tokens in the cache
    q_ref,        # [Mp, D] int8
    q_scale_ref,  # [Mp] f32
    q_pos_ref,    # [Mp] int32
    k_codes_ref,  # [T, W] uint8, W = D * bits / 8
    k_scale2_ref,  # [T / G, D] uint8
    k_zero_ref,   # [T / G, D] int8
    k_scale_ref,  # [T] bf16
    v_codes_ref,  # [T, W] uint8
    v_scale2_ref,  # [T, D / Gv] uint8, Gv = min(G, D)
    v_zero_ref,   # [T, D / Gv] int8
    v_scale_ref,  # [T] bf16
    o_ref,        # [Mp, D] f32 (normalized partial)
    m_ref,        # [Mp] f32
    l_ref,        # [Mp] f32
    *, bits: int, group: int, num_splits: int, sas: SASParams, dot_dtype: str):
  rows, head_dim = q_ref.shape
  per_byte = codes_per_byte(bits)
  mask = (1 << bits) - 1
  width = head_dim // per_byte           # channels per bit field (part)
  v_group = min(group, head_dim)
  chunk = min(width, v_group)            # channels with one V stage-2 scale
  chunks = [(part, j) for part in range(per_byte) for j in range(width // chunk)]
  v_groups = sorted({(p * width + j * chunk) // v_group for p, j in chunks})
  dot = functools.partial(_dot_i32, dot_dtype=dot_dtype)

  split = pl.program_id(2)
  length = len_ref[()]
  n_packed = length // group
  per_split = (n_packed + num_splits - 1) // num_splits
  t0 = jnp.minimum(split * per_split, n_packed)
  t1 = jnp.minimum(t0 + per_split, n_packed)
  q_pos = q_pos_ref[...]
  q_scale = q_scale_ref[...]
  q_parts = [q_ref[:, pl.ds(part * width, width)].astype(jnp.float32)
             for part in range(per_byte)]

  def codes_of(byte_tile, part):
    """Raw stage-2 codes of bit field ``part`` as int8 (0 .. 2**bits - 1)."""
    codes = byte_tile >> (part * bits) if part else byte_tile
    if part < per_byte - 1:
      codes = codes & mask
    return codes.astype(jnp.int8)

  def load_tile(j):
    tok = pl.multiple_of(j * group, group)
    rows_ = pl.ds(tok, group)
    return dict(
        tok=tok,
        k_bytes=k_codes_ref[rows_, :],                               # [G, W] uint8
        k_scale2=[k_scale2_ref[j, pl.ds(p * width, width)] for p in range(per_byte)],
        k_zero=[k_zero_ref[j, pl.ds(p * width, width)] for p in range(per_byte)],
        k_scale=k_scale_ref[rows_],                                  # [G]
        v_bytes={j_: v_codes_ref[rows_, pl.ds(j_ * chunk, chunk)]    # [G, c] uint8
                 for j_ in range(width // chunk)},
        v_scale=v_scale_ref[rows_],                                  # [G]
        v_scale2={g: v_scale2_ref[rows_, g] for g in v_groups},      # [G] uint8
        v_zero={g: v_zero_ref[rows_, g] for g in v_groups},          # [G] int8
    )

  def softmax(state, s, keep):
    m, l, _ = state
    m_new, alpha, p = common.online_softmax_update(m, s, keep, sas)
    return m_new, alpha, p, l * alpha + jnp.sum(p, axis=-1)

  def accumulate(state, m_new, alpha, l_new, pvs):
    """``acc = acc * alpha + pv`` per channel chunk."""
    accs = tuple(acc * alpha[:, None] + pv for acc, pv in zip(state[2], pvs))
    return m_new, l_new, accs

  def quantize_weights(p, v_scale, v_scale2=None):
    """``p`` times V's per-token scales, quantized per row (``decode_tile_update``)."""
    w = v_scale.astype(jnp.float32)
    if v_scale2 is not None:
      w = w * v_scale2.astype(jnp.float32)
    return common.quantize_rows(p * w[None, :])

  def packed_logits(tile):
    """``reference.packed_key_logits`` of a packed tile, ``[Mp, G]`` f32."""
    q2, r = common.requantize_rows(
        [q * s2.astype(jnp.float32)[None, :] for q, s2 in zip(q_parts, tile["k_scale2"])])
    s = None
    corr = None
    for part in range(per_byte):
      s_part = dot(q2[part], codes_of(tile["k_bytes"], part), trans_b=True)   # [Mp, G]
      c_part = common.zero_point_correction(q2[part], tile["k_zero"][part])  # [Mp]
      s = s_part if s is None else s + s_part
      corr = c_part if corr is None else corr + c_part
    s = s.astype(jnp.float32) - corr[:, None]
    return s * (r * q_scale)[:, None] * tile["k_scale"].astype(jnp.float32)[None, :]

  def packed_pv(tile, p):
    """``(p8_g . codes - p8_g . z_g) * p_scale_g`` per channel chunk ``[Mp, c]``."""
    weights = {}
    for g in v_groups:
      p_q, p_scale = quantize_weights(p, tile["v_scale"], tile["v_scale2"][g])
      weights[g] = (p_q, p_scale, common.zero_point_correction(p_q, tile["v_zero"][g]))
    pvs = []
    for part, j_ in chunks:
      p_q, p_scale, corr = weights[(part * width + j_ * chunk) // v_group]
      pv = dot(p_q, codes_of(tile["v_bytes"][j_], part), trans_b=False)      # [Mp, c]
      pvs.append((pv.astype(jnp.float32) - corr[:, None]) * p_scale[:, None])
    return pvs

  def packed_tile(j, state):
    tile = load_tile(j)
    s = packed_logits(tile)
    # Causal mask: a packed token past a row's position only exists when
    # several new tokens are decoded at once.
    k_pos = tile["tok"] + jnp.arange(group, dtype=jnp.int32)
    keep = common.attention_mask(q_pos, k_pos, causal=True, local_window=None)
    m_new, alpha, p, l_new = softmax(state, s, keep)
    return accumulate(state, m_new, alpha, l_new, packed_pv(tile, p))

  state = (jnp.full((rows,), common.MASKED_MAX, jnp.float32),
           jnp.zeros((rows,), jnp.float32),
           tuple(jnp.zeros((rows, chunk), jnp.float32) for _ in chunks))
  state = jax.lax.fori_loop(t0, t1, packed_tile, state)

  m, l, accs = state
  for (part, j_), acc in zip(chunks, accs):
    out = reference.finalize(reference.SoftmaxState(m=m, l=l, acc=acc))
    o_ref[:, pl.ds(part * width + j_ * chunk, chunk)] = out
  m_ref[...] = m
  l_ref[...] = l


def _check_cache(q, packed: PackedKV, residual: ResidualKV, bits: int, group: int):
  b, h, _, d = q.shape
  reference.check_cache_shapes(packed, residual, batch=b, heads=h, head_dim=d, bits=bits,
                               group=group)
  w = d // codes_per_byte(bits)
  gv = min(group, d)
  if not (common.is_pow2(d) and common.is_pow2(group) and group >= MIN_ROWS and w >= 8):
    raise NotImplementedError(
        f"head_dim={d} and group={group} must be powers of two (group >= {MIN_ROWS}, "
        f"head_dim * bits / 8 >= 8)")
  if gv % min(w, gv) or w % min(w, gv):
    raise NotImplementedError(f"V groups of {gv} channels do not align with {bits=}")


@functools.partial(
    jax.jit, static_argnames=(
        "bits", "group", "sas", "block_sizes", "interpret", "debug", "return_residuals"))
def flashq_decode(q, q_scale, q_pos, packed: PackedKV, residual: ResidualKV, lengths, *,
                  bits: int, group: int, sas: SASParams,
                  block_sizes: BlockSizes | None = None, interpret: bool = False,
                  debug: bool = False, return_residuals: bool = False):
  """Attention of a few query rows over a progressive INT4/INT2 cache (split-K).

  Args:
    q: int8 [B, H, M, D], the query rows of each KV head (GQA group x new
      tokens); q_scale: f32 [B, H, M] with the softmax scale folded in.
    q_pos: int32 [B, M], each row's position (causal: keys ``<= q_pos``).
    packed, residual: this bit width's cache arrays (``reference.PackedKV``,
      ``reference.ResidualKV``).
    lengths: int32 [B]; ``(lengths // group) * group`` tokens are packed, the
      rest are in the residual window.
    bits, group: 4 or 2; the stage-2 group (= the key tile).
    block_sizes: ``BlockSizes``; ``None`` uses ``BlockSizes.get_default``.
  Returns:
    f32 [B, H, M, D] and, with ``return_residuals``, ``(m, l)`` [B, H, M].
  """
  b, h, m_rows, d = q.shape
  _check_cache(q, packed, residual, bits, group)
  t = packed.k_codes.shape[2]
  block_sizes = _sizes_or_default(block_sizes, q, packed, group=group, bits=bits)
  splits = block_sizes.num_splits
  lengths = jnp.asarray(lengths, jnp.int32)
  q_scale = q_scale.astype(jnp.float32)
  res_out, res_m, res_l = reference.residual_window_partial(
      q, q_scale, q_pos, residual, lengths, group=group, sas=sas)
  rows = max(MIN_ROWS, common.next_pow2(m_rows))
  pad = rows - m_rows
  if pad:
    q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
    q_scale = jnp.pad(q_scale, ((0, 0), (0, 0), (0, pad)))
    # Padded rows see every key (their output is dropped).
    q_pos = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).max)
  q_pos = jnp.broadcast_to(q_pos[:, None, :], (b, h, rows)).astype(jnp.int32)

  def spec(*block):
    nd = len(block)
    return pl.BlockSpec((None, None) + block, lambda b_, h_, s_: (b_, h_) + (0,) * nd)

  wb = packed.k_codes.shape[3]
  gv = min(group, d)
  in_specs = [
      pl.BlockSpec((None,), lambda b_, h_, s_: (b_,)),
      spec(rows, d), spec(rows), spec(rows),
      spec(t, wb), spec(t // group, d), spec(t // group, d), spec(t),
      spec(t, wb), spec(t, d // gv), spec(t, d // gv), spec(t),
  ]
  out_specs = [
      pl.BlockSpec((None, None, None, rows, d), lambda b_, h_, s_: (b_, h_, s_, 0, 0)),
      pl.BlockSpec((None, None, None, rows), lambda b_, h_, s_: (b_, h_, s_, 0)),
      pl.BlockSpec((None, None, None, rows), lambda b_, h_, s_: (b_, h_, s_, 0)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((b, h, splits, rows, d), jnp.float32),
      jax.ShapeDtypeStruct((b, h, splits, rows), jnp.float32),
      jax.ShapeDtypeStruct((b, h, splits, rows), jnp.float32),
  ]
  kernel = functools.partial(
      _decode_kernel, bits=bits, group=group, num_splits=splits, sas=sas,
      dot_dtype=block_sizes.dot_dtype)
  outs, ms, ls = pl.pallas_call(
      kernel,
      grid=(b, h, splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compat.triton_compiler_params(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      debug=debug,
      name=KERNEL_NAME,
  )(lengths, q, q_scale, q_pos, *packed)
  outs, ms, ls = outs[:, :, :, :m_rows], ms[:, :, :, :m_rows], ls[:, :, :, :m_rows]
  out, m, l = reference.combine_partial_results(
      [outs[:, :, i] for i in range(splits)] + [res_out],
      [ms[:, :, i] for i in range(splits)] + [res_m],
      [ls[:, :, i] for i in range(splits)] + [res_l], base=sas.base)
  if return_residuals:
    return out, (m, l)
  return out


def flashq_decode_reference(q, q_scale, q_pos, packed: PackedKV, residual: ResidualKV,
                            lengths, *, bits: int, group: int, sas: SASParams,
                            block_sizes: BlockSizes | None = None,
                            interpret: bool = False, debug: bool = False,
                            return_residuals: bool = False):
  """``flashq_decode`` in pure JAX: ``reference.flashq_decode_reference`` run on
  each split's packed tiles, combined with ``reference.residual_window_partial``.
  """
  del interpret, debug
  b = q.shape[0]
  t = packed.k_codes.shape[2]
  splits = _sizes_or_default(block_sizes, q, packed, group=group, bits=bits).num_splits
  lengths = jnp.asarray(lengths, jnp.int32)
  n_tiles = t // group
  tiles_per = -(-n_tiles // splits)                      # static bound per split
  n_packed = lengths // group
  per_split = (n_packed + splits - 1) // splits
  token_axis = {"k_codes": 2, "k_scale": 2, "v_codes": 2, "v_scale2": 2,
                "v_zero": 2, "v_scale": 2, "k_scale2": None, "k_zero": None}
  outs, ms, ls = [], [], []
  for s in range(splits):
    start = jnp.minimum(s * per_split, n_packed)                       # [B]
    count = jnp.minimum(start + per_split, n_packed) - start
    tiles = jnp.minimum(start[:, None] + jnp.arange(tiles_per), n_tiles - 1)  # [B, n]
    tokens = (tiles[:, :, None] * group + jnp.arange(group)).reshape(b, -1)

    def take(x, idx):
      idx = idx.reshape((b, 1, -1) + (1,) * (x.ndim - 3))
      return jnp.take_along_axis(x, idx, axis=2)

    view = PackedKV(**{
        name: take(getattr(packed, name), tokens if axis is not None else tiles)
        for name, axis in token_axis.items()})
    # ``view_lengths`` holds no residual tokens: the window is masked here.
    out, (m, l) = reference.flashq_decode_reference(
        q, q_scale, q_pos - (start * group)[:, None], view, residual, count * group,
        bits=bits, group=group, sas=sas, return_residuals=True)
    outs.append(out)
    ms.append(m)
    ls.append(l)
  res_out, res_m, res_l = reference.residual_window_partial(
      q, q_scale, q_pos, residual, lengths, group=group, sas=sas)
  out, m, l = reference.combine_partial_results(
      outs + [res_out], ms + [res_m], ls + [res_l], base=sas.base)
  if return_residuals:
    return out, (m, l)
  return out

"""FlashQ decode attention over a packed INT4/INT2 KV cache, Pallas Triton.

The algorithm of ``pallas_kernels.reference.flashq_decode_reference`` as a
split-K (flash-decoding) kernel. The grid runs over (batch, KV head, split);
each program walks its share of the packed tiles (one stage-2 group of ``G``
tokens each) with the ``M`` query rows of its KV head (GQA heads x new tokens).

Decode has a handful of query rows, so a tensor-core dot would pad them to 16
and three quarters of every softmax, P quantization and Q requantization would
be padding (the measured bottleneck of the earlier MMA kernel). Both products
here are int8 dot products on the CUDA cores instead: ``dp4a`` multiplies the
four bytes of two words and adds them to an int32, exactly, and the raw packed
codes feed it after one shift and one mask per word:

  q2, r = requantize_rows(q8 * k_scale2)           K's per-channel s2 folded into Q
  s  = (dp4a(codes_k, q2) summed - q2 . k_zero) * r * q_scale * k_scale
  m, alpha, p = SAS online-softmax update           (common.online_softmax_update)
  p8, p_scale = quantize_rows(p * v_scale * v_scale2)   per V channel group
  acc = acc * alpha + (dp4a(codes_v, p8) summed - p8 . v_zero) * p_scale

K's packed words hold four channels of one token per byte field (the split
packing layout puts channels ``[part*w, (part+1)*w)`` in bit field ``part``), so
Q.K^T sums over words directly, with ``q2`` packed four channels a word. P.V
sums over tokens, so four tokens' words are transposed bytewise in registers
(``prmt``, 2 instructions a word) to hold one channel's four tokens. One warp
per program keeps every reduction inside the warp.

The INT8 residual window (at most ``G`` tokens) is one more program's partial
(``reference.residual_window_partial``: ``dp4a`` with signed codes, no stage 2);
the partials ``(out, m, l)`` are merged by log-sum-exp
(``reference.combine_partial_results``).
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
from pallas_kernels.gpu import softmax
from pallas_kernels.packing import codes_per_byte
from pallas_kernels.reference import PackedKV, ResidualKV
from pallas_kernels.sas import SASParams

KERNEL_NAME = "flashq_decode"
NUM_SMS_FALLBACK = 132  # H100 SXM; only used when the device is unknown
_NUM_WARPS = (1, 2, 4, 8)
# Byte selectors of a 4x4 byte transpose in two rounds of ``prmt``.
_PAIR_LOW, _PAIR_HIGH = 0x5140, 0x7362      # bytes 0,1 / 2,3 of two words, interleaved
_HALF_LOW, _HALF_HIGH = 0x5410, 0x7632      # low / high halves of two words


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BlockSizes:
  """Launch parameters of ``flashq_decode`` (the key tile is the stage-2 group).

  Attributes:
    num_splits: programs per (batch, KV head) along the cache (split-K).
    num_warps, num_stages: Triton launch parameters. One warp per program
      keeps every reduction in the warp (no shared-memory round trips); the
      occupancy comes from the number of programs.
    qk_words: K words (4 channels of a bit field each) per dp4a product in
      Q.K^T; larger products need fewer additions but more registers.
    convert: "magic" rounds, converts and floors with exact bit tricks on
      the FMA/ALU pipes (``pallas_kernels.gpu.softmax``); "cvt" with the
      hardware conversions, on the pipe ``exp2`` also needs. Same results.
  """

  num_splits: int = 8
  num_warps: int = 1
  num_stages: int = 1
  qk_words: int = 4
  convert: str = "magic"

  def __post_init__(self):
    if not common.is_pow2(self.qk_words):
      raise ValueError(f"qk_words={self.qk_words!r} must be a power of two")
    for name in ("num_splits", "num_stages"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1")
    if self.num_warps not in _NUM_WARPS:
      raise ValueError(f"num_warps={self.num_warps!r} must be one of {_NUM_WARPS}")
    if self.convert not in ("magic", "cvt"):
      raise ValueError(f"convert={self.convert!r} must be 'magic' or 'cvt'")

  @classmethod
  def get_default(cls, *, batch: int, num_kv_heads: int, head_dim: int,
                  capacity: int, group: int, bits: int,
                  device_kind: str | None = None) -> BlockSizes:
    """Tuned sizes for this device. Splits minimize a wave model of the
    grid: ``ceil(programs / resident_programs)`` waves, each as long as one
    program's tiles plus ``program_overhead_tiles`` (ties: fewer splits)."""
    if device_kind is None:
      device_kind = tuned_block_sizes.current_device_kind()
    entry = tuned_block_sizes.lookup(
        KERNEL_NAME, device_kind=device_kind, dtype=f"int{bits}", head_dim=head_dim,
        seq_len=capacity)
    if entry is None:
      entry = dict(resident_programs=8 * NUM_SMS_FALLBACK, program_overhead_tiles=2)
    resident, overhead = entry.pop("resident_programs"), entry.pop("program_overhead_tiles")
    heads = max(batch * num_kv_heads, 1)
    n_tiles = max(capacity // group, 1)

    def cost(splits):
      return -(-heads * splits // resident) * (-(-n_tiles // splits) + overhead)
    entry["num_splits"] = min(range(1, n_tiles + 1), key=cost)
    return cls(**entry)


def _sizes_or_default(block_sizes, q, packed: PackedKV, *, group: int, bits: int):
  if block_sizes is not None:
    return block_sizes
  b, h, _, d = q.shape
  return BlockSizes.get_default(batch=b, num_kv_heads=h, head_dim=d,
                                capacity=packed.k_codes.shape[2], group=group, bits=bits)


def _bit_field(words, part: int, bits: int):
  """Bit field ``part`` of every byte of int32 ``words``: four codes as bytes."""
  mask = ((1 << bits) - 1) * 0x01010101
  return ((words >> (part * bits)) if part else words) & mask


def _transpose_bytes(w0, w1, w2, w3, *, interpret: bool):
  """4x4 byte transpose of four words: ``out[k].byte[i] = w_i.byte[k]``."""
  prmt = functools.partial(compat.prmt, interpret=interpret)
  t0, t1 = prmt(w0, w1, _PAIR_LOW), prmt(w0, w1, _PAIR_HIGH)
  t2, t3 = prmt(w2, w3, _PAIR_LOW), prmt(w2, w3, _PAIR_HIGH)
  return (prmt(t0, t2, _HALF_LOW), prmt(t0, t2, _HALF_HIGH),
          prmt(t1, t3, _HALF_LOW), prmt(t1, t3, _HALF_HIGH))


def _row_words(x, *, nonnegative: bool = False):
  """int8 ``[M, 4w]`` -> int32 ``[w, M, 1]``, byte ``b`` of word ``j`` of row
  ``m`` = ``x[m, 4j + b]``: the rows' operand of a dp4a product ``[w, M, N]``.
  ``nonnegative`` values skip the mask that keeps a negative byte's sign bits
  out of the next bytes."""
  rows, n = x.shape
  shifts = jnp.arange(4, dtype=jnp.int32) * 8
  x = x.astype(jnp.int32)
  if not nonnegative:
    x = x & 0xFF
  return jnp.sum(x.reshape(rows, n // 4, 4) << shifts, axis=-1).T[:, :, None]


def _decode_kernel(
    len_ref,          # [] int32: tokens in the cache
    q_ref,            # [Mp, D] int8
    q_scale_ref,      # [Mp] f32
    q_pos_ref,        # [Mp] int32
    k_words_ref,      # [T, Wd] int32, Wd = D * bits / 32: packed K codes
    k_scale2_ref,     # [T / G, D] uint8
    k_zero_ref,       # [T / G, D] int8
    k_scale_ref,      # [T] bf16
    v_words_ref,      # [T, Wd] int32: packed V codes
    v_scale2_ref,     # [T, D / Gv] uint8, Gv = min(G, D)
    v_zero_ref,       # [T, D / Gv] int8
    v_scale_ref,      # [T] bf16
    res_k_ref,        # [G, D / 4] int32: the INT8 residual window's K, 4 channels a word
    res_k_scale_ref,  # [G] bf16
    res_v_ref,        # [G, D / 4] int32
    res_v_scale_ref,  # [G] bf16
    o_ref,            # [Mp, D] f32 (normalized partial)
    m_ref,            # [Mp] f32
    l_ref,            # [Mp] f32
    *, bits: int, group: int, num_splits: int, qk_words: int, convert: str, sas: SASParams,
    interpret: bool):
  rows = q_pos_ref.shape[0]
  n_words = k_words_ref.shape[1]         # words per token (of each K/V row)
  per_byte = codes_per_byte(bits)
  width = 4 * n_words                    # channels per bit field (part)
  head_dim = width * per_byte
  v_group = min(group, head_dim)
  chunk = min(n_words, v_group // 4)     # words of a part within one V group
  n_quads = group // 4
  qk_chunk = min(n_words, qk_words)      # K words per dp4a product

  def dp4a_products(cols, row_words, acc=None, *, signed_a=False):
    """``dp4a`` of every column word ``cols[w, n]`` with every row word
    ``row_words[w, m, 0]`` (``_row_words``), ``[w, M, N]`` int32, plus ``acc``."""
    shape = (cols.shape[0], row_words.shape[1], cols.shape[1])
    acc = jnp.zeros(shape, jnp.int32) if acc is None else acc
    return compat.dp4a(jnp.broadcast_to(cols[:, None, :], shape),
                       jnp.broadcast_to(row_words, shape), acc,
                       interpret=interpret, signed_a=signed_a)

  def channel0(part, c):
    """First channel of word chunk ``c`` of bit field ``part``."""
    return part * width + 4 * c * chunk

  chunks = [(k, part, c) for k in range(4) for part in range(per_byte)
            for c in range(n_words // chunk)]
  v_groups = sorted({channel0(part, c) // v_group for _, part, c in chunks})

  split = pl.program_id(2)
  length = len_ref[()]
  n_packed = length // group
  q_pos = q_pos_ref[...]
  q_scale = q_scale_ref[...]

  def quads(ref, tok, words):
    """The words of tokens ``tok + 4i + b``, one ``[G/4, w]`` array per ``b``;
    ``_transpose_bytes`` of them holds, in word ``[i, w]`` of output ``k``,
    byte ``k`` of word ``w`` of tokens ``4i .. 4i + 3``."""
    return [ref[pl.ds(tok + b, n_quads, stride=4), words] for b in range(4)]

  def write(m, l, accs):
    """Stores the normalized partial; ``accs``: ``{first channel: [Mp, w]}``
    holding channels ``first + 4i``."""
    for first, acc in accs.items():
      out = reference.finalize(reference.SoftmaxState(m=m, l=l, acc=acc))
      o_ref[:, pl.ds(first, acc.shape[1], stride=4)] = out
    m_ref[...] = m
    l_ref[...] = l

  # Q.K^T runs over ``qk_chunk`` words of each K row at a time (a whole row's
  # products spill registers); ``pieces`` are those (bit field, word chunk)s.
  pieces = [(part, c) for c in range(n_words // qk_chunk) for part in range(per_byte)]
  channels = {key: pl.ds(key[0] * width + 4 * key[1] * qk_chunk, 4 * qk_chunk)
              for key in pieces}
  q_pieces = {key: q_ref[:, channels[key]].astype(jnp.float32) for key in pieces}

  def load_tile(j):
    """Every global load of packed tile ``j``, issued before its arithmetic:
    a load placed after one of the layout conversions' barriers waits out the
    memory latency on its own (9% of the kernel's time on H100; loading a
    tile ahead instead spills registers and was slower)."""
    tok = pl.multiple_of(j * group, group)
    rows_ = pl.ds(tok, group)
    return dict(
        k_words=[k_words_ref[rows_, pl.ds(c * qk_chunk, qk_chunk)]
                 for c in range(n_words // qk_chunk)],
        k_scale2={key: k_scale2_ref[j, channels[key]] for key in pieces},
        k_zero={key: k_zero_ref[j, channels[key]] for key in pieces},
        k_scale=k_scale_ref[rows_],
        v_quads=[quads(v_words_ref, tok, pl.ds(c * chunk, chunk))
                 for c in range(n_words // chunk)],
        v_scale=v_scale_ref[rows_],
        v_scale2={g: v_scale2_ref[rows_, g] for g in v_groups},
        v_zero={g: v_zero_ref[rows_, g] for g in v_groups},
    )

  def logits(x):
    """``reference.packed_key_logits`` of a loaded tile: ``[Mp, G]`` f32.

    K's s2 is folded into the query (``reference.fold_key_scale2``) and ``q2``
    packed four channels a word."""
    q2, r = softmax.requantize_rows(
        [q_pieces[key] * x["k_scale2"][key].astype(jnp.float32)[None, :] for key in pieces],
        convert, guard=interpret)
    s = corr = acc = None
    for (part, c), (q2_float, q2_piece) in zip(pieces, q2):
      acc = dp4a_products(_bit_field(x["k_words"][c], part, bits).T, _row_words(q2_piece),
                          None if part == 0 else acc)
      c_piece = common.zero_point_correction(q2_float, x["k_zero"][(part, c)])
      corr = c_piece if corr is None else corr + c_piece
      if part == per_byte - 1:
        s_chunk = jnp.sum(acc, axis=0)
        s = s_chunk if s is None else s + s_chunk
    s = softmax.i32_to_f32(s, convert) - corr[:, None]
    return s * (r * q_scale)[:, None] * x["k_scale"].astype(jnp.float32)[None, :]

  def weights(p, x):
    """Per V group: P times V's scales, quantized per row, packed 4 tokens a word."""
    v_scale = x["v_scale"].astype(jnp.float32)
    out = {}
    for g in v_groups:
      # P >= 0: ``requantize_rows`` gives ``common.quantize_rows``'s codes.
      ((p_float, p_q),), p_scale = softmax.requantize_rows(
          [p * (v_scale * x["v_scale2"][g].astype(jnp.float32))[None, :]], convert,
          guard=interpret)
      corr = common.zero_point_correction(p_float, x["v_zero"][g])
      out[g] = (_row_words(p_q, nonnegative=True), p_scale, corr)    # [G/4, Mp, 1]
    return out

  def values_times_weights(x, weights_):
    """``(p8 . codes - p8 . v_zero) * p_scale`` per chunk ``[Mp, chunk]``, in ``chunks`` order."""
    pvs = {}
    for c, four in enumerate(x["v_quads"]):
      # Byte k of a word holds channels 4w + k of every part.
      for k, words in enumerate(_transpose_bytes(*four, interpret=interpret)):
        for part in range(per_byte):
          p8, p_scale, corr = weights_[channel0(part, c) // v_group]
          pv = jnp.sum(dp4a_products(_bit_field(words, part, bits), p8), axis=0)
          pvs[(k, part, c)] = (softmax.i32_to_f32(pv, convert) - corr[:, None]) * p_scale[:, None]
    return [pvs[key] for key in chunks]

  def tile(j, x, state):
    """One packed tile's online-softmax step on its loaded data ``x``."""
    m, l, accs = state
    s = logits(x)
    # Causal mask: a packed token past a row's position only exists when
    # several new tokens are decoded at once.
    keep = common.attention_mask(q_pos, j * group + jnp.arange(group, dtype=jnp.int32),
                                 causal=True, local_window=None)
    m_new, alpha, p = common.online_softmax_update(m, s, keep, sas)
    pvs = values_times_weights(x, weights(p, x))
    accs = tuple(acc * alpha[:, None] + pv for acc, pv in zip(accs, pvs))
    return m_new, l * alpha + jnp.sum(p, axis=-1), accs

  @pl.when(split < num_splits)
  def _packed_tiles():
    per_split = (n_packed + num_splits - 1) // num_splits
    t0 = jnp.minimum(split * per_split, n_packed)
    t1 = jnp.minimum(t0 + per_split, n_packed)
    state = (jnp.full((rows,), common.MASKED_MAX, jnp.float32),
             jnp.zeros((rows,), jnp.float32),
             tuple(jnp.zeros((rows, chunk), jnp.float32) for _ in chunks))
    m, l, accs = jax.lax.fori_loop(t0, t1, lambda j, st: tile(j, load_tile(j), st), state)
    write(m, l, {channel0(part, c) + k: acc for (k, part, c), acc in zip(chunks, accs)})

  @pl.when(split == num_splits)
  def _residual_window():
    """``reference.residual_window_partial``: the INT8 window, tokens
    ``[n_packed * G, length)``, as the last program's partial."""
    res_words = res_k_ref.shape[1]
    s = None
    for c in range(res_words // qk_chunk):
      dots = jnp.sum(dp4a_products(
          res_k_ref[:, pl.ds(c * qk_chunk, qk_chunk)].T,
          _row_words(q_ref[:, pl.ds(4 * c * qk_chunk, 4 * qk_chunk)]), signed_a=True), axis=0)
      s = dots if s is None else s + dots
    s = s.astype(jnp.float32) * q_scale[:, None] * res_k_scale_ref[...].astype(
        jnp.float32)[None, :]
    k_pos = n_packed * group + jnp.arange(group, dtype=jnp.int32)
    keep = common.attention_mask(q_pos, k_pos, causal=True, local_window=None,
                                 kv_len=length)
    m, _, p = common.online_softmax_update(
        jnp.full((rows,), common.MASKED_MAX, jnp.float32), s, keep, sas)
    p_q, p_scale = common.quantize_rows(p * res_v_scale_ref[...].astype(jnp.float32)[None, :])
    p_words = _row_words(p_q, nonnegative=True)                        # [G/4, Mp, 1]
    width8 = min(res_words, 16)                                         # words per product
    accs = {}
    for c in range(res_words // width8):
      for k, words in enumerate(_transpose_bytes(
          *quads(res_v_ref, 0, pl.ds(c * width8, width8)), interpret=interpret)):
        pv = jnp.sum(dp4a_products(words, p_words, signed_a=True), axis=0)
        accs[4 * c * width8 + k] = pv.astype(jnp.float32) * p_scale[:, None]
    write(m, jnp.sum(p, axis=-1), accs)


def _check_cache(q, packed: PackedKV, residual: ResidualKV, bits: int, group: int):
  b, h, _, d = q.shape
  reference.check_cache_shapes(packed, residual, batch=b, heads=h, head_dim=d, bits=bits,
                               group=group)
  if not (common.is_pow2(d) and common.is_pow2(group) and group >= 4 and d * bits >= 32):
    raise NotImplementedError(
        f"head_dim={d} and group={group} must be powers of two (group >= 4, "
        f"head_dim * bits >= 32)")


def _as_words(codes):
  """8-bit ``[..., W]`` -> int32 ``[..., W / 4]`` (little-endian: byte ``b`` of
  word ``j`` is byte ``4j + b``); a bitcast, no copy under jit."""
  return jax.lax.bitcast_convert_type(
      codes.reshape(codes.shape[:-1] + (codes.shape[-1] // 4, 4)), jnp.int32)


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
  rows = common.next_pow2(m_rows)
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

  wd = packed.k_codes.shape[3] // 4
  gv = min(group, d)
  n = t // group
  in_specs = [
      pl.BlockSpec((None,), lambda b_, h_, s_: (b_,)),
      spec(rows, d), spec(rows), spec(rows),
      spec(t, wd), spec(n, d), spec(n, d), spec(t),
      spec(t, wd), spec(t, d // gv), spec(t, d // gv), spec(t),
      spec(group, d // 4), spec(group), spec(group, d // 4), spec(group),
  ]
  out_specs = [
      pl.BlockSpec((None, None, None, rows, d), lambda b_, h_, s_: (b_, h_, s_, 0, 0)),
      pl.BlockSpec((None, None, None, rows), lambda b_, h_, s_: (b_, h_, s_, 0)),
      pl.BlockSpec((None, None, None, rows), lambda b_, h_, s_: (b_, h_, s_, 0)),
  ]
  partials = splits + 1      # the last program attends to the residual window
  out_shape = [
      jax.ShapeDtypeStruct((b, h, partials, rows, d), jnp.float32),
      jax.ShapeDtypeStruct((b, h, partials, rows), jnp.float32),
      jax.ShapeDtypeStruct((b, h, partials, rows), jnp.float32),
  ]
  kernel = functools.partial(
      _decode_kernel, bits=bits, group=group, num_splits=splits,
      qk_words=block_sizes.qk_words, convert=block_sizes.convert, sas=sas,
      interpret=interpret)
  outs, ms, ls = pl.pallas_call(
      kernel,
      grid=(b, h, partials),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compat.triton_compiler_params(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      debug=debug,
      name=KERNEL_NAME,
  )(lengths, q, q_scale, q_pos, _as_words(packed.k_codes), packed.k_scale2,
    packed.k_zero, packed.k_scale, _as_words(packed.v_codes), packed.v_scale2,
    packed.v_zero, packed.v_scale, _as_words(residual.k), residual.k_scale,
    _as_words(residual.v), residual.v_scale)
  outs, ms, ls = outs[:, :, :, :m_rows], ms[:, :, :, :m_rows], ls[:, :, :, :m_rows]
  out, m, l = reference.combine_partial_results(
      [outs[:, :, i] for i in range(partials)], [ms[:, :, i] for i in range(partials)],
      [ls[:, :, i] for i in range(partials)], base=sas.base)
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

"""FlashQ prefill attention in Pallas Triton: INT8 Q.K^T, SAS softmax, INT8 P.V.

The algorithm of ``pallas_kernels.reference.flashq_prefill_reference``, tiled
for the GPU: the grid runs over (batch, query head, query block); each program
keeps its INT8 query block in registers and loops over key tiles:

  s   = (q8 . k8^T)_int32                               int8 tensor cores
  t   = s * k_scale                 (logits / q_scale; with one K scale per
                                    tile, folded into the exponent's FMA)
  m, alpha, p = SAS online-softmax update of q_scale * t  (``softmax.online_softmax``)
  p8, p_scale = per-row dynamic INT8 quantization of p   (``softmax.quantize_rows``)
  acc = acc * alpha + (p8 . v8)_int32 * p_scale * v_scale[tile]
  l   = l * alpha + sum(p8) * p_scale

The per-logit steps are ``pallas_kernels.gpu.softmax``'s (shared with the
Mosaic GPU kernel): integer <-> float conversions as exact bit tricks on the
FMA/ALU pipes (``BlockSizes.convert``), P's row max from the row max of the
logits where the exponent is ``exp2``, and P's codes summed as integers. The
hardware conversions they replace (I2F, F2I, FRND) share the MUFU pipe with
``exp2`` at a fraction of the FP32 rate.

V arrives transposed (``v_t``: ``[B, Hk, D, Tk]``) so both int8 dots have a
K-major second operand, the layout Hopper's 8-bit tensor-core path needs.
Key tiles that every query row of the block would mask are never visited
(causal / local-window / kv-length bounds), and tiles that no row masks run
without the mask. GQA: query head ``h`` reads KV head ``h // (Hq // Hk)``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common, compat, reference, tuned_block_sizes
from pallas_kernels.gpu import softmax
from pallas_kernels.sas import SASParams

KERNEL_NAME = "flashq_prefill"
MIN_BLOCK = 16  # smallest tensor-core tile edge Triton accepts for a dot
_NUM_WARPS = (1, 2, 4, 8, 16)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BlockSizes:
  """Tiles and launch parameters of ``flashq_prefill``.

  Attributes:
    block_q: query rows per program (the M of both dots).
    block_k: keys per tile; also the V scale tile, so the dispatcher must
      quantize V with this block (call ``get_default`` before quantizing).
    num_warps, num_stages: Triton launch parameters.
    pv_dtype: operands of the P.V dot. "int8": int8 x int8 -> int32.
      "bfloat16": the same integer values (P codes 0..127, V codes) as bf16,
      exact (products < 2**14, sums < 2**24 for block_k <= 1024), V's codes
      read as bf16 ``[B, Hk, Tk, D]`` (``quantize_qkv(v_codes_dtype=...)``)
      and accumulated in place (the accumulator kept in units of the last
      tile's P.V scale, ``softmax.rescale_to_tile_unit``): no conversion or
      scaling per output element, at half the int8 tensor rate.
    convert: "magic" converts int32 <-> f32 exactly with a bit cast and an
      add (FMA/ALU pipes); "cvt" with hardware conversions. Same results.
    p_rounding: "half_up" quantizes P exactly as the reference
      (``floor(x + 0.5)``); "nearest_even" rounds in the FMA that scales P
      (``softmax.quantize_rows``), differing only at exact ties.
  """

  block_q: int = 128
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 2
  pv_dtype: str = "int8"
  convert: str = "magic"
  p_rounding: str = "half_up"

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < MIN_BLOCK or not common.is_pow2(value):
        raise ValueError(f"{name}={value!r} must be a power of two >= {MIN_BLOCK}")
    if self.num_warps not in _NUM_WARPS:
      raise ValueError(f"num_warps={self.num_warps!r} must be one of {_NUM_WARPS}")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"num_stages={self.num_stages!r} must be an int >= 1")
    if self.pv_dtype not in ("int8", "bfloat16"):
      raise ValueError(f"pv_dtype={self.pv_dtype!r} must be 'int8' or 'bfloat16'")
    if self.block_k > 1024:
      raise ValueError(f"block_k={self.block_k} must be <= 1024 (exact f32 sums)")
    if self.convert not in ("magic", "cvt"):
      raise ValueError(f"convert={self.convert!r} must be 'magic' or 'cvt'")
    if self.p_rounding not in ("half_up", "nearest_even"):
      raise ValueError(f"p_rounding={self.p_rounding!r} must be 'half_up' or 'nearest_even'")

  @classmethod
  def get_default(cls, *, head_dim: int, seq_len_q: int, seq_len_k: int,
                  device_kind: str | None = None, dtype: str = "int8") -> BlockSizes:
    """Tuned sizes for this device and shape (heuristic when untuned).

    Callable before quantizing: ``block_k`` is the V scale tile. Blocks are
    clamped to the (power-of-two rounded) sequence lengths.
    """
    if device_kind is None:
      device_kind = tuned_block_sizes.current_device_kind()
    entry = tuned_block_sizes.lookup(
        KERNEL_NAME, device_kind=device_kind, dtype=dtype, head_dim=head_dim,
        seq_len=seq_len_k)
    if entry is None:
      # Heuristic: the H100 D128 entry; the per-row softmax work, not the
      # dots, bounds this kernel.
      entry = dict(block_q=64, block_k=64, num_warps=4, num_stages=3,
                   p_rounding="nearest_even")
    entry["block_q"] = max(MIN_BLOCK, min(entry["block_q"], common.next_pow2(seq_len_q)))
    entry["block_k"] = max(MIN_BLOCK, min(entry["block_k"], common.next_pow2(seq_len_k)))
    return cls(**entry)


def fast_sas_params(sas: SASParams) -> SASParams:
  """The exponent this kernel runs fastest with: ``exp2`` instead of the SAS
  polynomial (``sas`` with ``exact=True``).

  Only the exponent changes: P is still quantized per row and key tile with a
  dynamic scale and P.V stays an int8 dot; the threshold sparsity goes (exp2
  weights are never exactly 0). Measured on H100 (B2 T4096 H32 D128, tuned
  blocks): 2.22 ms with exp2 vs 2.73 ms with the bf16 degree-3 polynomial
  non-causal (1.19 vs 1.46 ms causal): Triton issues ``ex2.approx`` on the
  MUFU unit in one instruction, while the polynomial costs a floor, a
  convert, the exponent-field shift, three bf16 FMAs and the threshold select
  on the FMA/ALU pipes that the softmax already saturates.
  """
  return dataclasses.replace(sas, exact=True)


def _floordiv(a, b: int):
  return jnp.floor_divide(a, b)


def _cdiv(a, b: int):
  return -jnp.floor_divide(-a, b)


def _prefill_kernel(
    offset_ref,   # [] int32: position of query 0 among the keys
    q_len_ref,    # [] int32: valid query rows
    kv_len_ref,   # [] int32: valid keys
    q_ref,        # [block_q, D] int8
    q_scale_ref,  # [block_q] f32 (softmax scale folded in)
    k_ref,        # [Tk, D] int8
    k_scale_ref,  # [Tk] f32, or [Tk // block_k] (one scale per key tile)
    v_t_ref,      # [D, Tk] int8, or V's codes [Tk, D] bf16 (pv_dtype "bfloat16")
    v_scale_ref,  # [Tk // block_k] f32
    o_ref,        # [block_q, D]
    *residual_refs,  # m, l: [block_q] f32
    sas: SASParams, causal: bool, local_window, block_sizes: BlockSizes,
    k_scale_per_tile: bool, interpret: bool):
  block_q, block_k = block_sizes.block_q, block_sizes.block_k
  num_k_tiles = k_ref.shape[0] // block_k
  convert, guard = block_sizes.convert, interpret
  magic = convert == "magic"
  bf16_pv = block_sizes.pv_dtype == "bfloat16"
  row0 = pl.program_id(2) * block_q
  offset = offset_ref[()]
  q_len = q_len_ref[()]
  kv_len = kv_len_ref[()]

  # Key tiles to visit, [lo, hi), and the unmasked middle run [lo_full, hi_full).
  n_rows = jnp.clip(q_len - row0, 0, block_q)
  q_first = offset + row0
  q_last = q_first + jnp.maximum(n_rows, 1) - 1
  lo = jnp.int32(0)
  lo_full = jnp.int32(0)
  hi = jnp.minimum(num_k_tiles, _cdiv(kv_len, block_k))
  hi_full = jnp.minimum(num_k_tiles, _floordiv(kv_len, block_k))
  if causal:
    hi = jnp.minimum(hi, _floordiv(q_last, block_k) + 1)
    hi_full = jnp.minimum(hi_full, _floordiv(q_first + 1, block_k))
  if local_window is not None:
    left, right = local_window
    lo = jnp.maximum(lo, _floordiv(q_first - left, block_k))
    hi = jnp.minimum(hi, _floordiv(q_last + right, block_k) + 1)
    lo_full = jnp.maximum(lo_full, _cdiv(q_last - left, block_k))
    hi_full = jnp.minimum(hi_full, _floordiv(q_first + right + 1, block_k))
  hi = jnp.where(n_rows > 0, jnp.maximum(hi, lo), lo)
  lo_full = jnp.clip(lo_full, lo, hi)
  hi_full = jnp.clip(hi_full, lo_full, hi)

  q = q_ref[...]
  q_scale = q_scale_ref[...]
  q_pos = q_first + jnp.arange(block_q, dtype=jnp.int32)

  def int8_dot(a, b):
    """``a . b^T`` in int32; with magic conversions biased by ``softmax.MAGIC_I``
    (Triton starts the accumulator there: a move an element, as an add would be)."""
    out = compat.triton_dot(a, b, trans_b=True, preferred_element_type=jnp.int32)
    return out + softmax.MAGIC_I if magic else out

  def tile(j, carry, *, masked: bool):
    m, l, acc, unit = carry   # m in units of logits / q_scale (``softmax.online_softmax``)
    start = pl.multiple_of(j * block_k, block_k)
    s = int8_dot(q, k_ref[pl.ds(start, block_k), :])          # [bq, bk]
    keep = None
    if masked:
      k_pos = start + jnp.arange(block_k, dtype=jnp.int32)
      keep = common.attention_mask(q_pos, k_pos, causal=causal,
                                   local_window=local_window, kv_len=kv_len)
    if k_scale_per_tile:
      m_new, alpha, p, p_max = softmax.online_softmax_tile_scale(
          m, s, keep, q_scale, k_scale_ref[j], sas, convert, guard, biased=magic)
    else:
      t = softmax.biased_to_f32(s) if magic else s.astype(jnp.float32)
      t = t * k_scale_ref[pl.ds(start, block_k)][None, :]
      m_new, alpha, p, p_max = softmax.online_softmax(m, t, keep, q_scale, sas, convert,
                                                      guard)
    p_q, p_scale, code_sum = softmax.quantize_rows(
        p, convert, guard, rounding=block_sizes.p_rounding, row_max=p_max,
        codes_dtype=jnp.bfloat16 if bf16_pv else jnp.int8)
    pv_scale = p_scale * v_scale_ref[j]
    l = l * alpha + code_sum * p_scale
    if bf16_pv:  # exact integer-valued operands, accumulated in place
      acc, unit = softmax.rescale_to_tile_unit(acc, alpha, unit, pv_scale)
      v = v_t_ref[pl.ds(start, block_k), :]                    # [bk, D] bf16 codes
      acc = acc + jnp.dot(p_q, v, preferred_element_type=jnp.float32)
      return m_new, l, acc, unit
    pv = int8_dot(p_q, v_t_ref[:, pl.ds(start, block_k)])     # v_t: [D, bk] int8
    if magic:
      return m_new, l, softmax.rescale_accumulate(acc, alpha, pv, pv_scale), unit
    return m_new, l, acc * alpha[:, None] + pv.astype(jnp.float32) * pv_scale[:, None], unit

  head_dim = q_ref.shape[-1]
  carry = (jnp.full((block_q,), common.MASKED_MAX, jnp.float32),
           jnp.zeros((block_q,), jnp.float32),
           jnp.zeros((block_q, head_dim), jnp.float32),
           jnp.ones((block_q,), jnp.float32))
  masked_tile = functools.partial(tile, masked=True)
  if local_window is not None:
    carry = jax.lax.fori_loop(lo, lo_full, masked_tile, carry)
  carry = jax.lax.fori_loop(lo_full, hi_full, functools.partial(tile, masked=False), carry)
  carry = jax.lax.fori_loop(hi_full, hi, masked_tile, carry)
  m, l, acc, unit = carry
  if bf16_pv:
    acc = acc * unit[:, None]

  row_valid = row0 + jnp.arange(block_q, dtype=jnp.int32) < q_len
  # Rows past q_len finalize as rows that saw no key (0), unless q_scale marks them NaN.
  state = reference.SoftmaxState(m=m, l=jnp.where(row_valid, l, 0.0), acc=acc)
  o_ref[...] = reference.finalize(state, q_scale[:, None]).astype(o_ref.dtype)
  if residual_refs:
    m_ref, l_ref = residual_refs
    m_ref[...] = jnp.where(row_valid & (m > common.MASKED_MAX), m * q_scale,
                           common.MASKED_MAX)
    l_ref[...] = jnp.where(row_valid, l, 0.0)


def check_inputs(q, q_scale, k, k_scale, v_t, v_scale, out_layout: str) -> tuple[int, bool]:
  """Shapes and dtypes of the transposed-V prefill inputs (this kernel's and
  Mosaic GPU's; V's codes may come as bf16 ``[B, Hk, Tk, D]`` instead).

  Returns ``block_k``, the key tile that ``v_scale``'s shape fixes, and whether
  ``k_scale`` holds one scale per key tile (``[B, Hk, Tk // block_k]``) rather
  than one per key."""
  b, hq, tq, d = q.shape
  hk, tk = k.shape[1], k.shape[2]
  if out_layout not in ("bhtd", "bthd"):
    raise ValueError(f"{out_layout=} must be 'bhtd' or 'bthd'")
  if hq % hk:
    raise ValueError(f"query heads {hq=} must be a multiple of KV heads {hk=}")
  if q.dtype != jnp.int8 or k.dtype != jnp.int8 or v_t.dtype not in (jnp.int8, jnp.bfloat16):
    raise ValueError(f"q, k must be int8 and v_t int8 (or bf16 codes), got {q.dtype}, "
                     f"{k.dtype}, {v_t.dtype}")
  if v_t.dtype == jnp.bfloat16 and v_t.shape != (b, hk, tk, d):
    raise ValueError(f"V's bf16 codes must be [B, Hk, Tk, D] = {(b, hk, tk, d)}, "
                     f"got {v_t.shape}")
  if v_t.dtype == jnp.int8 and v_t.shape != (b, hk, d, tk):
    raise ValueError(f"v_t must be [B, Hk, D, Tk] = {(b, hk, d, tk)}, got {v_t.shape}")
  n_v_tiles = v_scale.shape[-1]
  if v_scale.shape != (b, hk, n_v_tiles) or tk % n_v_tiles:
    raise ValueError(f"v_scale {v_scale.shape} must be [B, Hk, Tk // block_k] for {tk=}")
  if q_scale.shape != (b, hq, tq) or k_scale.shape not in ((b, hk, tk), (b, hk, n_v_tiles)):
    raise ValueError(f"scale shapes {q_scale.shape=} {k_scale.shape=} do not match: "
                     f"q_scale [B, Hq, Tq], k_scale [B, Hk, Tk] or [B, Hk, Tk // block_k]")
  return tk // n_v_tiles, k_scale.shape[-1] != tk


def _pad_to(x, axis: int, size: int):
  extra = size - x.shape[axis]
  if not extra:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, extra)
  return jnp.pad(x, pads)


def row_bounds(query_offset, q_lengths, kv_lengths, *, b: int, tq: int, tk: int):
  """int32 ``[B]`` query offset, query length and key length (``None``: all)."""
  offset = jnp.broadcast_to(jnp.asarray(query_offset, jnp.int32), (b,))
  q_len = jnp.full((b,), tq, jnp.int32) if q_lengths is None else (
      jnp.minimum(jnp.asarray(q_lengths, jnp.int32), tq))
  kv_len = jnp.full((b,), tk, jnp.int32) if kv_lengths is None else (
      jnp.minimum(jnp.asarray(kv_lengths, jnp.int32), tk))
  return offset, q_len, kv_len


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
  """FlashQ prefill over INT8 Q/K/V (V transposed), Pallas Triton.

  Args:
    q: int8 [B, Hq, Tq, D]; q_scale: f32 [B, Hq, Tq], per token, softmax scale
      (and ``log2 e`` for base 2) folded in.
    k: int8 [B, Hk, Tk, D] (smoothed); k_scale: f32 [B, Hk, Tk] (per key), or
      [B, Hk, Tk // block_k] (one scale per key tile, as quantized with
      ``per_token_scales=False``: folded into the exponent's one FMA a
      logit, ``softmax.online_softmax_tile_scale``).
    v_t: int8 [B, Hk, D, Tk]; v_scale: f32 [B, Hk, Tk // block_k], one scale
      per key tile (this shape fixes ``block_k``).
    sas: SAS exponent parameters (``exact=True``: ``exp2``, no sparsity;
      otherwise base 2 only).
    causal: keep keys at positions ``<= query_offset + i`` for query ``i``.
    query_offset: int or int32 [B].
    q_lengths, kv_lengths: optional int32 [B] valid lengths.
    local_window: optional static ``(left, right)``.
    block_sizes: ``BlockSizes``; ``None`` uses ``BlockSizes.get_default`` with
      ``block_k`` taken from ``v_scale``. ``Tq`` need not be a multiple of
      ``block_q`` (the query block is padded here).
    interpret: run the kernel body with XLA on any backend (tests).
    out_dtype: dtype of the output (the reference returns f32).
    out_layout: "bhtd" ([B, Hq, Tq, D]) or "bthd" ([B, Tq, Hq, D], the
      ``jax.nn.dot_product_attention`` layout, written in place).
  Returns:
    [B, Hq, Tq, D] ``out_dtype`` (rows with no visible key are 0, rows whose
    ``q_scale`` is NaN/inf are NaN) and, with ``return_residuals``,
    ``(m, l)`` f32 [B, Hq, Tq] in the exponent's units.
  """
  b, hq, tq, d = q.shape
  hk, tk = k.shape[1], k.shape[2]
  block_k, k_scale_per_tile = check_inputs(q, q_scale, k, k_scale, v_t, v_scale, out_layout)
  n_v_tiles = tk // block_k
  if not sas.exact and sas.base != 2.0:
    raise NotImplementedError(
        f"Triton FlashQ prefill: SAS base {sas.base} (only base 2, or exact with any base)")
  if block_sizes is None:
    block_sizes = dataclasses.replace(
        BlockSizes.get_default(head_dim=d, seq_len_q=tq, seq_len_k=tk), block_k=block_k)
  elif block_sizes.block_k != block_k:
    raise ValueError(
        f"{block_sizes.block_k=} differs from the V scale tile {block_k=} "
        f"(Tk={tk}, {n_v_tiles} V scales)")
  v_codes_bf16 = v_t.dtype == jnp.bfloat16  # V's codes, [B, Hk, Tk, D]
  if v_codes_bf16 != (block_sizes.pv_dtype == "bfloat16"):
    if v_codes_bf16:
      raise ValueError("bf16 V codes ([B, Hk, Tk, D]) need BlockSizes(pv_dtype='bfloat16')")
    v_t = jnp.swapaxes(v_t, -1, -2).astype(jnp.bfloat16)  # the quantization can write these
  block_q = block_sizes.block_q
  tq_pad = -(-tq // block_q) * block_q
  d_pad = max(MIN_BLOCK, common.next_pow2(d))
  if tq_pad != tq:
    q, q_scale = _pad_to(q, 2, tq_pad), _pad_to(q_scale, 2, tq_pad)
  if d_pad != d:  # zero channels change no integer dot
    q, k = _pad_to(q, 3, d_pad), _pad_to(k, 3, d_pad)
    v_t = _pad_to(v_t, 3 if v_t.dtype == jnp.bfloat16 else 2, d_pad)
  v_block = (tk, d_pad) if v_t.dtype == jnp.bfloat16 else (d_pad, tk)

  offset, q_len, kv_len = row_bounds(query_offset, q_lengths, kv_lengths, b=b, tq=tq, tk=tk)

  groups = hq // hk
  scalar = pl.BlockSpec((None,), lambda b_, h, i: (b_,))
  in_specs = [
      scalar, scalar, scalar,
      pl.BlockSpec((None, None, block_q, d_pad), lambda b_, h, i: (b_, h, i, 0)),
      pl.BlockSpec((None, None, block_q), lambda b_, h, i: (b_, h, i)),
      pl.BlockSpec((None, None, tk, d_pad), lambda b_, h, i: (b_, h // groups, 0, 0)),
      pl.BlockSpec((None, None, k_scale.shape[-1]), lambda b_, h, i: (b_, h // groups, 0)),
      pl.BlockSpec((None, None) + v_block, lambda b_, h, i: (b_, h // groups, 0, 0)),
      pl.BlockSpec((None, None, n_v_tiles), lambda b_, h, i: (b_, h // groups, 0)),
  ]
  if out_layout == "bhtd":
    out_shape = [jax.ShapeDtypeStruct((b, hq, tq_pad, d_pad), out_dtype)]
    out_specs = [pl.BlockSpec((None, None, block_q, d_pad), lambda b_, h, i: (b_, h, i, 0))]
  else:
    out_shape = [jax.ShapeDtypeStruct((b, tq_pad, hq, d_pad), out_dtype)]
    out_specs = [pl.BlockSpec((None, block_q, None, d_pad), lambda b_, h, i: (b_, i, h, 0))]
  if return_residuals:
    out_shape += [jax.ShapeDtypeStruct((b, hq, tq_pad), jnp.float32)] * 2
    out_specs += [pl.BlockSpec((None, None, block_q), lambda b_, h, i: (b_, h, i))] * 2

  kernel = functools.partial(
      _prefill_kernel, sas=sas, causal=causal, local_window=local_window,
      block_sizes=block_sizes, k_scale_per_tile=k_scale_per_tile, interpret=bool(interpret))
  outs = pl.pallas_call(
      kernel,
      grid=(b, hq, tq_pad // block_q),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compat.triton_compiler_params(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      debug=debug,
      name=KERNEL_NAME,
  )(offset, q_len, kv_len, q, q_scale.astype(jnp.float32), k,
    k_scale.astype(jnp.float32), v_t, v_scale.astype(jnp.float32))
  out = outs[0][:, :, :tq, :d] if out_layout == "bhtd" else outs[0][:, :tq, :, :d]
  if return_residuals:
    return out, (outs[1][:, :, :tq], outs[2][:, :, :tq])
  return out


def flashq_prefill_reference(
    q, q_scale, k, k_scale, v_t, v_scale, *, sas: SASParams, causal: bool = False,
    query_offset=0, q_lengths=None, kv_lengths=None, local_window=None,
    block_sizes: BlockSizes | None = None, interpret: bool = False,
    debug: bool = False, return_residuals: bool = False, out_dtype=jnp.float32,
    out_layout: str = "bhtd", quantize_p: bool = True):
  """``flashq_prefill``'s inputs through ``reference.flashq_prefill_reference``
  (a K scale per tile repeated over its keys; V's codes int8 transposed or bf16)."""
  del block_sizes, interpret, debug  # the reference has no tiles but block_k
  block_k = k.shape[2] // v_scale.shape[-1]
  if k_scale.shape[-1] != k.shape[2]:  # one scale per key tile
    k_scale = jnp.repeat(k_scale, block_k, axis=-1)
  v = v_t.astype(jnp.int8) if v_t.dtype == jnp.bfloat16 else jnp.swapaxes(v_t, -1, -2)
  res = reference.flashq_prefill_reference(
      q, q_scale, k, k_scale, v, v_scale, block_k=block_k,
      sas=sas, causal=causal, query_offset=query_offset, q_lengths=q_lengths,
      kv_lengths=kv_lengths, local_window=local_window,
      return_residuals=return_residuals, quantize_p=quantize_p)
  out, residuals = res if return_residuals else (res, None)
  out = out.astype(out_dtype)
  if out_layout == "bthd":
    out = jnp.swapaxes(out, 1, 2)
  return (out, residuals) if return_residuals else out

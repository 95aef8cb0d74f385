"""Fused stage-1 INT8 quantization of Q, K and V for the FlashQ prefill kernel.

One Pallas Triton pass per tensor turns float activations into exactly the
inputs of ``flashq_prefill``:

  q:   int8 [B, Hq, Tq, D], q_scale f32 [B, Hq, Tq] (one scale per token,
       times ``sm_scale`` and ``log2 e`` when folded)
  k:   int8 [B, Hk, Tk, D] of ``K - mean_valid(K)`` (per channel, when
       ``smooth_k``), k_scale f32 [B, Hk, Tk] (block scale repeated per token,
       or one per token)
  v_t: int8 [B, Hk, D, Tk] (transposed in registers), v_scale f32
       [B, Hk, Tk // block_k]

The rule is the library's (``turbojax.quant.quantize_int8_sym``):
``scale = absmax / 127`` (1 for an all-zero tile) and
``code = clip(round_half_up(x / scale), -127, 127)``, one scale per head and
token (Q), block of tokens (K, or per token) or key tile (V). The codes match
XLA's IEEE division bit for bit; compiled kernels get the IEEE quotient from
one reciprocal per scale and a multiply plus two FMAs an element (Markstein's
correction step). K's per-channel mean and the channel maxima that move K's
outlier channels into Q come from ``channel_stats``, one more pass (they need
every token of a head; a grid over tiles keeps the whole GPU busy for the rest).
Inputs may be ``[B, H, T, D]`` (``layout="bhtd"``) or the API's ``[B, T, H, D]``
(``layout="bthd"``), read in place without a transpose pass.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common, compat
from pallas_kernels.sas import LOG2_E

KERNEL_NAME = "flashq_quantize"
INT8_MAX = 127.0
_LAYOUTS = ("bhtd", "bthd")
_NUM_WARPS = 4


class QuantizedQKV(NamedTuple):
  """``flashq_prefill``'s first six inputs, in its argument order."""

  q: jax.Array        # int8 [B, Hq, Tq, D]
  q_scale: jax.Array  # f32 [B, Hq, Tq]
  k: jax.Array        # int8 [B, Hk, Tk, D]
  k_scale: jax.Array  # f32 [B, Hk, Tk]
  v_t: jax.Array      # int8 [B, Hk, D, Tk] (or bf16 codes [B, Hk, Tk, D])
  v_scale: jax.Array  # f32 [B, Hk, Tk // block_k]


# RN(1 / 127) in f32. 1/127 is 0.(0000001) repeating in binary, so rounding to
# 24 bits truncates far from a tie (the exactness test checks the fraction).
_RCP_INT8_MAX = 0.007874015718698502

# PTX for ``RN($1 / $2)`` given ``$3 = RN(1 / $2)``, into register ``q``, with
# Markstein's correction step instead of a divide:
#   q0 = RN(x * rcp);  r = RN(x - q0 * y) (fma);  q = RN(q0 + r * rcp) (fma).
# q is the IEEE quotient unless the remainder r underflows (|x| below ~2**-100).
# So scales and codes are exact for every tile whose absmax is 0 or >= 2**-93
# (~1e-28; scale >= 2**-100): smaller |x| there give quotients far below 0.5.
# Tinier nonzero tiles may round a tie differently (XLA:CPU, the reference,
# flushes subnormals around there anyway). Checked exhaustively at 5..13-bit
# precision (all pairs of significands) and on random and adversarial f32
# values by tests/pallas_kernels/test_gpu_quantize_exact.py, which emulates
# these instructions bit for bit.
_QUOTIENT_PTX = ("mul.rn.f32 q, $1, $3; neg.f32 r, q; fma.rn.f32 r, r, $2, $1; "
                 "fma.rn.f32 q, r, $3, q; ")
# ``floor(q + 0.5)`` converted with saturation to [-128, 127] (NaN -> 0, as
# XLA converts). No clamp to -127 is needed: |x| <= absmax and an IEEE-rounded
# scale give |x / scale| <= 127 * (1 + 2**-23), so codes stay in [-127, 127].
_CODE_PTX = "add.rn.f32 q, q, 0f3F000000; cvt.rmi.s8.f32 $0, q; "


def _asm(ptx: str, args, dtype, constraints: str):
  """``ptx`` once per element with the scratch registers ``q`` and ``r``."""
  return compat.elementwise_ptx("{ .reg .f32 q, r; " + ptx + "}", *args, dtype=dtype,
                                constraints=constraints)


def _scale_of(absmax, *, interpret: bool = True):
  """``(scale, rcp)``: ``scale = absmax / 127`` IEEE-rounded (1 where absmax is 0,
  NaN where it is NaN: ``_absmax`` marks non-finite tiles so).

  ``rcp = RN(1 / scale)`` feeds ``_codes`` in compiled kernels (``None`` in
  interpret mode and the reference, which divide). Compiled, the scale is the
  Markstein quotient too: no ``div.rn`` (and its slow-path call) is left.
  """
  absmax = absmax.astype(jnp.float32)
  if interpret:  # IEEE division (the barrier stops XLA:CPU's reciprocal multiply)
    scale = absmax / jax.lax.optimization_barrier(
        jnp.full(jnp.shape(absmax), INT8_MAX, jnp.float32))
    return jnp.where(absmax == 0, 1.0, scale), None
  scale = _asm(_QUOTIENT_PTX + "mov.f32 $0, q; ",
               [absmax, jnp.float32(INT8_MAX), jnp.float32(_RCP_INT8_MAX)],
               jnp.float32, "=f,f,f,f")
  # absmax = inf: the remainder is inf - inf = NaN, the IEEE quotient inf.
  scale = jnp.where(absmax == 0, 1.0, jnp.where(absmax < jnp.inf, scale, absmax))
  return scale, _asm("rcp.rn.f32 $0, $1; ", [scale], jnp.float32, "=f,f")


def _absmax(x, axis):
  """``max(|x|)`` over ``axis``, NaN where ``x`` holds a NaN or an inf. Triton's
  max drops NaN (``maxnumf``), so a sum of ``x * 0`` (0, or NaN for NaN/inf)
  carries them into the scale, which makes the rows they reach NaN
  (``turbojax.attention.prepare.poison_nonfinite_kv``)."""
  return jnp.max(jnp.abs(x), axis=axis) + jnp.sum(x * 0.0, axis=axis)


def _codes(x, scale, rcp, *, interpret: bool):
  """int8 ``clip(round_half_up(x / scale), -127, 127)``, ``x / scale`` IEEE-rounded.

  Compiled: 5 instructions an element (``_QUOTIENT_PTX`` + ``_CODE_PTX``), the
  same bits as the IEEE divide that interpret mode (and the reference) runs.
  """
  x = x.astype(jnp.float32)
  if interpret:
    q = x / jax.lax.optimization_barrier(jnp.broadcast_to(scale, x.shape))
    return jnp.clip(common.round_half_up(q), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  codes = _asm(_QUOTIENT_PTX + _CODE_PTX, [x, scale, rcp], jnp.int32, "=r,f,f,f")
  return codes.astype(jnp.int8)


def _qk_kernel(
    len_ref,     # [] int32: valid tokens (smoothing only)
    x_ref,       # [block, D] float
    mean_ref,    # [D] f32 (smoothing only)
    mul_ref,     # [D] f32 power-of-two channel multipliers (or None)
    codes_ref,   # [block, D] int8
    scale_ref,   # [block] f32
    *, block: int, per_token: bool, factor: float | None, smooth: bool,
    interpret: bool):
  x = x_ref[...].astype(jnp.float32)
  if smooth:
    t = pl.program_id(2) * block + jnp.arange(block, dtype=jnp.int32)
    valid = t < len_ref[()]
    x = jnp.where(valid[:, None], x - mean_ref[...][None, :], 0.0)
  if mul_ref is not None:
    x = x * mul_ref[...][None, :]
  absmax = _absmax(x, -1)
  if not per_token:  # one scale per block, kept as a [block] vector (no scalars)
    absmax = jnp.broadcast_to(jnp.max(absmax), (block,))
  scale, rcp = _scale_of(absmax, interpret=interpret)             # [block]
  codes_ref[...] = _codes(x, scale[:, None], None if rcp is None else rcp[:, None],
                          interpret=interpret)
  scale_ref[...] = scale if factor is None else scale * factor


def _v_kernel(
    x_ref,       # [block, D] float
    codes_ref,   # [D, block] int8 (transposed), or [block, D] bf16
    scale_ref,   # [] f32
    *, interpret: bool):
  x = x_ref[...].astype(jnp.float32)
  absmax = jnp.max(_absmax(x, -1)).reshape(1, 1)   # [1, 1]: asm needs arrays
  scale, rcp = _scale_of(absmax, interpret=interpret)
  codes = _codes(x, scale, rcp, interpret=interpret)
  codes_ref[...] = codes.T if codes_ref.dtype == jnp.int8 else codes.astype(codes_ref.dtype)
  scale_ref[()] = jnp.max(scale)


def _to_bhtd_spec(layout: str, block: int, d: int, head_of=lambda h: h):
  """BlockSpec of a ``[block, D]`` tile of a float input in ``layout``."""
  if layout == "bhtd":
    return pl.BlockSpec((None, None, block, d), lambda b, h, t: (b, head_of(h), t, 0))
  return pl.BlockSpec((None, block, None, d), lambda b, h, t: (b, t, head_of(h), 0))


def _dims(x, layout: str):
  if layout == "bhtd":
    b, h, t, d = x.shape
  else:
    b, t, h, d = x.shape
  return b, h, t, d


def _pad_tokens(x, layout: str, multiple: int):
  axis = 2 if layout == "bhtd" else 1
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  pads = [(0, 0)] * 4
  pads[axis] = (0, extra)
  return jnp.pad(x, pads)


def key_mean(k, kv_lengths, *, layout: str = "bhtd"):
  """Per-channel mean of K over valid keys, f32 ``[B, H, D]`` (library formula)."""
  return channel_stats_reference(k, kv_lengths, smooth=True, layout=layout)[0]


_STATS_ROWS = 64     # tokens per load of the statistics kernel
_STATS_CHUNK = 512   # tokens per program (at most): enough programs to fill the GPU


def _stats_kernel(len_ref, x_ref, sum_ref, max_ref, min_ref, *, chunk: int):
  """Per-channel sum, max and min of one program's ``chunk`` tokens (valid ones)."""
  d = x_ref.shape[-1]
  base = pl.program_id(2) * chunk

  def body(i, carry):
    total, hi, lo = carry
    x = x_ref[pl.ds(i * _STATS_ROWS, _STATS_ROWS), :].astype(jnp.float32)
    t = base + i * _STATS_ROWS + jnp.arange(_STATS_ROWS, dtype=jnp.int32)
    valid = (t < len_ref[()])[:, None]
    return (total + jnp.sum(jnp.where(valid, x, 0.0), axis=0),
            jnp.maximum(hi, jnp.max(jnp.where(valid, x, -jnp.inf), axis=0)),
            jnp.minimum(lo, jnp.min(jnp.where(valid, x, jnp.inf), axis=0)))

  init = (jnp.zeros((d,), jnp.float32), jnp.full((d,), -jnp.inf, jnp.float32),
          jnp.full((d,), jnp.inf, jnp.float32))
  total, hi, lo = jax.lax.fori_loop(0, chunk // _STATS_ROWS, body, init)
  sum_ref[...], max_ref[...], min_ref[...] = total, hi, lo


def _stats_from(total, hi, lo, count, smooth: bool):
  """``(mean, max |x - mean|)`` from valid-token sums, maxima and minima.

  ``RN(x - mean)`` is monotone in ``x``, so the absmax comes from the max and
  min exactly as from the centred values themselves.
  """
  mean = total / jnp.maximum(count, 1) if smooth else jnp.zeros_like(total)
  absmax = jnp.maximum(hi - mean, mean - lo)
  return mean, jnp.where(count > 0, absmax, 0.0)


def _lengths(b: int, t: int, lengths):
  if lengths is None:
    return jnp.full((b,), t, jnp.int32)
  return jnp.clip(jnp.asarray(lengths, jnp.int32), 0, t)


@functools.partial(jax.jit, static_argnames=("smooth", "layout", "interpret", "debug"))
def channel_stats(x, lengths=None, *, smooth: bool, layout: str = "bhtd",
                  interpret: bool = False, debug: bool = False):
  """Per batch, head and channel over the first ``lengths`` tokens of ``x``:
  ``(mean, max |x - mean|)``, f32 ``[B, H, D]`` (``mean`` is 0 unless
  ``smooth``). One pass over ``x``: what K's smoothing and the Q/K channel
  migration need, at HBM speed (XLA's reductions over the token axis of
  ``[B, T, H, D]`` ran at ~2 TB/s, one per statistic).
  """
  if layout not in _LAYOUTS:
    raise ValueError(f"{layout=} must be one of {_LAYOUTS}")
  b, _, t, _ = _dims(x, layout)
  valid_len = _lengths(b, t, lengths)
  x = _pad_tokens(x, layout, _STATS_ROWS)
  _, h, t_pad, d = _dims(x, layout)
  chunk = _STATS_CHUNK
  while t_pad % chunk:
    chunk //= 2
  splits = t_pad // chunk
  part = pl.BlockSpec((None, None, None, d), lambda b_, h_, s_: (b_, h_, s_, 0))
  part_shape = jax.ShapeDtypeStruct((b, h, splits, d), jnp.float32)
  total, hi, lo = pl.pallas_call(
      functools.partial(_stats_kernel, chunk=chunk),
      grid=(b, h, splits),
      in_specs=[pl.BlockSpec((None,), lambda b_, h_, s_: (b_,)),
                _to_bhtd_spec(layout, chunk, d)],
      out_specs=[part, part, part],
      out_shape=[part_shape] * 3,
      compiler_params=compat.triton_compiler_params(num_warps=_NUM_WARPS, num_stages=2),
      interpret=interpret, debug=debug, name=KERNEL_NAME + "_stats",
  )(valid_len, x)
  count = valid_len.astype(jnp.float32)[:, None, None]
  return _stats_from(jnp.sum(total, axis=2), jnp.max(hi, axis=2), jnp.min(lo, axis=2),
                     count, smooth)


def _quantize_qk(x, lengths, mean, channel_mul, *, layout, block, per_token, factor,
                 interpret, debug, name):
  """``mean``, ``channel_mul``: optional f32 ``[B, Hk, D]`` (Q's heads map to
  ``Hk`` in groups)."""
  x = _pad_tokens(x, layout, block)
  b, h, t, d = _dims(x, layout)
  per_channel = [m for m in (mean, channel_mul) if m is not None]
  group = h // per_channel[0].shape[1] if per_channel else 1
  channel_spec = pl.BlockSpec((None, None, d), lambda b_, h_, t_: (b_, h_ // group, 0))
  in_specs = [pl.BlockSpec((None,), lambda b_, h_, t_: (b_,)),
              _to_bhtd_spec(layout, block, d),
              None if mean is None else channel_spec,
              None if channel_mul is None else channel_spec]
  kernel = functools.partial(
      _qk_kernel, block=block, per_token=per_token, factor=factor, smooth=mean is not None,
      interpret=interpret)
  return pl.pallas_call(
      kernel,
      grid=(b, h, t // block),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, block, d), lambda b_, h_, t_: (b_, h_, t_, 0)),
                 pl.BlockSpec((None, None, block), lambda b_, h_, t_: (b_, h_, t_))],
      out_shape=[jax.ShapeDtypeStruct((b, h, t, d), jnp.int8),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      compiler_params=compat.triton_compiler_params(num_warps=_NUM_WARPS, num_stages=1),
      interpret=interpret, debug=debug, name=name,
  )(lengths, x, mean, channel_mul)


def _quantize_v(x, *, layout, block, codes_dtype, interpret, debug):
  x = _pad_tokens(x, layout, block)
  b, h, t, d = _dims(x, layout)
  if jnp.dtype(codes_dtype) == jnp.int8:  # transposed
    codes_spec = pl.BlockSpec((None, None, d, block), lambda b_, h_, t_: (b_, h_, 0, t_))
    codes_shape = jax.ShapeDtypeStruct((b, h, d, t), jnp.int8)
  else:
    codes_spec = pl.BlockSpec((None, None, block, d), lambda b_, h_, t_: (b_, h_, t_, 0))
    codes_shape = jax.ShapeDtypeStruct((b, h, t, d), codes_dtype)
  return pl.pallas_call(
      functools.partial(_v_kernel, interpret=interpret),
      grid=(b, h, t // block),
      in_specs=[_to_bhtd_spec(layout, block, d)],
      out_specs=[codes_spec,
                 pl.BlockSpec((None, None, None), lambda b_, h_, t_: (b_, h_, t_))],
      out_shape=[codes_shape,
                 jax.ShapeDtypeStruct((b, h, t // block), jnp.float32)],
      compiler_params=compat.triton_compiler_params(num_warps=_NUM_WARPS, num_stages=1),
      interpret=interpret, debug=debug, name=KERNEL_NAME + "_v",
  )(x)


def _check(q, k, v, layout, block_q, block_k):
  if layout not in _LAYOUTS:
    raise ValueError(f"{layout=} must be one of {_LAYOUTS}")
  for name, block in (("block_q", block_q), ("block_k", block_k)):
    if block < 16 or block & (block - 1):
      raise ValueError(f"{name}={block} must be a power of two >= 16")
  bq, hq, _, d = _dims(q, layout)
  bk, hk, tk, dk = _dims(k, layout)
  if _dims(v, layout) != (bk, hk, tk, dk) or (bq, d) != (bk, dk) or hq % hk:
    raise ValueError(f"incompatible shapes {q.shape=} {k.shape=} {v.shape=} for {layout=}")
  if d & (d - 1) or d < 16:
    raise NotImplementedError(f"head_dim {d} must be a power of two >= 16 here")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got {x.dtype}")


def _check_channel_scale(channel_scale, k, layout):
  if channel_scale is None:
    return
  bk, hk, _, d = _dims(k, layout)
  if channel_scale.shape != (bk, hk, d):
    raise ValueError(f"channel_scale must be [B, Hk, D] = {(bk, hk, d)}, got "
                     f"{channel_scale.shape}")


@functools.partial(
    jax.jit, static_argnames=(
        "block_q", "block_k", "sm_scale", "log2e_fold", "smooth_k", "k_per_token",
        "layout", "v_codes_dtype", "interpret", "debug"))
def quantize_qkv(q, k, v, *, block_q: int, block_k: int, sm_scale: float,
                 log2e_fold: bool, smooth_k: bool, kv_lengths=None,
                 k_per_token: bool = False, layout: str = "bhtd", k_mean=None,
                 channel_scale=None, v_codes_dtype=jnp.int8, interpret: bool = False,
                 debug: bool = False) -> QuantizedQKV:
  """Float Q/K/V -> ``QuantizedQKV`` (the prefill kernel's INT8 inputs).

  Args:
    q: float [B, Hq, Tq, D]; k, v: float [B, Hk, Tk, D] (``layout="bthd"``:
      [B, T, H, D]).
    block_q, block_k: tokens per Q and per K/V scale; ``block_k`` must be the
      prefill kernel's key tile. Tokens are zero-padded to these multiples.
    sm_scale: softmax scale folded into ``q_scale`` (with ``log2 e`` when
      ``log2e_fold``, for the base-2 exponent).
    smooth_k: subtract K's per-channel mean over the first ``kv_lengths`` keys
      (keys past it become 0), as the library does.
    k_per_token: one K scale per token instead of per ``block_k`` keys. Q
      always gets one per token (a per-row factor in every kernel, so it costs
      nothing, and a non-finite query stays in its row); V one per tile.
    k_mean: optional f32 [B, Hk, D] mean to subtract (default ``key_mean``);
      pass the one used for the log-sum-exp correction, or one computed on
      another platform (reductions round differently across backends).
    channel_scale: optional f32 [B, Hk, D] powers of two: Q's channels are
      multiplied by them, smoothed K's divided (exactly), before quantizing
      (K's outlier channels moved into Q; Q.K^T is unchanged).
    v_codes_dtype: int8 (``v_t`` transposed, [B, Hk, D, Tk]) or bfloat16
      (the same codes as bf16 [B, Hk, Tk, D], for a bf16 P.V).
  """
  _check(q, k, v, layout, block_q, block_k)
  b = q.shape[0]
  factor = sm_scale * (LOG2_E if log2e_fold else 1.0)
  lengths = jnp.zeros((b,), jnp.int32)
  _check_channel_scale(channel_scale, k, layout)
  k_mul = None if channel_scale is None else 1.0 / channel_scale
  q8, q_scale = _quantize_qk(
      q, lengths, None, channel_scale, layout=layout, block=block_q, per_token=True,
      factor=factor, interpret=interpret, debug=debug, name=KERNEL_NAME + "_q")
  if smooth_k:
    lengths = _lengths(b, _dims(k, layout)[2], kv_lengths)
    mean = key_mean(k, kv_lengths, layout=layout) if k_mean is None else (
        jnp.asarray(k_mean, jnp.float32))
  else:
    mean = None
  k8, k_scale = _quantize_qk(
      k, lengths, mean, k_mul, layout=layout, block=block_k, per_token=k_per_token,
      factor=None, interpret=interpret, debug=debug, name=KERNEL_NAME + "_k")
  v_t, v_scale = _quantize_v(v, layout=layout, block=block_k, codes_dtype=v_codes_dtype,
                             interpret=interpret, debug=debug)
  return QuantizedQKV(q8, q_scale, k8, k_scale, v_t, v_scale)


def quantize_qkv_reference(q, k, v, *, block_q: int, block_k: int, sm_scale: float,
                           log2e_fold: bool, smooth_k: bool, kv_lengths=None,
                           k_per_token: bool = False, layout: str = "bhtd", k_mean=None,
                           channel_scale=None, v_codes_dtype=jnp.int8,
                           interpret: bool = False,
                           debug: bool = False) -> QuantizedQKV:
  """Pure-JAX ``quantize_qkv`` (same inputs, same outputs)."""
  del interpret, debug
  _check(q, k, v, layout, block_q, block_k)

  def bhtd(x):
    return x if layout == "bhtd" else jnp.transpose(x, (0, 2, 1, 3))

  def quant(x, block, per_token):
    """Codes, per-tile scales and per-token scales of ``[B, H, T, D]``."""
    x = x.astype(jnp.float32)
    b, h, t, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, 0), (0, -t % block), (0, 0)))
    if per_token:
      scale, _ = _scale_of(_absmax(x, -1))                         # [B, H, T]
      full = scale
    else:
      tiles = x.reshape(b, h, -1, block, d)
      scale, _ = _scale_of(_absmax(tiles, (-2, -1)))               # [B, H, T/block]
      full = jnp.repeat(scale, block, axis=-1)
    # IEEE division (XLA:CPU would multiply by a reciprocal of a broadcast).
    divisor = jax.lax.optimization_barrier(jnp.broadcast_to(full[..., None], x.shape))
    codes = jnp.clip(common.round_half_up(x / divisor), -INT8_MAX, INT8_MAX)
    return codes.astype(jnp.int8), scale, full

  _check_channel_scale(channel_scale, k, layout)
  factor = sm_scale * (LOG2_E if log2e_fold else 1.0)
  qf = bhtd(q).astype(jnp.float32)
  if channel_scale is not None:
    group = qf.shape[1] // channel_scale.shape[1]
    qf = qf * jnp.repeat(channel_scale, group, axis=1)[:, :, None, :]
  q8, _, q_full = quant(qf, block_q, True)
  kf = bhtd(k).astype(jnp.float32)
  if smooth_k:
    mean = key_mean(k, kv_lengths, layout=layout) if k_mean is None else (
        jnp.asarray(k_mean, jnp.float32))
    tk = kf.shape[2]
    lengths = _lengths(kf.shape[0], tk, kv_lengths)
    valid = (jnp.arange(tk)[None, :] < lengths[:, None])[:, None, :, None]
    kf = jnp.where(valid, kf - mean[:, :, None, :], 0.0)
  if channel_scale is not None:
    kf = kf * (1.0 / channel_scale)[:, :, None, :]
  k8, _, k_full = quant(kf, block_k, k_per_token)
  v8, v_scale, _ = quant(bhtd(v), block_k, False)
  v_t = (jnp.swapaxes(v8, -1, -2) if jnp.dtype(v_codes_dtype) == jnp.int8
         else v8.astype(v_codes_dtype))
  return QuantizedQKV(q8, q_full * factor, k8, k_full, v_t, v_scale)


def channel_stats_reference(x, lengths=None, *, smooth: bool, layout: str = "bhtd"):
  """Pure-JAX ``channel_stats`` (XLA reductions; sums round in another order)."""
  xf = x.astype(jnp.float32)
  if layout == "bthd":
    xf = jnp.transpose(xf, (0, 2, 1, 3))
  b, _, t, _ = xf.shape
  valid_len = _lengths(b, t, lengths)
  valid = (jnp.arange(t)[None, :] < valid_len[:, None])[:, None, :, None]
  total = jnp.sum(jnp.where(valid, xf, 0.0), axis=2)
  hi = jnp.max(jnp.where(valid, xf, -jnp.inf), axis=2)
  lo = jnp.min(jnp.where(valid, xf, jnp.inf), axis=2)
  return _stats_from(total, hi, lo, valid_len.astype(jnp.float32)[:, None, None], smooth)

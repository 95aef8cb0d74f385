"""Appends one decoded token to a progressive KV cache, Pallas Triton.

Every decoding step writes the new token's INT8 K/V into the residual window
and, for the sequences whose window it fills, packs the ``G`` tokens of the
window to INT4/INT2 (stage 2, ``packing.stage2_params``/``stage2_encode``)
into the packed arrays and empties the window. In XLA that choice is a
``lax.cond``, and on GPU a conditional copies its predicate to the host and
waits for it: one stall per layer and step (11 us each on H100 at the serving
benchmark's shapes, 3% of a decoding step). Here one program per (sequence,
KV head) makes the choice for its own sequence, so a step launches one kernel
per bit width whether or not a group fills, and every array is updated in
place (``input_output_aliases``: donate the cache to keep it so).

Packing layout and rules are ``turbojax.QuantizedKVCache``'s: K grouped along
tokens per channel, V along channels per token in groups of
``min(G, head_dim)``, codes packed along head_dim in the split layout. The
window's slots past a sequence's length hold stale tokens here (XLA's update
resets them to codes 0 and scales 1); nothing reads them: attention masks by
length and a group is packed only from its own ``G`` tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common, compat, packing
from pallas_kernels.reference import PackedKV, ResidualKV

KERNEL_NAME = "append_token"


def _chunk(width: int, channel_group: int) -> int:
  """Packed bytes handled together: within one bit field and one V group, and
  at most 16, which keeps the packing under 80 registers per thread (64
  columns: 255) so that many programs fit on an SM (triton_sass.py append)."""
  return min(width, channel_group, 16)


def _append_kernel(len_ref, kept_ref, tk_ref, tks_ref, tv_ref, tvs_ref, *refs, bits: int,
                   group: int):
  # refs: the packed arrays and the window as inputs, then the same buffers
  # (aliased) as outputs; the window is read through its input refs.
  wk_ref, wks_ref, wv_ref, wvs_ref = refs[8:12]
  (kc_ref, ks2_ref, kz_ref, ksc_ref, vc_ref, vs2_ref, vz_ref, vsc_ref,
   wk_out, wks_out, wv_out, wvs_out) = refs[12:]
  head_dim = wk_ref.shape[1]
  width = kc_ref.shape[1]                     # packed bytes per token
  per_byte = packing.codes_per_byte(bits)
  channel_group = min(group, head_dim)
  m = _chunk(width, channel_group)
  length = len_ref[()]
  kept = kept_ref[()] > 0
  slot = length % group

  @pl.when(kept & (slot < group - 1))
  def _into_window():
    for src, dst in ((tk_ref, wk_out), (tv_ref, wv_out)):
      dst[pl.ds(slot, 1), :] = src[...]
    for src, dst in ((tks_ref, wks_out), (tvs_ref, wvs_out)):
      dst[pl.ds(slot, 1)] = src[...]

  @pl.when(kept & (slot == group - 1))
  def _pack_group():
    tok0 = pl.multiple_of(length - slot, group)
    gi = length // group
    last = jnp.arange(group, dtype=jnp.int32) == group - 1

    def tokens(win_ref, new_ref, c0, n):
      """int32 ``[G, n]``: channels ``[c0, c0 + n)`` of the window's tokens, the
      new token last."""
      x = win_ref[:, pl.ds(c0, n)].astype(jnp.int32)
      return jnp.where(last[:, None], new_ref[:, pl.ds(c0, n)].astype(jnp.int32), x)

    def scales(win_ref, new_ref):
      return jnp.where(last, new_ref[...].astype(jnp.float32)[0], win_ref[...].astype(jnp.float32))

    # V's params: one (scale2, zero) per token and group of channels.
    v_params = {}
    for g in range(head_dim // channel_group):
      s2, z = packing.stage2_params(tokens(wv_ref, tv_ref, g * channel_group, channel_group),
                                    bits, axis=1)
      vs2_ref[pl.ds(tok0, group), g] = s2[:, 0]
      vz_ref[pl.ds(tok0, group), g] = z[:, 0]
      v_params[g] = (s2, z)

    for j0 in range(0, width, m):              # packed bytes [j0, j0 + m)
      k_word = v_word = None
      for part in range(per_byte):
        c0 = part * width + j0                 # their channels in bit field ``part``
        x = tokens(wk_ref, tk_ref, c0, m)
        s2, z = packing.stage2_params(x, bits, axis=0)
        ks2_ref[gi, pl.ds(c0, m)] = s2[0]
        kz_ref[gi, pl.ds(c0, m)] = z[0]
        k_code = packing.stage2_encode(x, s2, z, bits).astype(jnp.int32) << (part * bits)
        s2, z = v_params[c0 // channel_group]
        v_code = packing.stage2_encode(tokens(wv_ref, tv_ref, c0, m), s2, z,
                                       bits).astype(jnp.int32) << (part * bits)
        k_word = k_code if k_word is None else k_word | k_code
        v_word = v_code if v_word is None else v_word | v_code
      kc_ref[pl.ds(tok0, group), pl.ds(j0, m)] = k_word.astype(jnp.uint8)
      vc_ref[pl.ds(tok0, group), pl.ds(j0, m)] = v_word.astype(jnp.uint8)
    ksc_ref[pl.ds(tok0, group)] = scales(wks_ref, tks_ref).astype(ksc_ref.dtype)
    vsc_ref[pl.ds(tok0, group)] = scales(wvs_ref, tvs_ref).astype(vsc_ref.dtype)


def supports(*, head_dim: int, group: int) -> bool:
  """Whether ``append_token`` takes caches of this head_dim and group size."""
  return common.is_pow2(head_dim) and common.is_pow2(group) and group >= 16


def _check(packed: PackedKV, window: ResidualKV, token: ResidualKV, bits: int, group: int):
  b, h, g, d = window.k.shape
  if g != group:
    raise ValueError(f"the window holds {g} tokens, expected group={group}")
  if token.k.shape != (b, h, 1, d) or token.v.shape != (b, h, 1, d):
    raise ValueError(f"token K/V must be [B={b}, H={h}, 1, D={d}], got {token.k.shape}")
  if packed.k_codes.shape[-1] * packing.codes_per_byte(bits) != d:
    raise ValueError(f"packed codes of width {packed.k_codes.shape[-1]} do not hold "
                     f"head_dim={d} at {bits} bits")
  if not supports(head_dim=d, group=group):
    raise NotImplementedError(
        f"head_dim={d} and group={group} must be powers of two (group >= 16)")


@functools.partial(jax.jit, static_argnames=("bits", "group", "interpret", "debug"))
def append_token(packed: PackedKV, window: ResidualKV, token: ResidualKV, lengths, kept, *,
                 bits: int, group: int, interpret: bool = False, debug: bool = False
                 ) -> tuple[PackedKV, ResidualKV]:
  """One token per sequence into a bit width's packed arrays and INT8 window.

  Args:
    packed, window: the cache's arrays for this bit width (``[B, H, ...]``).
    token: ``ResidualKV`` of the new token, ``[B, H, 1, D]`` codes and
      ``[B, H, 1]`` scales (stage 1 done).
    lengths: int32 ``[B]``, tokens cached before this one.
    kept: int32 ``[B]``, 0 where the token is dropped (cache full).
  Returns:
    The new ``(packed, window)``: the token at slot ``lengths % G`` of the
    window, or where that slot is the last, the window with the token packed
    as group ``lengths // G`` (the window keeps its stale tokens).
  """
  _check(packed, window, token, bits, group)
  b, h, g, d = window.k.shape

  def spec(*block):
    nd = len(block)
    return pl.BlockSpec((None, None) + block, lambda b_, h_: (b_, h_) + (0,) * nd)

  def specs_of(arrays):
    return [spec(*x.shape[2:]) for x in arrays]

  scalar = pl.BlockSpec((None,), lambda b_, h_: (b_,))
  operands = (jnp.asarray(lengths, jnp.int32), jnp.asarray(kept, jnp.int32),
              *token, *packed, *window)
  n_in = 2 + 4
  outs = pl.pallas_call(
      functools.partial(_append_kernel, bits=bits, group=group),
      grid=(b, h),
      in_specs=[scalar, scalar] + specs_of(token) + specs_of(packed) + specs_of(window),
      out_specs=specs_of(packed) + specs_of(window),
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (*packed, *window)],
      input_output_aliases={n_in + i: i for i in range(12)},
      compiler_params=compat.triton_compiler_params(num_warps=4, num_stages=1),
      interpret=interpret,
      debug=debug,
      name=KERNEL_NAME,
  )(*operands)
  return PackedKV(*outs[:8]), ResidualKV(*outs[8:])


def append_token_reference(packed: PackedKV, window: ResidualKV, token: ResidualKV, lengths,
                           kept, *, bits: int, group: int, interpret: bool = False,
                           debug: bool = False) -> tuple[PackedKV, ResidualKV]:
  """``append_token`` in pure JAX: every window packed, then selected per sequence."""
  del interpret, debug
  b, h, g, d = window.k.shape
  lengths = jnp.asarray(lengths, jnp.int32)
  kept = jnp.asarray(kept, jnp.int32) > 0
  slot = lengths % group

  def per_seq(mask, ndim):  # [B] -> broadcastable over a [B, H, G, ...] array
    return mask.reshape((b,) + (1,) * (ndim - 1))

  at_slot = jnp.arange(group)[None, :] == slot[:, None]                     # [B, G]

  def with_token(w, t, base):
    sel = at_slot[:, None] if w.ndim == 3 else at_slot[:, None, :, None]
    return jnp.where(sel, t, base)

  full = ResidualKV(*(with_token(w, t, w) for w, t in zip(window, token)))
  channel_group = min(group, d)
  k_s2, k_z = packing.stage2_params(full.k, bits, axis=2)                    # [B, H, 1, D]
  k_codes = packing.pack(packing.stage2_encode(full.k, k_s2, k_z, bits), bits)
  vg = full.v.reshape(b, h, g, d // channel_group, channel_group)
  v_s2, v_z = packing.stage2_params(vg, bits, axis=4)
  v_codes = packing.pack(packing.stage2_encode(vg, v_s2, v_z, bits).reshape(b, h, g, d), bits)
  new_group = (k_codes, k_s2, k_z, full.k_scale, v_codes, v_s2[..., 0], v_z[..., 0],
               full.v_scale)
  packs = kept & (slot == group - 1)
  n_groups = packed.k_scale2.shape[2]
  starts = jnp.minimum(lengths // group, n_groups - 1)
  by_group = (False, True, True, False, False, False, False, False)

  def put(buf, x, per_group):
    def one(buf_b, x_b, start):
      return jax.lax.dynamic_update_slice_in_dim(buf_b, x_b, start if per_group else start * g,
                                                 axis=1)
    out = jax.vmap(one)(buf, x.astype(buf.dtype), starts)
    return jnp.where(per_seq(packs, buf.ndim), out, buf)

  new_packed = PackedKV(*(put(buf, x, pg) for buf, x, pg in zip(packed, new_group, by_group)))
  new_window = ResidualKV(*(jnp.where(per_seq(kept & (slot < g - 1), w.ndim), u, w)
                            for w, u in zip(window, full)))
  return new_packed, new_window

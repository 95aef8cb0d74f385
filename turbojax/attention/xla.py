"""The pure-JAX FlashQ backend (``implementation="xla"``): runs everywhere.

It quantizes with ``turbojax.quant`` and runs the blockwise algorithm of
``pallas_kernels.reference``, the same code the Pallas kernels are checked
against, jit-compiled end to end.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import reference
from turbojax.attention.base import Backend, Call, Extras
from turbojax.attention.prepare import pad_axis, propagate_nonfinite, quantize_for_prefill


def prefill_extras(extras: Extras, *, b, tq, tk, tq_pad, tk_pad, log2_base):
  """Lengths that mask the padding, and bias/mask padded to the tiles."""
  kv_lengths = extras.key_value_seq_lengths
  if tk_pad != tk and kv_lengths is None:
    kv_lengths = jnp.full((b,), tk, jnp.int32)
  q_lengths = extras.query_seq_lengths

  def pad_tiles(x, value):  # axes of size 1 keep broadcasting
    if x.shape[2] != 1:
      x = pad_axis(x, 2, tq_pad, value)
    return x if x.shape[3] == 1 else pad_axis(x, 3, tk_pad, value)

  bias = None if extras.bias is None else pad_tiles(
      extras.bias.astype(jnp.float32) * log2_base, 0.0)
  mask = None if extras.mask is None else pad_tiles(extras.mask, False)
  return q_lengths, kv_lengths, bias, mask


def prefill(query, key, value, extras: Extras, call: Call):
  config = call.config
  b, tq = query.shape[0], query.shape[1]
  tk = key.shape[1]
  inputs = quantize_for_prefill(
      query, key, value, config=config, block_q=config.block_q, block_k=config.block_k,
      softmax_scale=call.scale, key_value_seq_lengths=extras.key_value_seq_lengths)
  q_lengths, kv_lengths, bias, mask = prefill_extras(
      extras, b=b, tq=tq, tk=tk, tq_pad=config.block_q, tk_pad=config.block_k,
      log2_base=config.log2_base)
  out = reference.flashq_prefill_reference(
      *inputs, block_k=config.block_k, sas=config.sas_params(), causal=call.is_causal,
      query_offset=extras.query_offset, q_lengths=q_lengths, kv_lengths=kv_lengths,
      local_window=call.local_window, bias=bias, mask=mask)
  out = propagate_nonfinite(out[:, :, :tq], inputs)
  return jnp.transpose(out, (0, 2, 1, 3))


def decode(query, cache, call: Call):
  from turbojax.attention.decode import decode_with
  return decode_with(reference.flashq_decode_reference, query, cache, call)


BACKEND = Backend(name="xla", platforms=("cpu", "gpu", "tpu"), prefill=prefill, decode=decode)

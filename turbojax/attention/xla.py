"""The pure-JAX FlashQ backend (``implementation="xla"``): runs everywhere.

It quantizes with ``turbojax.quant`` and runs the blockwise algorithm of
``pallas_kernels.reference``, the same code the Pallas kernels are checked
against, jit-compiled end to end. ``prefill_with`` is shared with the Pallas
backends, which swap in their quantization pass and kernel.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from pallas_kernels import reference
from pallas_kernels.sas import SASParams
from turbojax.attention.base import Backend, Call, Extras
from turbojax.attention.prepare import (decode_with, pad_axis, poison_nonfinite_kv,
                                       quantize_for_prefill)


def prefill_extras(extras: Extras, *, b, tq, tk, tq_pad, tk_pad, log2_base):
  """Lengths that mask the padding, and bias/mask padded to the tiles."""
  kv_lengths = extras.key_value_seq_lengths
  if tk % tk_pad and kv_lengths is None:
    kv_lengths = jnp.full((b,), tk, jnp.int32)

  def pad_tiles(x, value):  # axes of size 1 keep broadcasting
    if x.shape[2] != 1:
      x = pad_axis(x, 2, tq_pad, value)
    return x if x.shape[3] == 1 else pad_axis(x, 3, tk_pad, value)

  bias = None if extras.bias is None else pad_tiles(
      extras.bias.astype(jnp.float32) * log2_base, 0.0)
  mask = None if extras.mask is None else pad_tiles(extras.mask, False)
  return extras.query_seq_lengths, kv_lengths, bias, mask


def prefill_with(kernel, quantize, query, key, value, extras: Extras, call: Call, *,
                 block_q: int, block_k: int, sas: SASParams | None = None,
                 bthd_output: bool = False):
  """Quantize -> ``kernel`` -> ``[B, Tq, N, H]``, NaN where non-finite inputs reach.

  ``quantize(query, key, value)`` returns the kernel's six INT8 inputs;
  ``kernel`` takes them plus the ``flashq_prefill_reference`` keywords and
  NaNs the rows whose ``q_scale`` is not finite (``poison_nonfinite_kv``
  marks them). ``sas`` overrides the config's exponent (a backend's measured
  choice). ``bthd_output``: the kernel writes ``[B, Tq, N, H]`` itself (the GPU
  kernels), which saves a transpose over the whole output.
  """
  config = call.config
  b, tq = query.shape[0], query.shape[1]
  inputs = poison_nonfinite_kv(quantize(query, key, value))
  q_lengths, kv_lengths, bias, mask = prefill_extras(
      extras, b=b, tq=tq, tk=key.shape[1], tq_pad=block_q, tk_pad=block_k,
      log2_base=config.log2_base)
  masks = {} if bias is None and mask is None else {"bias": bias, "mask": mask}
  out = kernel(*inputs, sas=sas or config.sas_params(), causal=call.is_causal,
               query_offset=extras.query_offset, q_lengths=q_lengths, kv_lengths=kv_lengths,
               local_window=call.local_window, **masks)
  return out[:, :tq] if bthd_output else jnp.transpose(out, (0, 2, 1, 3))[:, :tq]


def quantize_with_blocks(config, block_q: int, block_k: int, scale: float,
                         key_value_seq_lengths):
  """``quantize_for_prefill`` with these tiles, as a ``quantize`` callable."""
  return functools.partial(quantize_for_prefill, config=config, block_q=block_q,
                           block_k=block_k, softmax_scale=scale,
                           key_value_seq_lengths=key_value_seq_lengths)


def prefill(query, key, value, extras: Extras, call: Call):
  config = call.config
  kernel = functools.partial(reference.flashq_prefill_reference, block_k=config.block_k)
  quantize = quantize_with_blocks(config, config.block_q, config.block_k, call.scale,
                                  extras.key_value_seq_lengths)
  return prefill_with(kernel, quantize, query, key, value, extras, call,
                      block_q=config.block_q, block_k=config.block_k)


def decode(query, cache, call: Call):
  return decode_with(reference.flashq_decode_reference, query, cache, call)


BACKEND = Backend(name="xla", platforms=("cpu", "gpu", "tpu"), prefill=prefill, decode=decode)

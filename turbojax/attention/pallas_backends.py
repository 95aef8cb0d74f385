"""Adapters from the public API to the Pallas kernels: ``"triton"``,
``"mosaic_gpu"`` and ``"mosaic_tpu"``.

Each adapter checks what its kernels support (raising ``NotImplementedError``
with the reason, so a default dispatch falls back to the next name), quantizes,
runs the kernel and hands back ``[B, T, N, H]`` float32. The two GPU backends
share the fused Triton quantization kernel and the Triton decode kernel; they
differ in the prefill kernel (``"mosaic_gpu"``: Hopper int8 wgmma, sm_90+).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels.gpu import flashq_decode as gpu_decode
from pallas_kernels.gpu import flashq_prefill as gpu_prefill
from pallas_kernels.gpu import quantize as gpu_quantize
from pallas_kernels.tpu import flashq_decode as tpu_decode
from pallas_kernels.tpu import flashq_prefill as tpu_prefill
from turbojax.attention.base import Backend, Call, Extras
from turbojax.attention.prepare import PrefillInputs, decode_with, migration_scale
from turbojax.attention.xla import prefill_with, quantize_with_blocks
from turbojax.quant import QArray

try:  # a stripped jax build may lack Pallas Mosaic GPU: then only "mosaic_gpu" is missing.
  from pallas_kernels.mosaic_gpu import flashq_prefill as mgpu_prefill
except ImportError:  # pragma: no cover
  mgpu_prefill = None

HEAD_DIMS = (64, 128)


def _check_supported(name: str, query, key, value, extras: Extras, call: Call):
  d = query.shape[-1]
  if d not in HEAD_DIMS:
    raise NotImplementedError(f"{name}: head_dim={d} is not supported (kernels take {HEAD_DIMS})")
  if extras.bias is not None or extras.mask is not None:
    raise NotImplementedError(f"{name}: bias/mask arrays run on the 'xla' implementation")
  if any(isinstance(x, QArray) for x in (query, key, value)):
    raise NotImplementedError(f"{name}: pre-quantized QArray inputs run on 'xla'")
  if call.config.sas_base != 2.0:
    raise NotImplementedError(f"{name}: the kernels use the base-2 SAS table (sas_base=2.0)")


def _check_decode(name: str, cache, call: Call):
  if cache.head_dim not in HEAD_DIMS:
    raise NotImplementedError(
        f"{name}: head_dim={cache.head_dim} is not supported (kernels take {HEAD_DIMS})")
  if call.config.sas_base != 2.0:
    raise NotImplementedError(f"{name}: the kernels use the base-2 SAS table (sas_base=2.0)")


def _decoder(name: str, kernel, exponent=None):
  """``decode`` of a backend: its checks, then ``decode_with`` its kernel.

  ``exponent`` maps the config's ``SASParams`` to the ones the kernel runs.
  """
  def decode(query, cache, call: Call):
    _check_decode(name, cache, call)
    sas = call.config.sas_params()
    return decode_with(functools.partial(kernel, interpret=call.config.interpret), query,
                       cache, call, sas=sas if exponent is None else exponent(sas))
  return decode


# exp2 beat the SAS polynomial in the Triton decode kernel too: 0.361 vs 0.392 ms
# at B32 T8192 Hq32 Hkv8 D128 on H100 (gpu_notes.md, session 2).
_triton_decode = _decoder("triton", gpu_decode.flashq_decode, gpu_prefill.fast_sas_params)


# --- triton (GPU) and mosaic_gpu (Hopper and newer) ------------------------------------------
def _gpu_prefill(kernel, block_k: int, query, key, value, extras: Extras, call: Call, *,
                 v_codes_dtype=jnp.int8):
  """Both GPU prefill kernels: the fused Triton quantization kernel (int8 codes,
  Q's scales per token, K's per block or token, smoothed K with its outlier
  channels moved into Q (``prepare.migration_scale``), V^T with one scale per
  ``block_k`` keys, the kernel's key tile; or V's codes in bf16 for a bf16
  P.V), then ``kernel`` with
  the exp2 exponent (on H100 19% faster than the SAS polynomial in the Triton
  kernel, and the fastest Mosaic GPU variant: gpu_notes.md,
  mosaic_gpu_notes.md); P quantization as the kernel's tuned ``BlockSizes`` say.
  K's block scales (``per_token_scales=False``) reach the kernel as one scale
  per key tile, which its softmax folds into one FMA a logit."""
  config = call.config

  def quantize(query, key, value):
    lengths = extras.key_value_seq_lengths
    stats = functools.partial(gpu_quantize.channel_stats, layout="bthd",
                              interpret=config.interpret)
    k_mean, channel_scale = None, None
    if config.smooth_k or config.qk_migration:
      k_mean, k_absmax = stats(key, lengths, smooth=config.smooth_k)
      if config.qk_migration:
        channel_scale = migration_scale(stats(query, smooth=False)[1], k_absmax)
    return PrefillInputs(*gpu_quantize.quantize_qkv(
        query, key, value, block_q=config.block_q, block_k=block_k,
        sm_scale=call.scale, log2e_fold=config.sas_base == 2.0, smooth_k=config.smooth_k,
        kv_lengths=lengths, k_per_token=config.per_token_scales, layout="bthd",
        k_mean=k_mean, channel_scale=channel_scale,
        v_codes_dtype=v_codes_dtype, interpret=config.interpret))

  # The kernels write the [B, Tq, N, H] output in the query's dtype themselves.
  out_dtype = query.dtype if query.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
  kernel = functools.partial(kernel, interpret=config.interpret, out_layout="bthd",
                             out_dtype=out_dtype)
  if not config.per_token_scales:
    kernel = _one_k_scale_per_tile(kernel, block_k)
  return prefill_with(kernel, quantize, query, key, value, extras, call, block_q=config.block_q,
                      block_k=block_k, sas=gpu_prefill.fast_sas_params(config.sas_params()),
                      bthd_output=True)


def triton_prefill(query, key, value, extras: Extras, call: Call):
  _check_supported("triton", query, key, value, extras, call)
  block_sizes = gpu_prefill.BlockSizes.get_default(
      head_dim=query.shape[-1], seq_len_q=query.shape[1], seq_len_k=key.shape[1])
  return _gpu_prefill(functools.partial(gpu_prefill.flashq_prefill, block_sizes=block_sizes),
                      block_sizes.block_k, query, key, value, extras, call,
                      v_codes_dtype=jnp.dtype(block_sizes.pv_dtype))


TRITON = Backend(name="triton", platforms=("gpu",), prefill=triton_prefill,
                 decode=_triton_decode)


def mosaic_gpu_prefill(query, key, value, extras: Extras, call: Call):
  """The Mosaic GPU kernel on the Triton backend's quantized inputs, with the
  Mosaic kernel's key tile."""
  _check_supported("mosaic_gpu", query, key, value, extras, call)
  if call.local_window is not None:
    raise NotImplementedError("mosaic_gpu: local_window runs on 'triton' or 'xla'")
  block_sizes = mgpu_prefill.BlockSizes.get_default(  # block_k is one of its BLOCK_KS
      head_dim=query.shape[-1], seq_len_q=query.shape[1], seq_len_k=key.shape[1])
  return _gpu_prefill(functools.partial(mgpu_prefill.flashq_prefill, block_sizes=block_sizes),
                      block_sizes.block_k, query, key, value, extras, call,
                      v_codes_dtype=jnp.dtype(block_sizes.pv_dtype))


def _one_k_scale_per_tile(kernel, block_k: int):
  """``kernel`` given K's block scales (quantized per ``block_k`` keys, the
  kernel's tile, repeated per token) as one scale per tile (Mosaic GPU: ~11%
  faster than per-token scales)."""
  def run(q, q_scale, k, k_scale, *rest, **kwargs):
    return kernel(q, q_scale, k, k_scale[..., ::block_k], *rest, **kwargs)
  return run


# No Mosaic GPU decode kernel: "mosaic_gpu" decodes with the Triton kernel (as
# "triton" does), so one name serves a whole model on Hopper. The wgmma kernel
# needs sm_90+: ``min_compute_capability`` makes an explicit call elsewhere fail
# fast and keeps it out of the default order there (``backends.default_order``).
MOSAIC_GPU = None if mgpu_prefill is None or compat.plmgpu is None else Backend(
    name="mosaic_gpu", platforms=("gpu",), prefill=mosaic_gpu_prefill,
    decode=_triton_decode, min_compute_capability=(9, 0))


# --- mosaic_tpu ----------------------------------------------------------------------------
def mosaic_tpu_prefill(query, key, value, extras: Extras, call: Call):
  _check_supported("mosaic_tpu", query, key, value, extras, call)
  hq, hk = query.shape[2], key.shape[2]
  block_sizes = tpu_prefill.BlockSizes.get_default(
      head_dim=query.shape[-1], seq_len_q=query.shape[1], seq_len_k=key.shape[1],
      num_q_heads_per_kv_head=hq // hk)
  quantize = quantize_with_blocks(call.config, block_sizes.block_q, block_sizes.block_k,
                                  call.scale, extras.key_value_seq_lengths)
  kernel = functools.partial(tpu_prefill.flashq_prefill, block_sizes=block_sizes,
                             interpret=call.config.interpret)
  return prefill_with(kernel, quantize, query, key, value, extras, call,
                      block_q=block_sizes.block_q, block_k=block_sizes.block_k)


MOSAIC_TPU = Backend(name="mosaic_tpu", platforms=("tpu",), prefill=mosaic_tpu_prefill,
                     decode=_decoder("mosaic_tpu", tpu_decode.flashq_decode))

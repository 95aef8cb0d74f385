"""``turbojax.decode_attention``: new query tokens against a ``QuantizedKVCache``."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.reference import ResidualKV
from turbojax import _validation as v
from turbojax.attention import backends, sharding
from turbojax.attention.base import Call
from turbojax.config import TurboConfig
from turbojax.kv_cache import QuantizedKVCache
from turbojax.quant import quantize_int8_sym


def decode_with(kernel, query, cache: QuantizedKVCache, call: Call):
  """Runs ``kernel`` (the reference's or a Pallas kernel's decode signature)
  once per bit width of the cache and puts the heads back in order.

  Query rows of KV slot ``h`` are its GQA query heads x new tokens; the new
  tokens sit at positions ``lengths - Tq + i`` (they are already cached), so
  attention is causal among them.
  """
  b, tq, hq, d = query.shape
  hk = cache.num_kv_heads
  g = hq // hk
  q = query.astype(jnp.float32).reshape(b, tq, hk, g, d)
  q = jnp.take(q, cache.head_perm, axis=2)
  q8 = quantize_int8_sym(q, channelwise_axes=(0, 1, 2, 3))
  rows = jnp.transpose(q8.qvalue, (0, 2, 3, 1, 4)).reshape(b, hk, g * tq, d)
  q_scale = jnp.transpose(q8.scale[..., 0], (0, 2, 3, 1)).reshape(b, hk, g * tq)
  q_scale = q_scale * (call.scale * call.config.log2_base)
  q_pos = cache.lengths[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)
  q_pos = jnp.tile(q_pos, (1, g))
  outs = []
  start = 0
  for seg, bits, h in zip(cache.segments, cache.segment_bits, cache.segment_heads):
    sl = slice(start, start + h)
    start += h
    residual = ResidualKV(*(x[:, sl] for x in cache.residual))
    outs.append(kernel(rows[:, sl], q_scale[:, sl], q_pos, seg, residual, cache.lengths,
                       bits=bits, group=cache.group_size, sas=call.config.sas_params()))
  out = jnp.concatenate(outs, axis=1).reshape(b, hk, g, tq, d)
  out = jnp.take(out, jnp.argsort(cache.head_perm), axis=1)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, tq, hq, d)


def decode_attention(query, cache: QuantizedKVCache, *, scale: float | None = None,
                     config: TurboConfig | None = None, implementation=None) -> jax.Array:
  """Attention of the newest ``Tq`` tokens over a quantized KV cache.

  Args:
    query: ``[B, Tq, N, H]`` float; its tokens must already be in ``cache``
      (``cache = cache.update(k, v)`` first); causal among themselves.
    cache: the layer's ``QuantizedKVCache`` (``N % num_kv_heads == 0``).
    scale: logit scale, default ``1/sqrt(H)``.
    config: SAS options; ``None`` uses the cache's config. Its storage
      options (bits, groups) must match the cache's.
    implementation: as in ``dot_product_attention``.
  Returns:
    ``[B, Tq, N, H]`` in ``query``'s dtype. Packed groups, the INT8 residual
    window and the new tokens are each attended exactly once, in integers.
  """
  if not isinstance(cache, QuantizedKVCache):
    raise TypeError(f"cache must be a QuantizedKVCache, got {type(cache).__name__}")
  config = cache.config if config is None else config
  if not isinstance(config, TurboConfig):
    raise TypeError(f"config must be a TurboConfig or None, got {type(config).__name__}")
  b, tq, hq, d = v.check_array("query", query, rank=4)
  if b != cache.batch or d != cache.head_dim:
    raise ValueError(
        f"query [batch, seq, heads, head_dim] must have batch={cache.batch} and "
        f"head_dim={cache.head_dim} to match the cache, got {(b, tq, hq, d)}")
  if hq % cache.num_kv_heads:
    raise ValueError(
        f"query heads ({hq}) must be a multiple of the cache's kv heads ({cache.num_kv_heads})")
  if tq > cache.group_size:
    raise ValueError(
        f"query has {tq} tokens; decode_attention takes at most group_size="
        f"{cache.group_size} (use dot_product_attention for longer chunks)")
  call = Call(scale=float(1.0 / math.sqrt(d) if scale is None else scale), is_causal=True,
              local_window=None, config=config)
  def run(name):
    fn = lambda query, cache: backends.BACKENDS[name].decode(query, cache, call)
    axes = sharding.mesh_axes(config)
    if axes is not None and axes[1]:
      mesh, batch_axes, _ = axes
      sharding.check_divisible(mesh, batch_axes, (), b, {})
      fn = sharding.shard(fn, mesh, (sharding.bthd(batch_axes, ()), _cache_specs(cache, batch_axes)),
                          sharding.bthd(batch_axes, ()))
    return fn(query, cache).astype(query.dtype)

  return backends.dispatch(implementation, config, run)


def _cache_specs(cache: QuantizedKVCache, batch_axes):
  """The cache sharded over batch (every per-sequence array), the head order replicated."""
  per_seq = P(batch_axes)
  return dataclasses.replace(
      cache, segments=jax.tree_util.tree_map(lambda _: per_seq, cache.segments),
      residual=jax.tree_util.tree_map(lambda _: per_seq, cache.residual), k_mean=per_seq,
      head_perm=P(), lengths=per_seq, overflow=per_seq, calibrated=P())

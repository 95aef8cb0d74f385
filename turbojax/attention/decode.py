"""``turbojax.decode_attention``: new query tokens against a ``QuantizedKVCache``."""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import PartitionSpec as P

from turbojax import _validation as v
from turbojax.attention import backends, sharding
from turbojax.attention.base import Call
from turbojax.config import TurboConfig
from turbojax.kv_cache import QuantizedKVCache


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
  call = Call(scale=v.check_scale(scale, d), is_causal=True,
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
      residuals=jax.tree_util.tree_map(lambda _: per_seq, cache.residuals), k_mean=per_seq,
      head_perm=P(), lengths=per_seq, overflow=per_seq, calibrated=P())

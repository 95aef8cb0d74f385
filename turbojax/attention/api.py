"""``turbojax.dot_product_attention``: the one dispatch function.

It mirrors ``jax.nn.dot_product_attention`` (same arguments, layout and
return) and adds ``query_offset``, ``config`` and a tokamax-style
``implementation=``: one name fails fast, a sequence falls back with a warning
and raises an ``ExceptionGroup`` if none works, ``None`` picks the platform's
default order, which always ends in the pure-JAX ``"xla"`` path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from turbojax import _validation as v
from turbojax.attention import backends, sharding
from turbojax.attention.base import Call, Extras
from turbojax.attention.exact import exact_attention
from turbojax.config import TurboConfig
from turbojax.quant import QArray, dequantize


def _exact(query, key, value, extras: Extras, call: Call):
  return exact_attention(
      query, key, value, extras.bias, extras.mask, scale=call.scale,
      is_causal=call.is_causal, query_seq_lengths=extras.query_seq_lengths,
      key_value_seq_lengths=extras.key_value_seq_lengths,
      local_window=call.local_window, query_offset=extras.query_offset)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(name: str, call: Call, query, key, value, extras: Extras):
  return backends.BACKENDS[name].prefill(query, key, value, extras, call)


def _attention_fwd(name, call, query, key, value, extras):
  out = _attention(name, call, query, key, value, extras)
  return out, (query, key, value, extras)


def _attention_bwd(name, call, residuals, g):
  """Straight-through estimator: exact attention's gradient on the inputs."""
  query, key, value, extras = residuals
  def f(q, k, v, bias):
    return _exact(q, k, v, extras._replace(bias=bias), call)
  _, vjp = jax.vjp(f, query, key, value, extras.bias)
  dq, dk, dv, dbias = vjp(g.astype(jnp.float32))
  none = jax.tree.map(lambda _: None, extras._replace(bias=None))
  return dq, dk, dv, none._replace(bias=dbias)


_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(
    query, key, value, bias=None, mask=None, *, scale: float | None = None,
    is_causal: bool = False, query_seq_lengths=None, key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None, query_offset=0,
    config: TurboConfig | None = None,
    implementation: str | Sequence[str] | None = None) -> jax.Array:
  """Quantized scaled dot-product attention (TurboAttention), ``[B, T, N, H]``.

  Args:
    query: ``[B, T, N, H]`` float32/bfloat16/float16 (or an INT8 ``QArray``).
    key, value: ``[B, S, K, H]`` with ``N % K == 0`` (GQA/MQA).
    bias, mask: optional rank-4 arrays broadcastable to ``[B, N, T, S]``
      (mask True keeps); they run on the ``"xla"`` path.
    scale: logit scale, default ``1/sqrt(H)``.
    is_causal: as in ``jax.nn``: ``tril`` of the ``T x S`` matrix (top-left).
    query_seq_lengths, key_value_seq_lengths: optional int ``[B]``.
    local_window_size: ``w`` or ``(left, right)``.
    query_offset: position of query 0 among the keys (int or int ``[B]``),
      e.g. ``S - T`` for bottom-right causal alignment in chunked prefill.
    config: ``TurboConfig`` (``None`` means ``TurboConfig()``).
    implementation: ``None``, ``"xla"``, ``"triton"``, ``"mosaic_gpu"``,
      ``"mosaic_tpu"`` or a sequence of them in order of preference.
  Returns:
    ``[B, T, N, H]`` in ``query``'s dtype. Rows that see no key are 0.
  Gradients use the straight-through estimator (exact attention's backward).
  """
  config = TurboConfig() if config is None else config
  if not isinstance(config, TurboConfig):
    raise TypeError(f"config must be a TurboConfig or None, got {type(config).__name__}")
  (b, tq, hq, d), (_, tk, _, _) = v.check_qkv(query, key, value)
  out_dtype = query.dtype if not isinstance(query, QArray) else jnp.dtype(query.dtype)
  target = (b, hq, tq, tk)
  offset = jnp.asarray(query_offset)
  if offset.ndim not in (0, 1) or not jnp.issubdtype(offset.dtype, jnp.integer) or (
      offset.ndim == 1 and offset.shape != (b,)):
    raise ValueError(f"query_offset must be an int or an int array of shape ({b},), "
                     f"got {query_offset!r}")
  extras = Extras(
      bias=v.check_broadcast("bias", bias, target, boolean=False),
      mask=v.check_broadcast("mask", mask, target, boolean=True),
      query_seq_lengths=v.check_lengths("query_seq_lengths", query_seq_lengths, b, tq),
      key_value_seq_lengths=v.check_lengths("key_value_seq_lengths", key_value_seq_lengths, b, tk),
      query_offset=offset.astype(jnp.int32))
  call = Call(scale=v.check_scale(scale, d),
              is_causal=bool(is_causal), local_window=v.check_window(local_window_size),
              config=config)
  if config.exact:
    q, k, val = (dequantize(x) if isinstance(x, QArray) else x for x in (query, key, value))
    return _exact(q, k, val, extras, call).astype(out_dtype)

  def run(name):
    fn = functools.partial(_attention, name, call)
    axes = sharding.mesh_axes(config)
    if axes is not None and not any(isinstance(x, QArray) for x in (query, key, value)):
      mesh, batch_axes, head_axes = axes
      sharding.check_divisible(mesh, batch_axes, head_axes, b,
                               {"query heads": hq, "key/value heads": key.shape[2]})
      qkv = sharding.bthd(batch_axes, head_axes)
      extras_specs = Extras(
          bias=sharding.bias_like(extras.bias, batch_axes, head_axes),
          mask=sharding.bias_like(extras.mask, batch_axes, head_axes),
          query_seq_lengths=sharding.per_batch(extras.query_seq_lengths, batch_axes),
          key_value_seq_lengths=sharding.per_batch(extras.key_value_seq_lengths, batch_axes),
          query_offset=sharding.per_batch(extras.query_offset, batch_axes))
      fn = sharding.shard(fn, mesh, (qkv, qkv, qkv, extras_specs), qkv)
    return fn(query, key, value, extras).astype(out_dtype)

  return backends.dispatch(implementation, config, run)

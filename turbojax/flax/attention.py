"""Flax integration: ``make_attention_fn`` for the standard hook, and
``TurboAttention``, an ``nnx`` attention layer with a quantized KV cache.

``make_attention_fn(config)`` returns a drop-in ``attention_fn`` for
``nnx.MultiHeadAttention`` and linen's ``MultiHeadDotProductAttention``: it
takes their full keyword set (linen filters keywords by signature, so every
one is an explicit parameter) and runs ``turbojax.dot_product_attention``.

``TurboAttention`` is shaped like ``nnx.MultiHeadAttention`` (GQA, RoPE,
``dtype``/``param_dtype``), and in decode mode keeps K/V in a
``QuantizedKVCache`` (a pytree, held in an ``nnx.Cache`` variable):

* a chunk of ``T > group_size`` tokens (the prefill) attends over the float
  K/V of the chunk itself and of what the cache held before it (dequantized),
  through ``turbojax.dot_product_attention`` (INT8 + SAS), and is stored;
* ``T <= group_size`` tokens (decode steps) are stored first and then attend
  over the cache with ``turbojax.decode_attention`` (packed INT4/INT2 groups +
  INT8 residual window, integer math).

Attention-weight dropout cannot be applied inside a fused quantized kernel
(the weights are never materialized): ``dropout_rate > 0`` with
``deterministic=False`` raises ``NotImplementedError``. Likewise sowing
attention weights (``module=``/``sow_weights``) and custom einsums.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import initializers

from turbojax.attention.api import dot_product_attention
from turbojax.attention.decode import decode_attention
from turbojax.config import TurboConfig
from turbojax.kv_cache import QuantizedKVCache

Array = jax.Array
_DEFAULT_KERNEL_INIT = initializers.lecun_normal()  # as nnx.MultiHeadAttention
_DEFAULT_BIAS_INIT = initializers.zeros_init()

_DROPOUT_MESSAGE = (
    "turbojax attention cannot apply dropout to the attention weights: the fused "
    "quantized kernel never materializes them. Use dropout_rate=0.0 (or "
    "deterministic=True), or dropout on the attention output/residual instead.")


def _check_dropout(dropout_rate: float, deterministic: bool | None) -> None:
  if dropout_rate and dropout_rate > 0.0 and not deterministic:
    raise NotImplementedError(_DROPOUT_MESSAGE)


# --------------------------------------------------------------------------------------------
# attention_fn for nnx.MultiHeadAttention / linen MultiHeadDotProductAttention
# --------------------------------------------------------------------------------------------
def _flatten_batch(x, batch_dims: tuple[int, ...]):
  """``[*batch, T, N, H]`` -> ``[B, T, N, H]`` (``B = prod(batch)``, 1 if none)."""
  return x.reshape((math.prod(batch_dims),) + x.shape[len(batch_dims):])


def _flatten_bias_or_mask(x, batch_dims: tuple[int, ...]):
  """A ``[batch..., N, T, S]``-broadcastable mask/bias -> rank 4 ``[B|1, N|1, T|1, S|1]``."""
  if x is None:
    return None
  x = jnp.asarray(x)
  nb = len(batch_dims)
  if x.ndim < nb + 3:
    x = x.reshape((1,) * (nb + 3 - x.ndim) + x.shape)
  if x.ndim > nb + 3:
    raise ValueError(
        f"mask/bias of shape {x.shape} has more dims than [batch..., heads, q, kv] "
        f"with batch dims {batch_dims}")
  if nb == 0:
    return x[None]
  if all(s == 1 for s in x.shape[:nb]):
    return x.reshape((1,) + x.shape[nb:])
  x = jnp.broadcast_to(x, batch_dims + x.shape[nb:])
  return x.reshape((math.prod(batch_dims),) + x.shape[nb:])


def _as_bool(mask):
  """Flax masks may be float (``make_causal_mask`` gives 1.0/0.0): nonzero keeps."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  return mask if mask.dtype == jnp.bool_ else mask != 0


def make_attention_fn(config: TurboConfig | None = None,
                      implementation: str | Sequence[str] | None = None):
  """A drop-in ``attention_fn`` running ``turbojax.dot_product_attention``.

  Usage::

    attn = nnx.MultiHeadAttention(..., attention_fn=make_attention_fn(cfg), rngs=rngs)
    attn = nn.MultiHeadDotProductAttention(..., attention_fn=make_attention_fn(cfg))

  The returned function takes the keywords of ``flax`` attention functions:
  ``query, key, value`` ``[batch..., T, N, H]`` (any number of batch dims,
  ``key``/``value`` may have fewer heads: GQA), ``bias``/``mask``
  broadcastable to ``[batch..., N, T, S]`` (mask ``True`` keeps), ``dtype``
  (the computation dtype: Q/K/V are promoted to it; default their common
  dtype) and ``is_causal``. ``precision`` and ``force_fp32_for_softmax`` are
  accepted and ignored (the quantized path fixes its own precisions; the
  softmax accumulates in f32). Attention-weight dropout
  (``dropout_rate > 0`` and not ``deterministic``), ``module=`` (sowing the
  weights) and custom einsums raise ``NotImplementedError``: a fused kernel
  has no weights to drop, sow or multiply with another einsum. Gradients use
  the straight-through estimator (exact attention's backward).
  """
  config = TurboConfig() if config is None else config
  if not isinstance(config, TurboConfig):
    raise TypeError(f"config must be a TurboConfig or None, got {type(config).__name__}")

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout: bool = True,
                   dropout_rng=None, dropout_rate: float = 0.0, deterministic: bool = False,
                   dtype=None, precision=None, module=None, promote_dtype=None,
                   is_causal: bool = False, force_fp32_for_softmax: bool = False,
                   qk_attn_weights_einsum=None, attn_weights_value_einsum=None, **kwargs):
    del broadcast_dropout, dropout_rng, precision, force_fp32_for_softmax
    unknown = {k: v for k, v in kwargs.items() if v is not None and v is not False}
    if unknown:
      raise TypeError(f"turbojax attention_fn got unsupported arguments {sorted(unknown)}")
    _check_dropout(dropout_rate, deterministic)
    if module is not None:
      raise NotImplementedError(
          "turbojax attention cannot sow attention weights (sow_weights=True / module=): "
          "the fused quantized kernel never materializes them")
    if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
      raise NotImplementedError(
          "turbojax attention runs its own INT8 matmuls; custom attention einsums "
          "(qk_attn_weights_einsum / attn_weights_value_einsum) are not supported")
    if promote_dtype is not None:
      query, key, value = promote_dtype((query, key, value), dtype=dtype)
    else:
      dt = jnp.result_type(query, key, value) if dtype is None else dtype
      query, key, value = (jnp.asarray(x, dt) for x in (query, key, value))
    if query.ndim < 3:
      raise ValueError(f"query must be [batch..., T, N, H], got shape {query.shape}")
    batch_dims = query.shape[:-3]
    if key.shape[:-3] != batch_dims or value.shape[:-3] != batch_dims:
      raise ValueError(
          f"query, key and value must share batch dims, got {query.shape}, {key.shape}, "
          f"{value.shape}")
    q4, k4, v4 = (_flatten_batch(x, batch_dims) for x in (query, key, value))
    out = dot_product_attention(
        q4, k4, v4, bias=_flatten_bias_or_mask(bias, batch_dims),
        mask=_flatten_bias_or_mask(_as_bool(mask), batch_dims), is_causal=is_causal, config=config,
        implementation=implementation)
    return out.reshape(batch_dims + out.shape[1:])

  attention_fn.config = config
  attention_fn.implementation = implementation
  return attention_fn


# --------------------------------------------------------------------------------------------
# Rotary embeddings
# --------------------------------------------------------------------------------------------
def apply_rope(x: Array, positions: Array, theta: float = 10000.0) -> Array:
  """Rotary position embedding (rotate-half form) of ``x`` ``[B, T, N, H]``
  at integer ``positions`` ``[B, T]`` (or ``[T]``); computed in f32."""
  h = x.shape[-1]
  if h % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {h}")
  inv_freq = 1.0 / (theta ** (np.arange(0, h, 2, dtype=np.float32) / h))
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  angles = angles[..., None, :]  # broadcast over heads
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : h // 2], xf[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


# --------------------------------------------------------------------------------------------
# A plain float KV cache (exact attention, and the bf16 baseline of the serving benchmark)
# --------------------------------------------------------------------------------------------
@functools.partial(jax.tree_util.register_dataclass, data_fields=("key", "value", "lengths"),
                   meta_fields=())
@dataclasses.dataclass(frozen=True)
class FloatKVCache:
  """A float KV cache ``[B, max_len, Hk, D]`` with per-sequence ``lengths``
  (a pytree with the ``update``/``lengths``/``nbytes``/``dequantize`` API of
  ``QuantizedKVCache``). Attend with ``float_decode_attention``."""

  key: Array
  value: Array
  lengths: Array

  @classmethod
  def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
           dtype=jnp.bfloat16) -> FloatKVCache:
    shape = (batch, max_len, num_kv_heads, head_dim)
    return cls(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype),
               lengths=jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.key.shape[1]

  @property
  def nbytes(self) -> int:
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self)))

  def update(self, key: Array, value: Array) -> FloatKVCache:
    """Writes ``[B, L, Hk, D]`` at each sequence's length. Past ``max_len``
    the write is clamped by ``dynamic_update_slice`` (do not overflow)."""
    def put(buf, x, start):
      return jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), start, axis=0)
    k = jax.vmap(put)(self.key, key, self.lengths)
    v = jax.vmap(put)(self.value, value, self.lengths)
    return FloatKVCache(k, v, self.lengths + key.shape[1])

  def dequantize(self) -> tuple[Array, Array]:
    valid = (jnp.arange(self.max_len)[None, :] < self.lengths[:, None])[:, :, None, None]
    return (jnp.where(valid, self.key.astype(jnp.float32), 0.0),
            jnp.where(valid, self.value.astype(jnp.float32), 0.0))


def float_decode_attention(query: Array, cache: FloatKVCache, *, scale: float | None = None,
                           ) -> Array:
  """Exact attention of the newest ``T`` tokens (already in ``cache``, causal
  among themselves) over a ``FloatKVCache``: matmuls in the cache's dtype with
  f32 accumulation, f32 softmax. Returns ``query``'s dtype."""
  b, t, hq, d = query.shape
  hk = cache.key.shape[2]
  g = hq // hk
  scale = d ** -0.5 if scale is None else scale
  q = query.reshape(b, t, hk, g, d).astype(cache.key.dtype)
  logits = jnp.einsum("bthgd,bshd->bhgts", q, cache.key,
                      preferred_element_type=jnp.float32) * scale
  q_pos = cache.lengths[:, None] - t + jnp.arange(t)  # [B, T]
  keep = jnp.arange(cache.max_len)[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
  logits = jnp.where(keep[:, None, None], logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhgts,bshd->bthgd", p.astype(cache.value.dtype), cache.value,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, hq, d).astype(query.dtype)


# --------------------------------------------------------------------------------------------
# nnx module
# --------------------------------------------------------------------------------------------
def _insert_chunk(buf: Array, chunk: Array, starts: Array) -> Array:
  """Writes ``chunk`` ``[B, T, ...]`` into ``buf`` ``[B, S, ...]`` at ``starts[b]``."""
  def put(x, c, s):
    return jax.lax.dynamic_update_slice_in_dim(x, c.astype(x.dtype), s, axis=0)
  return jax.vmap(put)(buf, chunk, starts)


class TurboAttention(nnx.Module):
  """Multi-head attention (GQA, RoPE) running TurboAttention, with a quantized
  KV cache for autoregressive decoding. Shaped like ``nnx.MultiHeadAttention``.

  Args:
    num_heads: query heads.
    in_features: input features.
    qkv_features: features of Q/K/V over all heads (default ``in_features``).
    out_features: output features (default ``in_features``).
    num_kv_heads: K/V heads (GQA/MQA; default ``num_heads``).
    dtype: computation dtype (``None``: inferred from inputs and params).
    param_dtype: parameter dtype.
    dropout_rate, deterministic, broadcast_dropout: as in ``nnx``; attention-
      weight dropout is not possible in a fused kernel, so ``dropout_rate > 0``
      raises ``NotImplementedError`` when not deterministic.
    use_bias: bias in the Q/K/V/out projections (default True, as in ``nnx``).
    decode: use the autoregressive cache (``init_cache`` first).
    use_rope, rope_theta: rotary embeddings of Q and K (positions from the
      cache's ``lengths`` when decoding, ``0..T-1`` otherwise).
    config: ``TurboConfig`` (``None``: ``TurboConfig()``). With
      ``config.exact`` attention is exact and ``init_cache`` defaults to a
      float cache.
    implementation: as in ``turbojax.dot_product_attention``.
    rngs: ``nnx.Rngs`` for the initializers.

  Decode mode (``decode=True`` after ``init_cache``): a call with ``T`` new
  tokens at positions ``lengths .. lengths + T - 1``. ``T > group_size``
  (prefill) attends over the float K/V of the chunk plus the dequantized
  earlier cache content, with ``dot_product_attention(is_causal=True,
  query_offset=lengths)``, then stores the chunk. ``T <= group_size`` stores
  the tokens and runs ``decode_attention`` over the quantized cache. The
  choice depends on the static ``T`` only, so a jitted step never retraces.
  """

  def __init__(
      self, num_heads: int, in_features: int, qkv_features: int | None = None,
      out_features: int | None = None, num_kv_heads: int | None = None, *,
      dtype: Any = None, param_dtype: Any = jnp.float32, broadcast_dropout: bool = True,
      dropout_rate: float = 0.0, deterministic: bool | None = None,
      kernel_init=_DEFAULT_KERNEL_INIT, out_kernel_init=None,
      bias_init=_DEFAULT_BIAS_INIT, use_bias: bool = True, decode: bool = False,
      use_rope: bool = True, rope_theta: float = 10000.0, config: TurboConfig | None = None,
      implementation: str | Sequence[str] | None = None, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.in_features = in_features
    self.qkv_features = in_features if qkv_features is None else qkv_features
    self.out_features = in_features if out_features is None else out_features
    self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
    if self.qkv_features % self.num_heads:
      raise ValueError(
          f"qkv_features ({self.qkv_features}) must be divisible by num_heads ({num_heads})")
    self.head_dim = self.qkv_features // self.num_heads
    config = TurboConfig() if config is None else config
    if not isinstance(config, TurboConfig):
      raise TypeError(f"config must be a TurboConfig or None, got {type(config).__name__}")
    self.config = config
    self.implementation = implementation
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.broadcast_dropout = broadcast_dropout
    self.dropout_rate = dropout_rate
    self.deterministic = deterministic
    self.use_bias = use_bias
    self.decode = decode
    self.use_rope = use_rope
    self.rope_theta = rope_theta
    dense = functools.partial(
        nnx.LinearGeneral, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
        bias_init=bias_init, use_bias=use_bias, rngs=rngs)
    self.query = dense(in_features, (self.num_heads, self.head_dim))
    self.key = dense(in_features, (self.num_kv_heads, self.head_dim))
    self.value = dense(in_features, (self.num_kv_heads, self.head_dim))
    self.out = nnx.LinearGeneral(
        (self.num_heads, self.head_dim), self.out_features, axis=(-2, -1), dtype=dtype,
        param_dtype=param_dtype, kernel_init=out_kernel_init or kernel_init,
        bias_init=bias_init, use_bias=use_bias, rngs=rngs)
    self.kv_cache: nnx.Cache | None = nnx.data(None)

  # --- cache ----------------------------------------------------------------------------------
  def init_cache(self, batch: int | Sequence[int], max_len: int | None = None, dtype=None, *,
                 kind: str | None = None) -> None:
    """Creates an empty KV cache for ``batch`` sequences of ``max_len`` tokens.

    Also accepts ``nnx.MultiHeadAttention``'s form ``init_cache(input_shape,
    dtype)`` with ``input_shape = (batch, max_len, features)``. ``kind`` is
    ``"quantized"`` (a ``QuantizedKVCache`` built from ``self.config``) or
    ``"float"`` (a ``FloatKVCache`` in ``dtype``, default ``self.dtype`` or
    float32, like nnx); default: float when ``config.exact`` else quantized.
    """
    if not isinstance(batch, (int, np.integer)):
      shape = tuple(batch)
      if len(shape) != 3 or max_len is not None:
        raise ValueError(
            "init_cache takes (batch, max_len) or an input shape (batch, max_len, features), "
            f"got {batch!r}, {max_len!r}")
      batch, max_len = shape[0], shape[1]
    if max_len is None:
      raise ValueError("init_cache needs max_len")
    kind = ("float" if self.config.exact else "quantized") if kind is None else kind
    if kind == "quantized":
      cache = QuantizedKVCache.init(int(batch), int(max_len), self.num_kv_heads, self.head_dim,
                                    self.config)
    elif kind == "float":
      dtype = dtype or self.dtype or jnp.float32
      cache = FloatKVCache.init(int(batch), int(max_len), self.num_kv_heads, self.head_dim,
                                dtype)
    else:
      raise ValueError(f"kind must be 'quantized' or 'float', got {kind!r}")
    self.kv_cache = nnx.Cache(cache)

  @property
  def cache_index(self) -> Array:
    """Tokens stored per sequence, int32 ``[B]`` (``cache.lengths``)."""
    if self.kv_cache is None:
      raise ValueError("no cache: call init_cache first")
    return self.kv_cache.get_value().lengths

  def set_view(self, deterministic: bool | None = None, decode: bool | None = None,
               batch_size: int | None = None, max_length: int | None = None):
    """For ``nnx.view``: set ``deterministic``/``decode``; with ``decode`` and no
    cache yet, ``batch_size`` and ``max_length`` create one."""
    if deterministic is not None:
      self.deterministic = deterministic
    if decode is not None:
      self.decode = decode
      if decode and self.kv_cache is None:
        if batch_size is None or max_length is None:
          raise TypeError("'batch_size' and 'max_length' are needed to create the cache")
        self.init_cache(batch_size, max_length)

  # --- forward ------------------------------------------------------------------------------
  def __call__(self, inputs_q: Array, inputs_k: Array | None = None,
               inputs_v: Array | None = None, *, mask: Array | None = None,
               deterministic: bool | None = None, decode: bool | None = None,
               is_causal: bool = False) -> Array:
    """Attention of ``inputs_q`` ``[B, T, F]`` over ``inputs_k``/``inputs_v``
    (default self-attention). ``mask`` ``[B|1, N|1, T, S]`` (True keeps) and
    ``is_causal`` apply outside decode mode; decoding is causal by
    construction and takes no mask."""
    if inputs_k is None:
      if inputs_v is not None:
        raise ValueError("inputs_k cannot be None if inputs_v is given")
      inputs_k = inputs_q
    if inputs_v is None:
      inputs_v = inputs_k
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(
          f"Incompatible input dimension, got {inputs_q.shape[-1]} but module expects "
          f"{self.in_features}.")
    if self.dropout_rate > 0.0:
      deterministic = self.deterministic if deterministic is None else deterministic
      if deterministic is None:
        raise ValueError("no `deterministic` argument was given to TurboAttention "
                         "(as a call argument or attribute) and dropout_rate > 0")
      _check_dropout(self.dropout_rate, deterministic)
    decode = self.decode if decode is None else decode

    query = self.query(inputs_q)
    key = self.key(inputs_k)
    value = self.value(inputs_v)
    if decode:
      out = self._decode(query, key, value, mask)
    else:
      if self.use_rope:
        query = apply_rope(query, jnp.arange(query.shape[-3]), self.rope_theta)
        key = apply_rope(key, jnp.arange(key.shape[-3]), self.rope_theta)
      out = dot_product_attention(query, key, value, mask=_as_bool(mask), is_causal=is_causal,
                                  config=self.config, implementation=self.implementation)
    return self.out(out)

  def _decode(self, query, key, value, mask):
    if self.kv_cache is None:
      raise ValueError("Autoregressive cache not initialized, call ``init_cache`` first.")
    if mask is not None:
      raise NotImplementedError(
          "TurboAttention in decode mode is causal over the cache and takes no mask")
    if query.shape[1] != key.shape[1]:
      raise ValueError("decode mode is self-attention: inputs_q and inputs_k need equal lengths")
    cache = self.kv_cache.get_value()
    t = query.shape[1]
    start = cache.lengths  # [B], position of the first new token
    if self.use_rope:
      positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)
      query = apply_rope(query, positions, self.rope_theta)
      key = apply_rope(key, positions, self.rope_theta)

    if isinstance(cache, FloatKVCache):
      cache = cache.update(key, value)
      out = float_decode_attention(query, cache)
    elif t <= cache.group_size:
      cache = cache.update(key, value)
      out = decode_attention(query, cache, config=self.config,
                             implementation=self.implementation)
    else:  # prefill chunk: float K/V of the chunk after the earlier (dequantized) tokens
      old_k, old_v = cache.dequantize()
      keys = _insert_chunk(old_k.astype(query.dtype), key, start)
      values = _insert_chunk(old_v.astype(query.dtype), value, start)
      cache = cache.update(key, value)
      out = dot_product_attention(
          query, keys, values, is_causal=True, query_offset=start,
          key_value_seq_lengths=jnp.minimum(start + t, cache.max_len), config=self.config,
          implementation=self.implementation)
    self.kv_cache.set_value(cache)
    return out

"""Exact float attention with every masking feature of the public API.

Used for ``TurboConfig(exact=True)`` and as the straight-through backward of
the quantized forward. Layout ``[B, T, N, H]`` as ``jax.nn.dot_product_attention``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import common


def structured_keep(b, tq, tk, *, is_causal, local_window, query_offset,
                    query_seq_lengths, key_value_seq_lengths):
  """Boolean keep-mask ``[B, 1, Tq, Tk]`` from causality, windows and lengths."""
  offset = jnp.broadcast_to(jnp.asarray(query_offset, jnp.int32), (b,))
  q_pos = offset[:, None] + jnp.arange(tq, dtype=jnp.int32)  # [B, Tq]
  k_pos = jnp.arange(tk, dtype=jnp.int32)
  q_len = None if query_seq_lengths is None else (
      jnp.asarray(query_seq_lengths, jnp.int32) + offset)[:, None, None]
  kv_len = None if key_value_seq_lengths is None else (
      jnp.asarray(key_value_seq_lengths, jnp.int32)[:, None, None])
  keep = common.attention_mask(q_pos, k_pos, causal=is_causal, local_window=local_window,
                               q_len=q_len, kv_len=kv_len)
  return keep[:, None]


def exact_attention(query, key, value, bias=None, mask=None, *, scale, is_causal=False,
                    query_seq_lengths=None, key_value_seq_lengths=None,
                    local_window=None, query_offset=0):
  """Float32 softmax attention; rows with no visible key give 0. Returns f32."""
  b, tq, hq, d = query.shape
  tk, hk = key.shape[1], key.shape[2]
  g = hq // hk
  q = query.astype(jnp.float32).reshape(b, tq, hk, g, d)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, key.astype(jnp.float32)) * scale
  logits = logits.reshape(b, hq, tq, tk)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  keep = structured_keep(b, tq, tk, is_causal=is_causal, local_window=local_window,
                         query_offset=query_offset, query_seq_lengths=query_seq_lengths,
                         key_value_seq_lengths=key_value_seq_lengths)
  if mask is not None:
    keep = keep & mask
  keep = jnp.broadcast_to(keep, logits.shape)
  logits = jnp.where(keep, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.where(keep, jnp.exp(logits - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0, 1.0, denom)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p.reshape(b, hk, g, tq, tk),
                   value.astype(jnp.float32))
  return out.reshape(b, tq, hq, d)

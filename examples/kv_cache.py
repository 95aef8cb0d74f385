"""Fill a quantized KV cache from a prefill, decode token by token, report bytes and error.

Run: python examples/kv_cache.py [--int2-heads 4]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import turbojax
from turbojax.testing import random_qkv, relative_error


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--prefill", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv-heads", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--int2-heads", type=int, default=0)
  args = parser.parse_args()

  total = args.prefill + args.steps
  config = turbojax.TurboConfig(int2_heads=args.int2_heads)
  q, k, v = random_qkv(0, args.batch, total, total, args.heads, args.kv_heads, args.head_dim)
  cache = turbojax.QuantizedKVCache.init(args.batch, total, args.kv_heads, args.head_dim, config)
  update = jax.jit(lambda c, k, v: c.update(k, v), donate_argnums=0)
  cache = update(cache, k[:, :args.prefill], v[:, :args.prefill])

  @jax.jit
  def step(cache, q_t, k_t, v_t):
    cache = cache.update(k_t, v_t)
    return cache, turbojax.decode_attention(q_t, cache)

  outs = []
  for t in range(args.prefill, total):
    cache, out = step(cache, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
    outs.append(out)
  out = jnp.concatenate(outs, axis=1)
  exact = turbojax.dot_product_attention(
      q[:, args.prefill:], k, v, is_causal=True, query_offset=args.prefill,
      config=turbojax.TurboConfig(exact=True))
  kd, vd = cache.dequantize()
  over_cache = turbojax.dot_product_attention(
      q[:, args.prefill:], kd[:, :total], vd[:, :total], is_causal=True,
      query_offset=args.prefill, config=turbojax.TurboConfig(exact=True))

  bf16_per_token = 2 * args.kv_heads * args.head_dim * 2
  per_token = cache.nbytes / (args.batch * cache.max_len)
  print(f"cache: {cache.max_len} slots x batch {args.batch}, bits per head "
        f"{cache.head_bits().tolist()}, lengths {cache.lengths.tolist()}")
  print(f"bytes/token: {per_token:.1f} (bf16: {bf16_per_token}, {bf16_per_token / per_token:.2f}x "
        f"smaller, scales and zero points included)")
  print(f"decode rel err vs exact attention: {relative_error(out, exact):.3f}; vs exact "
        f"attention over the cache's own dequantized K/V: {relative_error(out, over_cache):.4f}")


if __name__ == "__main__":
  main()

"""TurboAttention in one screen: accuracy against jax.nn and speed on this backend.

Run: python examples/quickstart.py  (CPU, GPU or TPU; whatever JAX sees)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import turbojax
from turbojax.testing import random_qkv, relative_error, row_errors


def timed(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2] * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  on_accelerator = jax.default_backend() != "cpu"
  parser.add_argument("--seq", type=int, default=4096 if on_accelerator else 512)
  parser.add_argument("--heads", type=int, default=32 if on_accelerator else 8)
  parser.add_argument("--kv-heads", type=int, default=8 if on_accelerator else 2)
  parser.add_argument("--head-dim", type=int, default=128)
  args = parser.parse_args()

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"turbojax {turbojax.__version__}")
  dtype = jnp.bfloat16 if on_accelerator else jnp.float32
  q, k, v = random_qkv(0, 1, args.seq, args.seq, args.heads, args.kv_heads, args.head_dim, dtype)
  ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), is_causal=True)

  print(f"\nprefill: batch 1, {args.seq} tokens, {args.heads}/{args.kv_heads} heads, "
        f"head_dim {args.head_dim}, causal, {jnp.dtype(dtype).name}")
  print(f"{'':28s} {'rel err':>9s} {'row mean':>9s} {'row max':>9s} {'ms':>9s}")
  rows = {
      "jax.nn (xla)": jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)),
      "turbojax exact": jax.jit(lambda q, k, v: turbojax.dot_product_attention(
          q, k, v, is_causal=True, config=turbojax.TurboConfig(exact=True))),
      "turbojax INT8+SAS": jax.jit(lambda q, k, v: turbojax.dot_product_attention(
          q, k, v, is_causal=True)),
  }
  for name, fn in rows.items():
    out = fn(q, k, v)
    mean_row, max_row = row_errors(out, ref)
    print(f"{name:28s} {relative_error(out, ref):9.2e} {mean_row:9.2e} {max_row:9.2e} "
          f"{timed(fn, q, k, v):9.2f}")

  print("\ndecode: 1 new token against a quantized KV cache of the prefill")
  bf16_bytes = 2 * args.seq * args.kv_heads * args.head_dim * 2
  for label, config in (("INT4", turbojax.TurboConfig()),
                        ("INT4/INT2 (half)", turbojax.TurboConfig(int2_heads=args.kv_heads // 2))):
    cache = turbojax.QuantizedKVCache.init(1, args.seq, args.kv_heads, args.head_dim, config)
    cache = jax.jit(lambda c, k, v: c.update(k, v))(cache, k, v)
    out = jax.jit(turbojax.decode_attention)(q[:, -1:], cache)
    exact = turbojax.dot_product_attention(q[:, -1:], k, v, is_causal=True,
                                           query_offset=args.seq - 1,
                                           config=turbojax.TurboConfig(exact=True))
    print(f"{label:18s} cache {cache.nbytes / 2**20:7.2f} MiB ({bf16_bytes / cache.nbytes:.2f}x "
          f"smaller than bf16), rel err vs exact {relative_error(out, exact):.3f}")


if __name__ == "__main__":
  main()

"""QuantizedKVCache and decode_attention (issue 4)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import turbojax
from turbojax.attention.exact import exact_attention
from turbojax.testing import random_qkv, relative_error

MIXED = turbojax.TurboConfig(int2_heads=1)
# Library functions are not jitted internally; tests jit them as users do.
update = jax.jit(lambda cache, k, v, n=None: cache.update(k, v, new_lengths=n))
decode = jax.jit(turbojax.decode_attention)
# References, jitted where eager dispatch of the 2048-token cache dominated.
dequantize = jax.jit(lambda cache: cache.dequantize())
exact_reference = jax.jit(exact_attention, static_argnames=("scale", "is_causal", "query_offset"))


def _leaves_equal(a, b):
  return all(bool(jnp.array_equal(x, y))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("int2_heads, min_ratio", [(0, 3.5), (4, 4.4)])
def test_nbytes_ratio_vs_bf16_for_8k_cache(int2_heads, min_ratio):
  config = turbojax.TurboConfig(int2_heads=int2_heads)
  cache = turbojax.QuantizedKVCache.init(1, 8192, 8, 128, config)
  leaves = jax.tree_util.tree_leaves(cache)
  assert cache.nbytes == sum(x.nbytes for x in leaves)
  assert any(x.dtype == jnp.uint8 for x in leaves)  # really packed codes
  assert not any(x.dtype in (jnp.float32, jnp.bfloat16) and x.size >= 8192 * 128 for x in leaves)
  bf16_bytes = 1 * 8192 * 8 * 128 * 2 * 2
  ratio = bf16_bytes / cache.nbytes
  print(f"int2_heads={int2_heads}: {cache.nbytes} bytes, {ratio:.2f}x smaller than bf16, "
        f"{cache.nbytes / 8192:.1f} bytes/token")
  assert ratio >= min_ratio


@pytest.mark.parametrize("config", [turbojax.TurboConfig(), MIXED], ids=["int4", "mixed"])
def test_chunked_and_streaming_updates_are_bit_identical(config):
  _, k, v = random_qkv(0, 2, 1, 150, 1, 2, 64)
  cache = update(turbojax.QuantizedKVCache.init(2, 256, 2, 64, config), k[:, :40], v[:, :40])
  chunked = update(cache, k[:, 40:], v[:, 40:])
  donating = jax.jit(lambda c, k, v: c.update(k, v), donate_argnums=0)
  streamed = jax.tree_util.tree_map(jnp.copy, cache)  # donated below
  for t in range(40, 150):
    streamed = donating(streamed, k[:, t:t + 1], v[:, t:t + 1])
  assert _leaves_equal(chunked, streamed)
  np.testing.assert_array_equal(np.asarray(chunked.lengths), [150, 150])


@pytest.mark.parametrize("config, name", [(turbojax.TurboConfig(), "INT4"), (MIXED, "INT4/INT2")])
def test_decode_accuracy_contract(config, name):
  b, t, hq, hk, d, tq = 1, 2048, 8, 2, 128, 4
  q, k, v = random_qkv(1, b, tq, t, hq, hk, d)
  cache = turbojax.QuantizedKVCache.init(b, t, hk, d, config)
  cache = update(update(cache, k[:, :-tq], v[:, :-tq]), k[:, -tq:], v[:, -tq:])
  out = decode(q, cache)
  kd, vd = dequantize(cache)
  kw = dict(scale=d**-0.5, is_causal=True, query_offset=t - tq)
  vs_dequant = relative_error(out, exact_reference(q, kd, vd, **kw))
  exact = exact_reference(q, k, v, **kw)
  vs_exact = relative_error(out, exact)
  cache_alone = relative_error(exact_reference(q, kd, vd, **kw), exact)
  print(f"{name}: vs dequantized cache {vs_dequant:.3e}; vs exact {vs_exact:.3e}; "
        f"cache quantization alone {cache_alone:.3e}; ratio {vs_exact / cache_alone:.3f}")
  assert vs_dequant <= 3e-2
  assert vs_exact <= 1.25 * cache_alone


@pytest.mark.parametrize("config", [turbojax.TurboConfig(), MIXED], ids=["int4", "mixed"])
def test_token_by_token_equals_one_shot(config):
  """Each query token alone == all of them at once over the same cache state.

  All 5 new tokens sit in one residual window (positions 130..134, group 64),
  so the cache holds each token in the same form at every step: a token's
  representation only changes (INT8 -> INT4) when its group fills.
  """
  b, hq, hk, d = 2, 4, 2, 64
  q, k, v = random_qkv(2, b, 5, 135, hq, hk, d)
  cache = update(turbojax.QuantizedKVCache.init(b, 256, hk, d, config), k[:, :130], v[:, :130])
  step = jax.jit(lambda c, q, k, v: (lambda c: (c, turbojax.decode_attention(q, c)))(
      c.update(k, v)))
  outs = []
  for i in range(5):
    cache, o = step(cache, q[:, i:i + 1], k[:, 130 + i:131 + i], v[:, 130 + i:131 + i])
    outs.append(o)
  one_shot = decode(q, cache)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(one_shot),
                             atol=1e-5, rtol=1e-5)


def test_ragged_batch_attends_to_own_length():
  b, hq, hk, d = 3, 4, 2, 64
  q, k, v = random_qkv(3, b, 1, 200, hq, hk, d)
  lengths = jnp.array([200, 70, 129])
  cache = update(turbojax.QuantizedKVCache.init(b, 256, hk, d), k, v, lengths)
  np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(lengths))
  out = decode(q, cache)
  for i in range(b):
    alone = update(turbojax.QuantizedKVCache.init(1, 256, hk, d), k[i:i + 1], v[i:i + 1],
                   lengths[i:i + 1])
    np.testing.assert_allclose(np.asarray(out[i:i + 1]), np.asarray(decode(q[i:i + 1], alone)),
                               atol=1e-5)
  kd, _ = cache.dequantize()
  assert np.all(np.asarray(kd)[1, 70:] == 0)


def test_overflow_raises_outside_jit_and_flags_inside():
  """Eagerly: a clear error. Under jit: tokens past capacity are dropped, the
  tokens that fit are stored exactly as an in-capacity update stores them,
  nothing earlier changes, and the sticky ``overflow`` flag is set."""
  _, k, v = random_qkv(4, 1, 1, 70, 1, 2, 64)
  cache = update(turbojax.QuantizedKVCache.init(1, 64, 2, 64), k[:, :60], v[:, :60])
  with pytest.raises(ValueError, match="cache overflow"):
    cache.update(k[:, 60:70], v[:, 60:70])
  after = update(cache, k[:, 60:70], v[:, 60:70])
  fitting = cache.update(k[:, 60:64], v[:, 60:64])
  assert bool(after.overflow[0]) and not bool(fitting.overflow[0])
  assert _leaves_equal(dataclasses.replace(after, overflow=fitting.overflow), fitting)
  again = update(after, k[:, :3], v[:, :3])  # a full cache: nothing changes but the flag
  assert _leaves_equal(again, after)


@pytest.mark.parametrize("bad, error, match", [
    (lambda c: c.update(jnp.zeros((1, 4, 3, 64)), jnp.zeros((1, 4, 3, 64))), ValueError,
     "kv_heads=2"),
    (lambda c: c.update(jnp.zeros((1, 4, 2, 64)), jnp.zeros((1, 4, 2, 64), jnp.bfloat16)),
     TypeError, "share a dtype"),
    (lambda c: c.update(jnp.zeros((1, 4, 2, 64), jnp.int32), jnp.zeros((1, 4, 2, 64), jnp.int32)),
     TypeError, "key must be float"),
    (lambda c: turbojax.decode_attention(jnp.zeros((1, 1, 3, 64)), c), ValueError,
     "multiple of the cache's kv heads"),
    (lambda c: turbojax.decode_attention(jnp.zeros((1, 1, 4, 32)), c), ValueError, "head_dim=64"),
    (lambda c: turbojax.decode_attention(jnp.zeros((1, 1, 4, 64)), "cache"), TypeError,
     "QuantizedKVCache"),
    (lambda c: turbojax.QuantizedKVCache.init(1, 64, 2, 64, turbojax.TurboConfig(int2_heads=3)),
     ValueError, "int2_heads"),
    (lambda c: turbojax.QuantizedKVCache.init(1, 0, 2, 64), ValueError, "max_len"),
])
def test_bad_cache_inputs(bad, error, match):
  cache = turbojax.QuantizedKVCache.init(1, 64, 2, 64)
  with pytest.raises(error, match=match):
    bad(cache)


def test_head_priority_puts_insensitive_heads_at_int2():
  _, k, v = random_qkv(5, 1, 1, 128, 1, 4, 64)
  k = k.at[:, :, 1].multiply(0.05).at[:, :, 3, :4].multiply(10.0)
  cache = update(
      turbojax.QuantizedKVCache.init(1, 128, 4, 64, turbojax.TurboConfig(int2_heads=2)), k, v)
  bits = np.asarray(cache.head_bits())
  assert bits[1] == 2 and bits[3] == 4 and sorted(bits.tolist()) == [2, 2, 4, 4]
  kd, _ = cache.dequantize()
  assert relative_error(kd[:, :, 3], k[:, :, 3]) < 0.2

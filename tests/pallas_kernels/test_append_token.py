"""The one-token cache update kernel (``pallas_kernels.gpu.append_token``).

Interpreted on CPU (CI) and compiled on the GPU (``-m gpu``), against its
pure-JAX reference on the same arrays, and, through ``QuantizedKVCache``,
against the library's XLA update (the same packed groups, bit for bit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compat
from pallas_kernels.gpu import append_token as at
from pallas_kernels.reference import PackedKV, ResidualKV
from turbojax import QuantizedKVCache, TurboConfig

G = 64


def random_arrays(seed: int, bits: int, *, batch=4, heads=2, head_dim=128, capacity=256):
  """Random packed arrays, window and new token of one bit width (drawn with
  NumPy: eager ``jax.random`` compiled each draw and took several times the
  kernel's own time)."""
  rng = np.random.default_rng(seed)
  width = head_dim * bits // 8
  n_v = head_dim // min(G, head_dim)

  def ints(shape, lo, hi, dtype):
    return jnp.asarray(rng.integers(lo, hi, shape), dtype)

  def scales(shape):
    return jnp.asarray(rng.uniform(0.01, 1.0, shape), jnp.bfloat16)

  b, h, t = batch, heads, capacity
  packed = PackedKV(
      ints((b, h, t, width), 0, 256, jnp.uint8), ints((b, h, t // G, head_dim), 1, 20, jnp.uint8),
      ints((b, h, t // G, head_dim), -8, 8, jnp.int8), scales((b, h, t)),
      ints((b, h, t, width), 0, 256, jnp.uint8), ints((b, h, t, n_v), 1, 20, jnp.uint8),
      ints((b, h, t, n_v), -8, 8, jnp.int8), scales((b, h, t)))
  window = ResidualKV(ints((b, h, G, head_dim), -127, 128, jnp.int8), scales((b, h, G)),
                      ints((b, h, G, head_dim), -127, 128, jnp.int8), scales((b, h, G)))
  token = ResidualKV(ints((b, h, 1, head_dim), -127, 128, jnp.int8), scales((b, h, 1)),
                     ints((b, h, 1, head_dim), -127, 128, jnp.int8), scales((b, h, 1)))
  return packed, window, token


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)),
                                  np.asarray(y.astype(jnp.float32)))


# Slot 0 (new window), a middle slot, the last slot (packs), a dropped token.
CASES = [(jnp.array([0, 10, 63, 127]), jnp.array([1, 1, 1, 1])),
         (jnp.array([64, 191, 255, 100]), jnp.array([1, 1, 0, 1]))]


class TestAppendTokenInterpret:
  INTERPRET = True

  @pytest.mark.parametrize("bits,head_dim", [(4, 128), (2, 128), (4, 64)])
  @pytest.mark.parametrize("case", range(len(CASES)))
  def test_matches_reference(self, bits, head_dim, case):
    packed, window, token = random_arrays(bits + head_dim + case, bits, head_dim=head_dim)
    lengths, kept = CASES[case]
    out = at.append_token(packed, window, token, lengths, kept, bits=bits, group=G,
                          interpret=self.INTERPRET)
    ref = jax.jit(at.append_token_reference, static_argnames=("bits", "group"))(
        packed, window, token, lengths, kept, bits=bits, group=G)
    assert_trees_equal(out, ref)
    # Only the sequence whose last slot was filled changes its packed arrays.
    packs = np.asarray((lengths % G == G - 1) & (kept > 0))
    for before, after in zip(packed, out[0]):
      changed = np.any(np.asarray(before != after).reshape(before.shape[0], -1), axis=1)
      assert not np.any(changed & ~packs)


@pytest.mark.gpu
class TestAppendToken(TestAppendTokenInterpret):
  INTERPRET = False


def _stream(config: TurboConfig, steps: int):
  """A cache with ragged prefills, then ``steps`` one-token updates (jitted,
  donated). The tokens are integers with absmax 127, so stage 1 is exact on
  every platform (XLA:GPU's division is not IEEE at ties) and stage 2, integer
  only, decides the comparison."""
  b, hk, d = 3, 4, 128
  keys = iter(jax.random.split(jax.random.PRNGKey(7), 2 * steps + 2))

  def tokens(n):
    x = jax.random.randint(next(keys), (b, n, hk, d), -126, 127).astype(jnp.float32)
    return x.at[..., 0].set(127.0)

  cache = QuantizedKVCache.init(b, 256, hk, d, config)
  cache = cache.update(tokens(64), tokens(64), new_lengths=jnp.array([60, 50, 63]))
  step = jax.jit(lambda c, k, v: c.update(k, v), donate_argnums=0)
  for _ in range(steps):
    cache = step(cache, tokens(1), tokens(1))
  return cache


@pytest.mark.parametrize("int2_heads", [0, 2])
def test_cache_kernel_path_equals_xla_path(int2_heads):
  """16 decoding steps: each sequence packs its window at a different step."""
  xla = _stream(TurboConfig(int2_heads=int2_heads), 16)
  kernel = _stream(TurboConfig(int2_heads=int2_heads, interpret=True), 16)
  assert_trees_equal(xla.segments, kernel.segments)
  assert_trees_equal(xla.dequantize(), kernel.dequantize())
  np.testing.assert_array_equal(np.asarray(xla.lengths), [76, 66, 79])


@pytest.mark.gpu
def test_cache_update_on_gpu_equals_cpu():
  """On the GPU a one-token update runs the kernel; on the CPU, XLA's cond."""
  config = TurboConfig(int2_heads=2, smooth_k=False)  # (a mean is not exact)
  gpu = _stream(config, 16)
  with jax.default_device(jax.devices("cpu")[0]):
    cpu = _stream(config, 16)
  assert_trees_equal(gpu.segments, cpu.segments)
  assert_trees_equal(gpu.dequantize(), cpu.dequantize())


@pytest.mark.parametrize("bits", [4, 2])
def test_lowers_for_cuda(bits):
  packed, window, token = random_arrays(0, bits)
  f = jax.jit(lambda p, w, t, n, k: at.append_token(p, w, t, n, k, bits=bits, group=G))
  exported = jax.export.export(
      f, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
          compat.TRITON_CUSTOM_CALL_TARGET)])(packed, window, token, CASES[0][0], CASES[0][1])
  assert compat.TRITON_CUSTOM_CALL_TARGET in exported.mlir_module()


def test_cache_step_has_no_conditional_on_cuda():
  """The cache's one-token update lowers for CUDA to the kernel, without XLA's cond."""
  cache = QuantizedKVCache.init(2, 128, 4, 128, TurboConfig(int2_heads=2))
  x = jnp.zeros((2, 1, 4, 128), jnp.bfloat16)
  exported = jax.export.export(
      jax.jit(lambda c, k, v: c.update(k, v)), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
          compat.TRITON_CUSTOM_CALL_TARGET)])(cache, x, x)
  text = exported.mlir_module()
  assert text.count(at.KERNEL_NAME) >= 2  # one call per bit width
  assert "stablehlo.scatter" not in text  # XLA's path writes the window with scatters


def test_rejects_mismatched_token():
  packed, window, token = random_arrays(0, 4)
  bad = ResidualKV(token.k[:, :, :, :64], token.k_scale, token.v, token.v_scale)
  with pytest.raises(ValueError, match="token K/V"):
    at.append_token(packed, window, bad, CASES[0][0], CASES[0][1], bits=4, group=G)

"""The Pallas backends through the public API, in interpret mode on CPU.

Same inputs through ``implementation="mosaic_tpu"``/``"triton"`` and ``"xla"``
(with the kernel's key tile, so the quantization is identical) agree.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import turbojax
from pallas_kernels.gpu import flashq_prefill as gpu_prefill
from pallas_kernels.tpu import flashq_prefill as tpu_prefill
from turbojax.testing import random_qkv, relative_error

# Jitted, as users run them: eager dispatch compiles every op of the
# quantization and reference paths on its own, and dominated these tests' time
# (eager calls through the API: test_api.py, test_attention.py).
attention = jax.jit(turbojax.dot_product_attention,
                    static_argnames=("is_causal", "config", "implementation"))
decode = jax.jit(turbojax.decode_attention, static_argnames=("implementation",))


def _kernel_blocks(impl, q, k):
  """``(block_q, block_k)``: the tiles the backend quantizes Q and K/V with."""
  if impl == "mosaic_tpu":
    bs = tpu_prefill.BlockSizes.get_default(
        head_dim=q.shape[-1], seq_len_q=q.shape[1], seq_len_k=k.shape[1],
        num_q_heads_per_kv_head=q.shape[2] // k.shape[2])
    return bs.block_q, bs.block_k
  bs = gpu_prefill.BlockSizes.get_default(
      head_dim=q.shape[-1], seq_len_q=q.shape[1], seq_len_k=k.shape[1])
  return turbojax.TurboConfig().block_q, bs.block_k  # Q in the config's blocks


@pytest.mark.parametrize("impl, bound, per_token_k", [
    ("mosaic_tpu", 1e-4, False), ("triton", 2e-3, False), ("triton", 2e-3, True)])
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_matches_xla(impl, bound, per_token_k, causal):
  """The triton backend runs exp2 instead of the SAS polynomial (its measured
  choice), so it matches to the polynomial's 1.4e-4 fit error and the P codes
  that flips: close, not equal. K's scales per block reach its kernel as one
  per key tile, per-token ones as they are."""
  q, k, v = random_qkv(0, 1, 100, 250, 8, 2, 64)
  block_q, block_k = _kernel_blocks(impl, q, k)
  config = turbojax.TurboConfig(interpret=True, sas_dtype="float32", block_q=block_q,
                                block_k=block_k, per_token_scales=per_token_k)
  lengths = np.array([201])
  kwargs = dict(is_causal=causal, key_value_seq_lengths=lengths, query_offset=150 * causal,
                config=config)
  out = attention(q, k, v, implementation=impl, **kwargs)
  ref = attention(q, k, v, implementation="xla", **kwargs)
  assert relative_error(out, ref) <= bound
  exact = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                       is_causal=False) if not causal else None
  if exact is not None:
    assert relative_error(out, exact) <= 2.5e-2


@functools.cache
def _decode_case(int2_heads):
  """Query, cache and the XLA decode of it: shared by both kernels' cases."""
  q, k, v = random_qkv(1, 2, 3, 150, 8, 2, 64)
  config = turbojax.TurboConfig(interpret=True, int2_heads=int2_heads)
  cache = jax.jit(lambda c, k, v: c.update(k, v))(
      turbojax.QuantizedKVCache.init(2, 192, 2, 64, config), k, v)
  return q, cache, decode(q, cache, implementation="xla")


@pytest.mark.parametrize("impl, bound", [("mosaic_tpu", 1e-5), ("triton", 1e-2)])
@pytest.mark.parametrize("int2_heads", [0, 1])
def test_decode_matches_xla(impl, bound, int2_heads):
  """TPU walks the tiles in order like the reference (equal); the GPU kernel splits
  the keys (flash-decoding), so its P tiles see a split-local max: close, not equal."""
  q, cache, ref = _decode_case(int2_heads)
  out = decode(q, cache, implementation=impl)
  assert relative_error(out, ref) <= bound


def test_unsupported_features_fall_back_to_xla():
  q, k, v = random_qkv(2, 1, 64, 64, 2, 2, 72)  # head_dim 72: no kernel
  config = turbojax.TurboConfig(interpret=True)
  with pytest.raises(NotImplementedError, match="head_dim=72"):
    turbojax.dot_product_attention(q, k, v, config=config, implementation="triton")
  with pytest.warns(UserWarning, match="falling back"):
    out = turbojax.dot_product_attention(q, k, v, config=config,
                                         implementation=["triton", "xla"])
  ref = turbojax.dot_product_attention(q, k, v, config=config, implementation="xla")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


@pytest.mark.parametrize("implementation, interpret", [
    ("triton", True), ("mosaic_tpu", True), pytest.param("triton", False, marks=pytest.mark.gpu),
    pytest.param("mosaic_gpu", False, marks=pytest.mark.gpu)])
def test_prefill_propagates_nan_rows(implementation, interpret):
  """Non-finite inputs reach exactly their rows, as on ``"xla"``: the
  quantization's scales carry them (the GPU pass's too: Triton's max drops
  NaN), and the kernels NaN the rows whose query scale the dispatch marked."""
  q, k, v = random_qkv(3, 1, 70, 70, 4, 2, 64)
  config = turbojax.TurboConfig(interpret=interpret)
  out = attention(q.at[0, 3, 0, 5].set(jnp.nan), k, v, implementation=implementation,
                  config=config)
  assert out.dtype == q.dtype
  bad_rows = np.isnan(np.asarray(out)).any(-1)[0]
  assert bad_rows[3, 0] and bad_rows.sum() == 1
  out = attention(q, k.at[0, 10, 1, 0].set(jnp.inf), v, implementation=implementation,
                  config=config)
  bad = np.isnan(np.asarray(out)).any(-1)[0]
  assert bad[:, 2:].all() and not bad[:, :2].any()  # query heads 2, 3 read KV head 1

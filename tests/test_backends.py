"""The Pallas backends through the public API, in interpret mode on CPU.

Same inputs through ``implementation="mosaic_tpu"``/``"triton"`` and ``"xla"``
(with the kernel's key tile, so the quantization is identical) agree.
"""

import jax
import numpy as np
import pytest

import turbojax
from pallas_kernels.gpu import flashq_prefill as gpu_prefill
from pallas_kernels.tpu import flashq_prefill as tpu_prefill
from turbojax.testing import random_qkv, relative_error


def _kernel_block_k(impl, q, k):
  if impl == "mosaic_tpu":
    return tpu_prefill.BlockSizes.get_default(
        head_dim=q.shape[-1], seq_len_q=q.shape[1], seq_len_k=k.shape[1],
        num_q_heads_per_kv_head=q.shape[2] // k.shape[2]).block_k
  return gpu_prefill.BlockSizes.get_default(
      head_dim=q.shape[-1], seq_len_q=q.shape[1], seq_len_k=k.shape[1]).block_k


@pytest.mark.parametrize("impl, bound", [("mosaic_tpu", 1e-4), ("triton", 2e-3)])
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_matches_xla(impl, bound, causal):
  """The triton backend runs exp2 instead of the SAS polynomial (its measured
  choice), so it matches to the polynomial's 1.4e-4 fit error and the P codes
  that flips: close, not equal."""
  q, k, v = random_qkv(0, 1, 100, 250, 8, 2, 64)
  config = turbojax.TurboConfig(interpret=True, sas_dtype="float32",
                                block_k=_kernel_block_k(impl, q, k))
  lengths = np.array([201])
  kwargs = dict(is_causal=causal, key_value_seq_lengths=lengths, query_offset=150 * causal,
                config=config)
  out = turbojax.dot_product_attention(q, k, v, implementation=impl, **kwargs)
  ref = turbojax.dot_product_attention(q, k, v, implementation="xla", **kwargs)
  assert relative_error(out, ref) <= bound
  exact = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                       is_causal=False) if not causal else None
  if exact is not None:
    assert relative_error(out, exact) <= 2.5e-2


@pytest.mark.parametrize("impl, bound", [("mosaic_tpu", 1e-5), ("triton", 1e-2)])
@pytest.mark.parametrize("int2_heads", [0, 1])
def test_decode_matches_xla(impl, bound, int2_heads):
  """TPU walks the tiles in order like the reference (equal); the GPU kernel splits
  the keys (flash-decoding), so its P tiles see a split-local max: close, not equal."""
  q, k, v = random_qkv(1, 2, 3, 150, 8, 2, 64)
  config = turbojax.TurboConfig(interpret=True, int2_heads=int2_heads)
  cache = turbojax.QuantizedKVCache.init(2, 192, 2, 64, config).update(k, v)
  out = turbojax.decode_attention(q, cache, implementation=impl)
  ref = turbojax.decode_attention(q, cache, implementation="xla")
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

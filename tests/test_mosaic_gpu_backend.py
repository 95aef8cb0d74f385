"""``implementation="mosaic_gpu"``: the Hopper prefill kernel behind the public API.

* CPU: the backend in the Mosaic GPU interpreter against ``"triton"`` (same
  quantization and exp2 exponent when the key tiles agree: equal to rounding)
  and against ``jax.nn.dot_product_attention`` (the design's 2.5e-2 bound);
  decode (the Triton decode kernel under either name); the default order per
  compute capability, with fake capabilities.
* GPU (``-m gpu``, Hopper): the compiled backend against ``"triton"`` and jax.nn.

The Mosaic GPU interpreter runs each warpgroup in a thread that blocks inside
XLA host callbacks; on a 2-core machine they can starve each other (a one-tile
call hangs), so each interpreted prefill case runs in a subprocess with
``NPROC=8`` set before JAX starts (as ``tests/pallas_kernels/test_mosaic_gpu_flashq.py``).
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import turbojax
from pallas_kernels.gpu import flashq_prefill as gpu_prefill
from pallas_kernels.mosaic_gpu import flashq_prefill as mf
from turbojax.attention import backends
from turbojax.attention.base import compute_capability, parse_compute_capability
from turbojax.testing import random_qkv, relative_error, run_json_script

pytestmark = pytest.mark.skipif("mosaic_gpu" not in backends.BACKENDS,
                                reason="this jax build lacks Pallas Mosaic GPU")

EXACT_BOUND = 2.5e-2  # the design's bound on unit-normal f32 inputs

# name -> (random_qkv args: seed, batch, q_len, kv_len, q_heads, kv_heads, head_dim; call).
# Key lengths off a multiple of 128 give the Mosaic kernel 64-key tiles, the
# Triton kernel's (untuned) tile, so both see the same quantized inputs; 256
# keys give it 128-key tiles (other V/P scales: a quantization-level difference).
# The interpreter takes ~2.5 s per CTA (query head x 128 query rows): keep few.
CASES = {
    "gqa_full_kvlen": ((0, 1, 64, 120, 4, 2, 64), dict(causal=False, kv_lengths=[90])),
    "gqa_causal_offset": ((1, 1, 64, 120, 2, 1, 64), dict(causal=True, query_offset=56)),
    "d128_tile128": ((2, 1, 128, 256, 2, 1, 128), dict(causal=False)),
    # Block scales: the Mosaic kernel takes one K scale per key tile.
    "gqa_causal_block_scales": ((1, 1, 64, 120, 2, 1, 64),
                                dict(causal=True, query_offset=56, per_token_scales=False)),
}


def _exact(q, k, v, *, causal=False, kv_lengths=None, query_offset=0):
  """jax.nn attention; causal with ``query_offset`` as a mask (it is top-left only)."""
  mask = None
  if causal:
    rows = jnp.arange(q.shape[1])[:, None] + query_offset
    mask = (jnp.arange(k.shape[1])[None, :] <= rows)[None, None]
  lengths = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, key_value_seq_lengths=lengths)


def run_case(name: str) -> dict:
  """``mosaic_gpu`` vs ``triton`` (interpreted) and vs jax.nn on one case."""
  args, call = CASES[name]
  q, k, v = random_qkv(*args)
  lengths = call.get("kv_lengths")
  kwargs = dict(is_causal=call["causal"], query_offset=call.get("query_offset", 0),
                key_value_seq_lengths=None if lengths is None else np.asarray(lengths),
                config=turbojax.TurboConfig(
                    interpret=True, per_token_scales=call.get("per_token_scales", True)))
  out = turbojax.dot_product_attention(q, k, v, implementation="mosaic_gpu", **kwargs)
  triton = turbojax.dot_product_attention(q, k, v, implementation="triton", **kwargs)
  exact = _exact(q, k, v, causal=call["causal"], kv_lengths=lengths,
                 query_offset=call.get("query_offset", 0))
  tiles = [m.BlockSizes.get_default(head_dim=q.shape[-1], seq_len_q=q.shape[1],
                                    seq_len_k=k.shape[1]).block_k for m in (mf, gpu_prefill)]
  assert out.shape == q.shape and np.all(np.isfinite(np.asarray(out)))
  return {"vs_triton": relative_error(out, triton), "vs_exact": relative_error(out, exact),
          "triton_vs_exact": relative_error(triton, exact), "same_tile": tiles[0] == tiles[1]}


_SCRIPT = """
import json, sys
sys.path[:0] = {paths!r}
import test_mosaic_gpu_backend as t
print("RESULT" + json.dumps(t.run_case({name!r})))
"""


def _run_interpreted(name: str) -> dict:
  here = os.path.dirname(os.path.abspath(__file__))
  script = _SCRIPT.format(paths=[here, os.path.dirname(here)], name=name)
  return run_json_script(script, tag="RESULT", timeout=300)


# --- interpreted on CPU ------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "gqa_causal_offset", "gqa_causal_block_scales",
    # The same kernel's interpreter cases also run in test_mosaic_gpu_flashq.py.
    pytest.param("gqa_full_kvlen", marks=pytest.mark.slow),
    pytest.param("d128_tile128", marks=pytest.mark.slow)])
def test_prefill_interpreted(name):
  errs = _run_interpreted(name)
  # Same inputs and exponent: equal up to f32 rounding (with one K scale per
  # tile, the rounding of the kernel's folded exponent, which moves a few of
  # P's INT8 codes); else both within the bound.
  per_token = CASES[name][1].get("per_token_scales", True)
  close = 1e-4 if per_token else 2e-3
  assert errs["vs_triton"] <= (close if errs["same_tile"] else EXACT_BOUND), errs
  assert errs["vs_exact"] <= EXACT_BOUND, errs


def test_decode_is_the_triton_kernel():
  """No Mosaic GPU decode kernel: ``"mosaic_gpu"`` decodes with Triton's."""
  q, k, v = random_qkv(3, 2, 3, 150, 4, 2, 64)
  config = turbojax.TurboConfig(interpret=True)
  cache = turbojax.QuantizedKVCache.init(2, 192, 2, 64, config).update(k, v)
  out = turbojax.decode_attention(q, cache, implementation="mosaic_gpu")
  ref = turbojax.decode_attention(q, cache, implementation="triton")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_unsupported_inputs_fail_fast():
  config = turbojax.TurboConfig(interpret=True)
  q, k, v = random_qkv(4, 1, 64, 64, 2, 2, 64)
  with pytest.raises(NotImplementedError, match="local_window"):
    turbojax.dot_product_attention(q, k, v, local_window_size=16, config=config,
                                   implementation="mosaic_gpu")
  q, k, v = random_qkv(4, 1, 64, 64, 2, 2, 72)
  with pytest.raises(NotImplementedError, match="head_dim=72"):
    turbojax.dot_product_attention(q, k, v, config=config, implementation="mosaic_gpu")


# --- the default order (fake compute capabilities) ---------------------------------


@pytest.mark.parametrize("capability, first", [
    ((9, 0), "mosaic_gpu"), ((10, 0), "mosaic_gpu"), ((12, 1), "mosaic_gpu"),
    ((8, 9), "triton"), ((8, 0), "triton"), (None, "triton")])
def test_default_order_on_gpu(capability, first):
  names = backends.default_order("gpu", capability)
  assert names[0] == first and names[-1] == "xla"
  assert names == backends.resolve(None, "gpu", capability)[0]
  assert ("mosaic_gpu" in names) == (first == "mosaic_gpu")


def test_default_order_elsewhere_has_no_mosaic_gpu():
  for platform in ("cpu", "tpu"):
    assert "mosaic_gpu" not in backends.default_order(platform, (9, 0))


def test_parse_compute_capability():
  assert parse_compute_capability("9.0") == (9, 0)
  assert parse_compute_capability("12.1") == (12, 1)
  assert parse_compute_capability("10.0a") == (10, 0)
  assert parse_compute_capability(None) is None
  assert parse_compute_capability("gfx90a") is None
  assert compute_capability("cpu") is None


def test_check_platform_needs_hopper():
  backend = backends.BACKENDS["mosaic_gpu"]
  compiled, interpreted = turbojax.TurboConfig(), turbojax.TurboConfig(interpret=True)
  backend.check_platform("gpu", compiled, (9, 0))
  backend.check_platform("gpu", interpreted, (8, 0))
  backend.check_platform("cpu", interpreted, None)
  for capability in ((8, 6), None):
    with pytest.raises(NotImplementedError, match=r"compute capability >= 9\.0"):
      backend.check_platform("gpu", compiled, capability)
  backends.BACKENDS["triton"].check_platform("gpu", compiled, (8, 0))


@pytest.fixture
def fake_gpu(monkeypatch):
  """``dispatch`` on a pretend GPU of the given compute capability."""
  def fake(capability):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(backends, "compute_capability", lambda platform: capability)
  return fake


@pytest.mark.parametrize("capability, chosen", [((9, 0), "mosaic_gpu"), ((8, 0), "triton")])
def test_dispatch_default_without_warnings(fake_gpu, capability, chosen):
  fake_gpu(capability)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # an expected skip must not warn
    assert backends.dispatch(None, turbojax.TurboConfig(), lambda name: name) == chosen


def test_dispatch_explicit_on_older_gpu(fake_gpu):
  fake_gpu((8, 0))
  config = turbojax.TurboConfig()
  with pytest.raises(NotImplementedError, match="compute capability"):
    backends.dispatch("mosaic_gpu", config, lambda name: name)
  with pytest.warns(UserWarning, match="falling back"):
    assert backends.dispatch(["mosaic_gpu", "triton"], config, lambda name: name) == "triton"


# --- compiled on a Hopper GPU ------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("per_token_scales", [True, False])
@pytest.mark.parametrize("seq", [1024, 1000])
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_matches_triton_and_exact(seq, causal, per_token_scales):
  """T1024: the Mosaic kernel's 128-key tiles quantize V and P differently from
  Triton's 64 (a quantization-level difference); T1000: both use 64-key tiles,
  the same algorithm unless the Mosaic defaults skip P's quantization. Block
  scales run the Mosaic kernel's one-K-scale-per-tile softmax."""
  capability = compute_capability(jax.default_backend())
  if capability is None or capability < (9, 0):
    pytest.skip("the Mosaic GPU kernel needs Hopper (sm_90) or newer")
  q, k, v = random_qkv(5, 2, seq, seq, 8, 8, 128)
  kwargs = dict(is_causal=causal, config=turbojax.TurboConfig(per_token_scales=per_token_scales))
  out = turbojax.dot_product_attention(q, k, v, implementation="mosaic_gpu", **kwargs)
  triton = turbojax.dot_product_attention(q, k, v, implementation="triton", **kwargs)
  exact = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  mosaic_sizes, triton_sizes = (
      m.BlockSizes.get_default(head_dim=128, seq_len_q=seq, seq_len_k=seq)
      for m in (mf, gpu_prefill))
  same = mosaic_sizes.block_k == triton_sizes.block_k and mosaic_sizes.quantize_p
  assert relative_error(out, triton) <= (2e-3 if same else EXACT_BOUND)
  assert relative_error(out, exact) <= EXACT_BOUND
  assert relative_error(triton, exact) <= EXACT_BOUND

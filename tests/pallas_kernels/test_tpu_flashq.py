"""Pallas Mosaic TPU FlashQ kernels: interpreter vs reference, and TPU lowering.

On CPU the kernels run in the Pallas TPU interpreter
(``pltpu.force_tpu_interpret_mode()``, the ``*Interpret`` classes) and must match
their pure-JAX references on the same quantized inputs; ``jax.export`` with
``platforms=["tpu"]`` lowers them through Mosaic without a TPU. The on-device
twins (marker ``tpu``) run the same checks compiled.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compat
from pallas_kernels import reference
from pallas_kernels.sas import LOG2_E, SASParams
from pallas_kernels.tpu import flashq_decode as decode_lib
from pallas_kernels.tpu import flashq_prefill as prefill_lib
from turbojax.testing import int8_per_token, int8_window, pack_cache

SAS_F32 = SASParams(dtype="float32")
SAS_BF16 = SASParams(dtype="bfloat16")
# Kernel vs reference on the same quantized inputs (design.md §4).
RTOL = {"float32": 1e-4, "bfloat16": 1e-2}


def _rel_err(out, ref):
  """Global ``|out - ref| / |ref|`` and the max over rows (of nonzero rows)."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  glob = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  num = np.linalg.norm(out - ref, axis=-1)
  den = np.linalg.norm(ref, axis=-1)
  rows = np.where(den > 0, num / np.where(den > 0, den, 1.0), num)
  return glob, rows.max()


# --- Quantized inputs ----------------------------------------------------------


_int8_per_token_jit = jax.jit(int8_per_token)


def _int8_per_token(x):
  """NumPy view of ``turbojax.testing.int8_per_token``: int32 codes, bf16 scales."""
  codes, scale = _int8_per_token_jit(jnp.asarray(x))
  return np.asarray(codes, np.int32), np.asarray(scale)


# Jitted: eagerly, quantizing each new cache shape cost as much as the kernel.
_pack_cache = jax.jit(pack_cache, static_argnames=("bits", "group"))
_int8_window = jax.jit(int8_window)


@functools.lru_cache(maxsize=None)
def make_cache(seed, batch, heads, capacity, head_dim, *, bits, group):
  """Random K/V quantized into ``PackedKV`` + a full ``ResidualKV`` window.

  Returns ``(packed, residual, (k8, v8))``, ``k8``/``v8`` the stage-1 codes.
  """
  rng = np.random.default_rng(seed)
  k, v = (jnp.asarray(rng.standard_normal((batch, heads, capacity, head_dim), np.float32))
          for _ in range(2))
  r_shape = (batch, heads, group, head_dim)
  residual = _int8_window(*(jnp.asarray(rng.standard_normal(r_shape, np.float32))
                            for _ in range(2)))
  return (_pack_cache(k, v, bits=bits, group=group), residual,
          (_int8_per_token(k)[0], _int8_per_token(v)[0]))


def make_prefill_inputs(seed, batch, hq, hk, tq, tk, head_dim, *, block_k):
  """Per-token INT8 Q/K, per-tile INT8 V; softmax scale and log2(e) in q_scale."""
  rng = np.random.default_rng(seed)
  q8, q_scale = _int8_per_token(rng.standard_normal((batch, hq, tq, head_dim), np.float32))
  k8, k_scale = _int8_per_token(rng.standard_normal((batch, hk, tk, head_dim), np.float32))
  v = rng.standard_normal((batch, hk, tk // block_k, block_k, head_dim), np.float32)
  v_scale = np.abs(v).max(axis=(-2, -1)) / 127.0
  v8 = np.clip(np.floor(v / v_scale[..., None, None] + 0.5), -127, 127)
  q_scale = q_scale.astype(np.float32) * np.float32(LOG2_E / math.sqrt(head_dim))
  return tuple(jnp.asarray(x) for x in (
      q8.astype(np.int8), q_scale, k8.astype(np.int8), k_scale.astype(np.float32),
      v8.reshape(batch, hk, tk, head_dim).astype(np.int8), v_scale.astype(np.float32)))


def _decode_query(seed, batch, heads, rows, head_dim):
  rng = np.random.default_rng(seed)
  q8, q_scale = _int8_per_token(rng.standard_normal((batch, heads, rows, head_dim), np.float32))
  q_scale = q_scale.astype(np.float32) * np.float32(LOG2_E / math.sqrt(head_dim))
  return jnp.asarray(q8.astype(np.int8)), jnp.asarray(q_scale)


def _jit(fn, **static):
  """``fn`` with its static keyword arguments bound, jitted end to end."""
  return jax.jit(functools.partial(fn, **static))


def test_cache_helper_round_trips_within_half_a_step():
  packed, _, (k8, v8) = make_cache(0, 1, 2, 128, 64, bits=4, group=64)
  k_back = np.asarray(reference.unpack_keys(packed, 4, 64), np.int32)
  v_back = np.asarray(reference.unpack_values(packed, 4, 64), np.int32)
  s2k = np.repeat(np.asarray(packed.k_scale2, np.int32), 64, axis=2)
  s2v = np.repeat(np.asarray(packed.v_scale2, np.int32), 64, axis=3)
  assert np.all(np.abs(k_back - k8) <= (s2k + 1) // 2)
  assert np.all(np.abs(v_back - v8) <= (s2v + 1) // 2)


# --- Block sizes --------------------------------------------------------------


def test_block_sizes_validate_and_default():
  with pytest.raises(ValueError, match="block_q"):
    prefill_lib.BlockSizes(block_q=48)
  with pytest.raises(ValueError, match="block_k"):
    prefill_lib.BlockSizes(block_k=64)
  with pytest.raises(ValueError, match="block_k"):
    decode_lib.BlockSizes(block_k=48)
  # Callable by the dispatcher before quantizing (block_k = V-scale tile).
  bs = prefill_lib.BlockSizes.get_default(head_dim=128, seq_len_q=123, seq_len_k=250)
  assert bs.block_q == 128 and bs.block_k == 128
  bs = prefill_lib.BlockSizes.get_default(head_dim=64, seq_len_q=4096, seq_len_k=4096,
                                          num_q_heads_per_kv_head=4)
  assert bs.block_q * 4 <= prefill_lib.DEFAULT_ROWS and bs.block_q % 32 == 0
  assert decode_lib.BlockSizes.get_default(seq_len_k=8192, group=64).block_k == 2048
  assert decode_lib.BlockSizes.get_default(seq_len_k=192, group=64).block_k == 192


def test_prefill_rejects_mismatched_v_scale_tile():
  q, qs, k, ks, v, vs = make_prefill_inputs(0, 1, 1, 1, 32, 256, 64,
                                            block_k=128)
  with pytest.raises(ValueError, match="one per key tile"):
    prefill_lib.flashq_prefill(q, qs, k, ks, v, vs, sas=SAS_F32,
                               block_sizes=prefill_lib.BlockSizes(block_q=32, block_k=256))


def test_base_e_sas_is_refused_with_a_clear_error():
  q, qs, k, ks, v, vs = make_prefill_inputs(0, 1, 1, 1, 32, 128, 64,
                                            block_k=128)
  with pytest.raises(NotImplementedError, match="base-2"):
    prefill_lib.flashq_prefill(q, qs, k, ks, v, vs, sas=SASParams(base=math.e, threshold=8.0))


# --- Kernels vs references ------------------------------------------------------


class FlashQTpuBase:
  """Kernel vs reference checks, run compiled (TPU) or in the TPU interpreter."""

  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _mode(self):
    ctx = compat.force_tpu_interpret_mode() if self.INTERPRET else contextlib.nullcontext()
    with ctx:
      yield

  @pytest.mark.parametrize(
      "causal,head_dim,sas,extra",
      [
          (False, 64, SAS_F32, {}),
          (True, 128, SAS_F32, {}),
          (True, 64, SAS_BF16, {"query_offset": 37}),
          (False, 128, SAS_BF16, {"local_window": (20, 20), "query_offset": 100}),
          (False, 64, SAS_F32, {"local_window": (200, 200), "query_offset": 100,
                                "q_lengths": [128, 77]}),
          (True, 64, SASParams(exact=True), {"query_offset": np.array([0, 100], np.int32)}),
      ],
      ids=["noncausal_d64_f32", "causal_d128_f32", "causal_d64_bf16_offset",
           "window_d128_bf16", "wide_window_d64_f32", "causal_d64_exact_offsets"])
  def test_prefill_matches_reference(self, causal, head_dim, sas, extra):
    # GQA 4:1; Tq = 123 padded to 128 and kv length 250 padded to 256.
    b, hq, hk, tq, tk, block_k = 2, 4, 1, 128, 256, 128
    inputs = make_prefill_inputs(1, b, hq, hk, tq, tk, head_dim, block_k=block_k)
    static = dict(sas=sas, causal=causal, local_window=extra.get("local_window"),
                  block_sizes=prefill_lib.BlockSizes(block_q=64, block_k=block_k),
                  return_residuals=True)
    dynamic = dict(query_offset=extra.get("query_offset", 0),
                   q_lengths=jnp.array(extra.get("q_lengths", [123, 77]), jnp.int32),
                   kv_lengths=jnp.array([250, 256], jnp.int32))
    out, (m, l) = _jit(prefill_lib.flashq_prefill, **static)(*inputs, **dynamic)
    ref, (m_ref, l_ref) = _jit(prefill_lib.flashq_prefill_reference, **static)(
        *inputs, **dynamic)
    assert out.shape == (b, hq, tq, head_dim) and out.dtype == jnp.float32
    glob, row = _rel_err(out, ref)
    tol = 1e-4 if sas.exact else RTOL[sas.dtype]
    assert glob <= tol and row <= 10 * tol, (glob, row)
    # Query rows past q_lengths are exactly zero, as in the reference.
    assert np.all(np.asarray(out)[1, :, 77:] == 0.0)
    np.testing.assert_allclose(m, m_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(l, l_ref, rtol=tol, atol=tol)

  def test_prefill_explicit_interpret_flag_and_mha(self):
    # MHA (Hq == Hk), default block sizes, ``interpret`` passed explicitly.
    inputs = make_prefill_inputs(2, 1, 2, 2, 64, 128, 64, block_k=128)
    out = _jit(prefill_lib.flashq_prefill, sas=SAS_F32, causal=True,
               interpret=self.INTERPRET)(*inputs)
    ref = _jit(prefill_lib.flashq_prefill_reference, sas=SAS_F32, causal=True)(*inputs)
    assert _rel_err(out, ref)[0] <= 1e-4

  @pytest.mark.parametrize(
      "bits,head_dim,sas,block_k,group",
      [(4, 128, SAS_F32, 128, 64), (2, 128, SAS_F32, 64, 64), (4, 64, SAS_F32, 256, 64),
       (2, 64, SAS_BF16, 128, 64), (4, 128, SAS_F32, 64, 32)],
      ids=["int4_d128_f32", "int2_d128_f32", "int4_d64_f32", "int2_d64_bf16",
           "int4_d128_g32_f32"])
  def test_decode_matches_reference(self, bits, head_dim, sas, block_k, group):
    # V has D / min(G, D) channel groups: 1 (d64), 2 (d128) or 4 (d128, G 32).
    # 3 sequences, G 64 (G 32): 2 (5) packed groups + 42 (10) residual tokens
    # (170); the packed area full + 10 residual tokens (266); no packed group
    # (1) + 40 (8) residual tokens (40).
    b, h, capacity = 3, 1, 256
    gqa, new_tokens = 4, 2
    packed, residual, _ = make_cache(3, b, h, capacity, head_dim, bits=bits, group=group)
    lengths = jnp.array([170, 266, 40], jnp.int32)
    m = gqa * new_tokens
    q, q_scale = _decode_query(4, b, h, m, head_dim)
    tok_pos = lengths[:, None] - new_tokens + jnp.arange(new_tokens)[None, :]
    q_pos = jnp.tile(tok_pos, (1, gqa))  # rows = (query head, new token)
    static = dict(bits=bits, group=group, sas=sas, return_residuals=True,
                  block_sizes=decode_lib.BlockSizes(block_k=block_k))
    args = (q, q_scale, q_pos, packed, residual, lengths)
    out, (m_out, l_out) = _jit(decode_lib.flashq_decode, **static)(*args)
    ref, (m_ref, l_ref) = _jit(decode_lib.flashq_decode_reference, **static)(*args)
    assert out.shape == (b, h, m, head_dim) and out.dtype == jnp.float32
    glob, row = _rel_err(out, ref)
    # The interpreter runs the reference's own tile functions: only the order
    # of float sums differs. Compiled, Mosaic may round a P code differently.
    tol = 1e-6 if self.INTERPRET else RTOL[sas.dtype]
    assert glob <= tol and row <= 10 * tol, (glob, row)
    np.testing.assert_allclose(m_out, m_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(l_out, l_ref, rtol=tol, atol=tol)


@pytest.mark.tpu
class TestFlashQTpu(FlashQTpuBase):
  INTERPRET = False


class TestFlashQTpuInterpret(FlashQTpuBase):
  INTERPRET = True


# --- Lowering through Mosaic (no TPU needed) -------------------------------------


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def _assert_lowers_to_mosaic(fn, *args):
  exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
  text = exported.mlir_module()
  assert "tpu_custom_call" in text, "no Mosaic kernel in the exported module"


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    "block_sizes,causal",
    [(prefill_lib.BlockSizes(block_q=128, block_k=128), True),
     (prefill_lib.BlockSizes(block_q=64, block_k=256), False)],
    ids=["bq128_bk128_causal", "bq64_bk256"])
def test_prefill_lowers_for_tpu(head_dim, block_sizes, causal):
  b, hq, hk, tq, tk = 2, 8, 2, 256, 512
  fn = functools.partial(prefill_lib.flashq_prefill, sas=SAS_BF16, causal=causal,
                         block_sizes=block_sizes, local_window=None if causal else (128, 0),
                         return_residuals=not causal)

  def run(q, qs, k, ks, v, vs, off, q_len, kv_len):
    return fn(q, qs, k, ks, v, vs, query_offset=off, q_lengths=q_len, kv_lengths=kv_len)

  nk = tk // block_sizes.block_k
  _assert_lowers_to_mosaic(
      run, _sds((b, hq, tq, head_dim), jnp.int8), _sds((b, hq, tq), jnp.float32),
      _sds((b, hk, tk, head_dim), jnp.int8), _sds((b, hk, tk), jnp.float32),
      _sds((b, hk, tk, head_dim), jnp.int8), _sds((b, hk, nk), jnp.float32),
      _sds((b,), jnp.int32), _sds((b,), jnp.int32), _sds((b,), jnp.int32))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("block_k", [64, 2048], ids=["bk64", "bk2048"])
def test_decode_lowers_for_tpu(head_dim, bits, block_k):
  b, h, t, group, m = 4, 8, 4096, 64, 4
  packed, residual = reference.cache_specs(b, h, t, head_dim, bits=bits, group=group)
  fn = functools.partial(decode_lib.flashq_decode, bits=bits, group=group, sas=SAS_BF16,
                         block_sizes=decode_lib.BlockSizes(block_k=block_k),
                         return_residuals=block_k == 64)
  _assert_lowers_to_mosaic(
      fn, _sds((b, h, m, head_dim), jnp.int8), _sds((b, h, m), jnp.float32),
      _sds((b, m), jnp.int32), packed, residual, _sds((b,), jnp.int32))


# --- Full Mosaic compilation without a TPU (deviceless AOT, needs libtpu) ----------
# ``jax.export`` above checks the Pallas -> Mosaic lowering; compiling for a
# compile-only TPU topology also runs Mosaic's layout passes and XLA TPU, which
# is where unsupported shapes, relayouts and alignment errors surface. Needs the
# ``libtpu`` package (``pip install jax[tpu]``, or ``pip install --target DIR
# libtpu`` and ``PYTHONPATH=DIR``); skipped without it.


@functools.lru_cache(maxsize=None)
def _tpu_topology_device(name):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return topologies.get_topology_desc(name, platform="tpu").devices[0]


def _assert_compiles_for(topology, fn, *shapes):
  pytest.importorskip("libtpu")
  device = _tpu_topology_device(topology)
  sharding = jax.sharding.SingleDeviceSharding(device)
  args = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      shapes)
  jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).compile()


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_compiles_for_tpu(topology, head_dim):
  b, hq, hk, tq, tk = 2, 8, 2, 256, 512
  fn = functools.partial(prefill_lib.flashq_prefill, sas=SAS_BF16, causal=True,
                         block_sizes=prefill_lib.BlockSizes(block_q=64, block_k=128),
                         return_residuals=True)
  _assert_compiles_for(
      topology, fn, _sds((b, hq, tq, head_dim), jnp.int8), _sds((b, hq, tq), jnp.float32),
      _sds((b, hk, tk, head_dim), jnp.int8), _sds((b, hk, tk), jnp.float32),
      _sds((b, hk, tk, head_dim), jnp.int8), _sds((b, hk, tk // 128), jnp.float32))


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize(
    "head_dim,bits",
    [(128, 4), (128, 2),
     pytest.param(64, 4, marks=pytest.mark.slow),  # 15-40 s of XLA/Mosaic compile
     pytest.param(64, 2, marks=pytest.mark.slow)])
def test_decode_compiles_for_tpu(topology, head_dim, bits):
  b, h, t, group, m = 4, 8, 4096, 64, 4
  packed, residual = reference.cache_specs(b, h, t, head_dim, bits=bits, group=group)
  fn = functools.partial(decode_lib.flashq_decode, bits=bits, group=group, sas=SAS_BF16,
                         block_sizes=decode_lib.BlockSizes(block_k=2048), return_residuals=True)
  _assert_compiles_for(
      topology, fn, _sds((b, h, m, head_dim), jnp.int8), _sds((b, h, m), jnp.float32),
      _sds((b, m), jnp.int32), packed, residual, _sds((b,), jnp.int32))

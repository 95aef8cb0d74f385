"""Pallas Triton FlashQ kernels vs their references on the same quantized inputs.

Each test class has an ``INTERPRET`` attribute: ``Test*Interpret`` runs the
kernels in interpret mode (CPU, CI); its twin ``Test*`` is marked ``gpu`` and
runs them compiled (skipped without a CUDA GPU). Lowering tests export the
kernels for CUDA with ``jax.export`` on any machine.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compat
from pallas_kernels import reference, tuned_block_sizes
from pallas_kernels.gpu import flashq_decode as fd
from pallas_kernels.gpu import flashq_prefill as fp
from pallas_kernels.gpu import quantize as qz
from pallas_kernels.reference import ResidualKV
from pallas_kernels.sas import SASParams
from turbojax.testing import int8_window, pack_cache

_ON_GPU = jax.default_backend() == "gpu"


def seed_of(name: str) -> int:
  return zlib.crc32(name.encode()) % 1000


class _KernelTest:
  """Base of the kernel tests: compiled on a GPU, or interpreted anywhere."""

  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _needs_gpu_unless_interpreted(self):
    if not self.INTERPRET and not _ON_GPU:
      pytest.skip("compiled Triton kernels need a CUDA GPU")

SAS_F32 = SASParams(dtype="float32")
SAS_BF16 = SASParams()
SAS_EXACT = SASParams(exact=True)


def relerr(out, ref):
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  assert np.all(np.isfinite(out)), "kernel output has NaN/inf"
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def tolerance(sas: SASParams) -> float:
  return 1e-2 if sas.dtype in ("bfloat16", "float16") and not sas.exact else 1e-4


# --- inputs ----------------------------------------------------------------------


def prefill_inputs(seed, *, b, hq, hk, tq, tk, d, block_k, logit_scale=3.0):
  """Random INT8 prefill inputs; logits of a few units (peaky and diffuse rows)."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.integers(-127, 128, (b, hq, tq, d)), jnp.int8)
  k = jnp.asarray(rng.integers(-127, 128, (b, hk, tk, d)), jnp.int8)
  v_t = jnp.asarray(rng.integers(-127, 128, (b, hk, d, tk)), jnp.int8)
  unit = logit_scale / (127.0 * 127.0 * np.sqrt(d) / np.sqrt(3.0) ** 2)
  q_scale = jnp.asarray(rng.uniform(0.5, 1.5, (b, hq, tq)) * unit, jnp.float32)
  k_scale = jnp.asarray(rng.uniform(0.5, 1.5, (b, hk, tk)), jnp.float32)
  v_scale = jnp.asarray(rng.uniform(0.5, 1.5, (b, hk, tk // block_k)) / 127, jnp.float32)
  return q, q_scale, k, k_scale, v_t, v_scale


# Jitted: eagerly, quantizing each new cache shape cost more than the kernel.
_pack_cache = jax.jit(pack_cache, static_argnames=("bits", "group"))
_int8_window = jax.jit(int8_window)


@functools.cache
def make_cache(seed, *, b, h, t, d, bits, group, zero_empty_residual=False,
               lengths=None):
  """A progressive INT4/INT2 cache of random keys/values (K grouped along
  tokens per channel, V along channels per token) and an INT8 residual."""
  rng = np.random.default_rng(seed)
  normal = lambda n: jnp.asarray(rng.normal(size=(b, h, n, d)), jnp.float32)  # noqa: E731
  packed = _pack_cache(normal(t), normal(t), bits=bits, group=group)
  rk, rk_scale, rv, rv_scale = _int8_window(normal(group), normal(group))
  if zero_empty_residual:  # unfilled ring slots: zero codes and zero scales
    filled = (jnp.arange(group)[None, :] < (jnp.asarray(lengths) % group)[:, None])
    filled = filled[:, None, :]
    rk = jnp.where(filled[..., None], rk, 0)
    rv = jnp.where(filled[..., None], rv, 0)
    rk_scale = jnp.where(filled, rk_scale, 0).astype(jnp.bfloat16)
    rv_scale = jnp.where(filled, rv_scale, 0).astype(jnp.bfloat16)
  return packed, ResidualKV(rk, rk_scale, rv, rv_scale)


def decode_query(seed, *, b, h, m, d, lengths, tokens=1):
  rng = np.random.default_rng(seed + 1000)
  q = jnp.asarray(rng.integers(-127, 128, (b, h, m, d)), jnp.int8)
  q_scale = jnp.asarray(rng.uniform(0.5, 1.5, (b, h, m)) * 4.0 / (127 * 127 * np.sqrt(d) / 3),
                        jnp.float32)
  lengths = jnp.asarray(lengths, jnp.int32)
  # rows = GQA heads x new tokens; token i of the last `tokens` is at length-tokens+i.
  tok = jnp.arange(m) % tokens
  q_pos = (lengths[:, None] - tokens + tok[None, :]).astype(jnp.int32)
  return q, q_scale, q_pos, lengths


# --- prefill -----------------------------------------------------------------------

PREFILL_CASES = {
    # name: (shape kwargs, call kwargs, block sizes, sas)
    "noncausal_mha_d64": (
        dict(b=2, hq=2, hk=2, tq=128, tk=256, d=64), dict(causal=False),
        fp.BlockSizes(block_q=64, block_k=64, num_warps=4), SAS_F32),
    "causal_gqa4_d64": (
        dict(b=1, hq=4, hk=1, tq=256, tk=256, d=64), dict(causal=True),
        fp.BlockSizes(block_q=64, block_k=64, num_warps=4), SAS_F32),
    "causal_gqa4_lengths_123_250": (
        dict(b=2, hq=4, hk=1, tq=128, tk=256, d=64),
        dict(causal=True, q_lengths=(123, 64), kv_lengths=(250, 200), query_offset=(127, 3)),
        fp.BlockSizes(block_q=32, block_k=64, num_warps=4), SAS_F32),
    "window_kvlen_d128": (
        dict(b=1, hq=2, hk=2, tq=128, tk=256, d=128),
        dict(causal=False, kv_lengths=(250,), local_window=(40, 20)),
        fp.BlockSizes(block_q=32, block_k=32, num_warps=4), SAS_F32),
    "causal_d128_bf16_sas": (
        dict(b=1, hq=2, hk=1, tq=128, tk=128, d=128), dict(causal=True),
        fp.BlockSizes(block_q=64, block_k=64, num_warps=4), SAS_BF16),
    "noncausal_d128_exact_exp": (
        dict(b=1, hq=2, hk=1, tq=128, tk=128, d=128), dict(causal=False),
        fp.BlockSizes(block_q=64, block_k=64, num_warps=4), SAS_EXACT),
    "causal_gqa_lengths_hardware_conversions": (
        dict(b=2, hq=4, hk=2, tq=128, tk=256, d=64),
        dict(causal=True, kv_lengths=(250, 0), query_offset=(128, 0)),
        fp.BlockSizes(block_q=64, block_k=64, num_warps=4, convert="cvt"), SAS_F32),
    "tile_k_scale_exact_nearest_even_causal_kvlen": (
        dict(b=2, hq=4, hk=2, tq=192, tk=256, d=128),
        dict(causal=True, kv_lengths=(256, 100), k_scale_per_tile=True),
        fp.BlockSizes(block_q=64, block_k=64, num_warps=4, p_rounding="nearest_even"),
        SAS_EXACT),
    "bf16_pv_tile_k_exact_causal_gqa_lengths": (
        dict(b=2, hq=4, hk=2, tq=128, tk=256, d=128),
        dict(causal=True, kv_lengths=(256, 0), q_lengths=(128, 100), k_scale_per_tile=True),
        fp.BlockSizes(block_q=64, block_k=64, num_warps=4, p_rounding="nearest_even",
                      pv_dtype="bfloat16"), SAS_EXACT),
    "bf16_pv_per_token_k_f32_sas_d64": (
        dict(b=1, hq=2, hk=1, tq=128, tk=256, d=64), dict(causal=False),
        fp.BlockSizes(block_q=32, block_k=64, num_warps=4, pv_dtype="bfloat16"), SAS_F32),
    "tile_k_scale_bf16_sas_window": (
        dict(b=1, hq=2, hk=1, tq=128, tk=256, d=64),
        dict(causal=False, local_window=(40, 20), k_scale_per_tile=True),
        fp.BlockSizes(block_q=32, block_k=32, num_warps=4), SAS_BF16),
}


def _prefill_call_kwargs(kw):
  kw = dict(kw)
  for name in ("q_lengths", "kv_lengths", "query_offset"):
    if isinstance(kw.get(name), tuple):
      kw[name] = jnp.asarray(kw[name], jnp.int32)
  return kw


class _PrefillTests(_KernelTest):

  @pytest.mark.parametrize("name", sorted(PREFILL_CASES))
  def test_matches_reference(self, name):
    shape, kw, block_sizes, sas = PREFILL_CASES[name]
    args = prefill_inputs(seed_of(name), block_k=block_sizes.block_k, **shape)
    kw = _prefill_call_kwargs(kw)
    tol = tolerance(sas)
    if kw.pop("k_scale_per_tile", False):  # one K scale per key tile: [B, Hk, Tk // block_k]
      args = args[:3] + (args[3][..., ::block_sizes.block_k],) + args[4:]
      # The folded exponent's row constant rounds at |c * 1.5 * 2**23| (~c / 2 absolute
      # in the exponent), which flips a few of P's roundings.
      tol = max(tol, 1e-3)
    out, (m, l) = fp.flashq_prefill(*args, sas=sas, block_sizes=block_sizes,
                                    interpret=self.INTERPRET, return_residuals=True, **kw)
    ref, (m_ref, l_ref) = fp.flashq_prefill_reference(
        *args, sas=sas, return_residuals=True, **kw)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert relerr(out, ref) <= tol, relerr(out, ref)
    np.testing.assert_allclose(m, m_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l, l_ref, rtol=10 * tol, atol=1e-6)

  def test_unaligned_tq_default_blocks_bthd_out(self):
    """Tq = 123 (not a block multiple), default blocks, [B, T, H, D] bf16 output."""
    args = prefill_inputs(7, b=1, hq=2, hk=2, tq=123, tk=128, d=64, block_k=64)
    kw = dict(sas=SAS_F32, causal=True, out_layout="bthd", out_dtype=jnp.bfloat16)
    out = fp.flashq_prefill(*args, interpret=self.INTERPRET, **kw)
    ref = fp.flashq_prefill_reference(*args, **kw)
    assert out.shape == (1, 123, 2, 64) and out.dtype == jnp.bfloat16
    assert relerr(out, ref) <= 1e-2


@pytest.mark.gpu
class TestPrefill(_PrefillTests):
  INTERPRET = False


class TestPrefillInterpret(_PrefillTests):
  INTERPRET = True


# --- quantize ----------------------------------------------------------------------

QUANT_CASES = {
    "bhtd_block_smooth": dict(layout="bhtd", k_per_token=False, smooth_k=True, kv_lengths=None),
    "bhtd_block_smooth_lengths": dict(layout="bhtd", k_per_token=False, smooth_k=True,
                                      kv_lengths=(123, 250)),
    "bthd_per_token_smooth_lengths": dict(layout="bthd", k_per_token=True, smooth_k=True,
                                          kv_lengths=(250, 123)),
    "bthd_block_plain": dict(layout="bthd", k_per_token=False, smooth_k=False, kv_lengths=None),
    "bthd_per_token_bf16_v_codes": dict(layout="bthd", k_per_token=True, smooth_k=True,
                                        kv_lengths=None, v_codes_dtype=jnp.bfloat16),
    "bthd_block_smooth_lengths_migrated": dict(layout="bthd", k_per_token=False, smooth_k=True,
                                               kv_lengths=(250, 123), channel_scale=True),
    "bhtd_block_plain_migrated": dict(layout="bhtd", k_per_token=False, smooth_k=False,
                                      kv_lengths=None, channel_scale=True),
}


def _float_qkv(seed, layout, *, b=2, hq=4, hk=2, tq=123, tk=250, d=64, dtype=jnp.bfloat16):
  rng = np.random.default_rng(seed)

  def shaped(h, t):
    return (b, h, t, d) if layout == "bhtd" else (b, t, h, d)

  q = jnp.asarray(rng.normal(size=shaped(hq, tq)), dtype)
  bias = np.zeros(d)
  bias[:4] = 6.0  # a few outlier channels, as real keys have
  k = jnp.asarray(rng.normal(size=shaped(hk, tk)) + bias, dtype)
  v = jnp.asarray(rng.normal(size=shaped(hk, tk)), dtype)
  return q, k, v


class _QuantizeTests(_KernelTest):

  @pytest.mark.parametrize("name", sorted(QUANT_CASES))
  def test_bit_exact(self, name):
    case = dict(QUANT_CASES[name])
    if case["kv_lengths"] is not None:
      case["kv_lengths"] = np.asarray(case["kv_lengths"], np.int32)
    q, k, v = _float_qkv(3, case["layout"])
    if case.pop("channel_scale", False):  # powers of two [B, Hk, D], Hk = 2
      case["channel_scale"] = jnp.asarray(
          2.0 ** np.random.default_rng(7).integers(-3, 4, size=(2, 2, 64)), jnp.float32)
    # The reference runs on the CPU: XLA:GPU's f32 division is not IEEE at exact
    # .5 ties of x / scale (measured on H100: 13 of 65536 codes flip), while the
    # compiled kernel divides with div.rn.f32. Both get the same K mean (a
    # reduction rounds differently on each backend).
    cpu = jax.devices("cpu")[0]
    q, k, v = jax.device_put((q, k, v), cpu)
    k_mean = qz.key_mean(k, case["kv_lengths"], layout=case["layout"])
    kw = dict(block_q=64, block_k=64, sm_scale=0.125, log2e_fold=True, k_mean=k_mean, **case)
    ref = qz.quantize_qkv_reference(q, k, v, **kw)
    dev = jax.devices()[0]
    kw = {n: jax.device_put(x, dev) if isinstance(x, jax.Array) else x for n, x in kw.items()}
    out = qz.quantize_qkv(*jax.device_put((q, k, v), dev), interpret=self.INTERPRET, **kw)
    for field, a, r in zip(out._fields, out, ref):
      assert a.shape == r.shape and a.dtype == r.dtype, field
      np.testing.assert_array_equal(np.asarray(a), np.asarray(r), err_msg=field)

  @pytest.mark.parametrize("layout, lengths, smooth, tokens", [
      ("bthd", (200, 0), True, 250), ("bhtd", None, True, 1536), ("bthd", None, False, 123)])
  def test_channel_stats(self, layout, lengths, smooth, tokens):
    """Mean and absmax about it over valid tokens: the maxima exactly, the sums
    in another order; keys past the lengths (NaN here) never count."""
    _, k, _ = _float_qkv(6, layout, tk=tokens, dtype=jnp.float32)
    k = k.at[..., 4:8].multiply(8)
    if lengths is not None:  # ("bthd" here)
      k = k.at[0, 200:].set(jnp.nan).at[1, 3:].set(jnp.nan)
      lengths = jnp.asarray(lengths, jnp.int32)
    mean, absmax = qz.channel_stats(k, lengths, smooth=smooth, layout=layout,
                                    interpret=self.INTERPRET)
    ref_mean, ref_absmax = qz.channel_stats_reference(k, lengths, smooth=smooth, layout=layout)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(absmax, ref_absmax, rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(absmax)) and np.any(absmax > 8)
    if lengths is not None:
      assert not np.any(absmax[1]) and not np.any(mean[1])  # no valid key: zeros

  def test_feeds_prefill(self):
    """quantize_qkv's output runs through the prefill kernel unchanged."""
    q, k, v = _float_qkv(4, "bhtd", tq=128, tk=128)
    qkv = qz.quantize_qkv(q, k, v, block_q=64, block_k=64, sm_scale=0.125,
                          log2e_fold=True, smooth_k=True, interpret=self.INTERPRET)
    bs = fp.BlockSizes(block_q=64, block_k=64, num_warps=4)
    out = fp.flashq_prefill(*qkv, sas=SAS_F32, causal=True, block_sizes=bs,
                            interpret=self.INTERPRET)
    ref = fp.flashq_prefill_reference(*qkv, sas=SAS_F32, causal=True)
    assert relerr(out, ref) <= 1e-4
    exact = jax.nn.dot_product_attention(
        *(jnp.swapaxes(x, 1, 2).astype(jnp.float32) for x in (q, jnp.repeat(k, 2, 1),
                                                                jnp.repeat(v, 2, 1))),
        is_causal=True, scale=0.125)
    assert relerr(out, jnp.swapaxes(exact, 1, 2)) <= 4e-2


@pytest.mark.gpu
class TestQuantize(_QuantizeTests):
  INTERPRET = False


class TestQuantizeInterpret(_QuantizeTests):
  INTERPRET = True

  def test_matches_library(self):
    """Same codes as turbojax's quantizer (up to rare exact ties, see notes)."""
    prepare = pytest.importorskip("turbojax.attention.prepare")
    config = pytest.importorskip("turbojax.config").TurboConfig()
    q, k, v = _float_qkv(5, "bthd")
    k = k.at[..., 4:8].multiply(8)  # channels with a large range (a bias is smoothed away)
    lengths = jnp.asarray([250, 123], jnp.int32)
    lib = prepare.quantize_for_prefill(
        q, k, v, config=config, block_q=64, block_k=64, softmax_scale=0.125,
        key_value_seq_lengths=lengths)
    k_mean, k_absmax = qz.channel_stats_reference(k, lengths, smooth=True, layout="bthd")
    _, q_absmax = qz.channel_stats_reference(q, smooth=False, layout="bthd")
    channel_scale = prepare.migration_scale(q_absmax, k_absmax)
    assert config.qk_migration and np.any(channel_scale != 1)  # K's biased channels move
    ours = qz.quantize_qkv(q, k, v, block_q=64, block_k=64, sm_scale=0.125,
                           log2e_fold=True, smooth_k=True, kv_lengths=lengths,
                           k_per_token=config.per_token_scales, layout="bthd",
                           k_mean=k_mean, channel_scale=channel_scale, interpret=True)
    pairs = [(ours.q, lib.q), (ours.k, lib.k), (jnp.swapaxes(ours.v_t, -1, -2), lib.v)]
    for a, r in pairs:
      diff = np.abs(np.asarray(a, np.int32) - np.asarray(r, np.int32))
      assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3
    np.testing.assert_allclose(ours.q_scale, lib.q_scale, rtol=1e-6)
    np.testing.assert_allclose(ours.k_scale, lib.k_scale, rtol=1e-5)
    np.testing.assert_allclose(ours.v_scale, lib.v_scale, rtol=1e-6)


# --- integer primitives (interpret-mode versions; the compiled PTX is checked
# end to end by the gpu-marked decode tests) ------------------------------------


def _random_words(seed, n=4096):
  return jnp.asarray(np.random.default_rng(seed).integers(
      -2**31, 2**31, size=n, dtype=np.int64).astype(np.int32))


@pytest.mark.parametrize("signed_a", [False, True])
def test_dp4a_interpret_matches_bytewise_products(signed_a):
  a, b, c = (_random_words(s) for s in (1, 2, 3))
  got = compat.dp4a(a, b, c, interpret=True, signed_a=signed_a)
  a_bytes = np.asarray(a).view(np.int8 if signed_a else np.uint8).reshape(-1, 4).astype(np.int64)
  b_bytes = np.asarray(b).view(np.int8).reshape(-1, 4).astype(np.int64)
  want = (np.asarray(c, np.int64) + (a_bytes * b_bytes).sum(-1)).astype(np.int32)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("selector", [0x5140, 0x7362, 0x5410, 0x7632, 0x3210, 0x0123])
def test_prmt_interpret_selects_bytes(selector):
  a, b = _random_words(4), _random_words(5)
  got = np.asarray(compat.prmt(a, b, selector, interpret=True)).view(np.uint8).reshape(-1, 4)
  both = np.concatenate([np.asarray(a).view(np.uint8).reshape(-1, 4),
                         np.asarray(b).view(np.uint8).reshape(-1, 4)], axis=-1)
  picks = [(selector >> (4 * i)) & 7 for i in range(4)]
  np.testing.assert_array_equal(got, both[:, picks])


def test_byte_transpose_of_four_words():
  words = [_random_words(s, 64) for s in range(4)]
  out = fd._transpose_bytes(*words, interpret=True)
  w = np.stack([np.asarray(x).view(np.uint8).reshape(-1, 4) for x in words], axis=1)
  o = np.stack([np.asarray(x).view(np.uint8).reshape(-1, 4) for x in out], axis=1)
  np.testing.assert_array_equal(o, np.swapaxes(w, 1, 2))   # out[k].byte[i] = w_i.byte[k]


# --- decode ------------------------------------------------------------------------

DECODE_CASES = {
    # name: (bits, head_dim, rows M, new tokens, lengths, capacity, splits)
    "int4_d128_gqa4_split4": (4, 128, 4, 1, (500, 250), 512, 4),
    "int2_d128_gqa4_split3": (2, 128, 4, 1, (500, 123), 512, 3),
    "int4_d64_two_tokens_split2": (4, 64, 8, 2, (250, 123), 256, 2),
    "int2_d64_one_split": (2, 64, 4, 1, (250, 123), 256, 1),
    "int4_d128_one_row_split2": (4, 128, 1, 1, (300, 64), 512, 2),
    "int4_d64_gqa4_split2_hardware_conversions": (4, 64, 4, 1, (250, 200), 256, 2),
}


class _DecodeTests(_KernelTest):

  def _run(self, name, sas, *, zero_empty_residual=False):
    bits, d, m, tokens, lengths, t, splits = DECODE_CASES[name]
    b, h, group = 2, 2, 64
    packed, residual = make_cache(
        seed_of(name), b=b, h=h, t=t, d=d, bits=bits, group=group,
        zero_empty_residual=zero_empty_residual, lengths=lengths)
    q, q_scale, q_pos, lengths = decode_query(
        seed_of(name), b=b, h=h, m=m, d=d, lengths=lengths, tokens=tokens)
    bs = decode_block_sizes(b, h, d, t, group, bits, splits)
    if name.endswith("hardware_conversions"):
      bs = dataclasses.replace(bs, convert="cvt")
    kw = dict(bits=bits, group=group, sas=sas, block_sizes=bs)
    args = (q, q_scale, q_pos, packed, residual, lengths)
    out, (mm, ll) = fd.flashq_decode(*args, interpret=self.INTERPRET,
                                     return_residuals=True, **kw)
    ref, (m_ref, l_ref) = jax.jit(functools.partial(
        fd.flashq_decode_reference, return_residuals=True, **kw))(*args)
    seq = jax.jit(functools.partial(
        reference.flashq_decode_reference, bits=bits, group=group, sas=sas))(*args)
    return out, ref, seq, (mm, ll, m_ref, l_ref), splits

  @pytest.mark.parametrize("name", sorted(DECODE_CASES))
  def test_matches_reference(self, name):
    out, ref, seq, (mm, ll, m_ref, l_ref), splits = self._run(name, SAS_F32)
    assert relerr(out, ref) <= 1e-4, relerr(out, ref)
    np.testing.assert_allclose(mm, m_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ll, l_ref, rtol=1e-3)
    # Split-K (and the residual window as its own partial) only reorders the
    # online softmax: close to the sequential reference.
    assert relerr(out, seq) <= 1e-2

  @pytest.mark.slow
  def test_bf16_sas(self):
    out, ref, _, _, _ = self._run("int4_d128_gqa4_split4", SAS_BF16)
    assert relerr(out, ref) <= 1e-2

  def test_empty_residual_slots_with_zero_scales(self):
    """Unfilled ring slots (zero codes, zero scales) give no NaN."""
    out, ref, _, _, _ = self._run("int2_d64_one_split", SAS_F32, zero_empty_residual=True)
    assert relerr(out, ref) <= 1e-4


def decode_block_sizes(b, h, d, t, group, bits, splits):
  bs = fd.BlockSizes.get_default(batch=b, num_kv_heads=h, head_dim=d, capacity=t,
                                 group=group, bits=bits)
  return dataclasses.replace(bs, num_splits=splits)


@pytest.mark.gpu
class TestDecode(_DecodeTests):
  INTERPRET = False


class TestDecodeInterpret(_DecodeTests):
  INTERPRET = True


# --- lowering ----------------------------------------------------------------------


def _export_cuda(f, *args, **kwargs):
  exported = jax.export.export(
      jax.jit(f), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
          compat.TRITON_CUSTOM_CALL_TARGET)])(*args, **kwargs)
  assert compat.TRITON_CUSTOM_CALL_TARGET in exported.mlir_module()
  return exported


S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("head_dim, causal, k_scales, sas, p_rounding, pv_dtype", [
    (64, False, "token", SAS_BF16, "half_up", "int8"),
    (128, True, "token", SAS_BF16, "half_up", "int8"),
    (64, True, "tile", SAS_EXACT, "nearest_even", "int8"),
    (128, False, "tile", SAS_EXACT, "nearest_even", "int8"),
    (128, True, "tile", SAS_EXACT, "nearest_even", "bfloat16"),
])
def test_prefill_lowers_for_cuda(head_dim, causal, k_scales, sas, p_rounding, pv_dtype):
  b, hq, hk, tq, tk = 2, 8, 2, 256, 512
  v = (S((b, hk, head_dim, tk), jnp.int8) if pv_dtype == "int8"
       else S((b, hk, tk, head_dim), jnp.bfloat16))
  args = (S((b, hq, tq, head_dim), jnp.int8), S((b, hq, tq), jnp.float32),
          S((b, hk, tk, head_dim), jnp.int8),
          S((b, hk, tk if k_scales == "token" else tk // 64), jnp.float32),
          v, S((b, hk, tk // 64), jnp.float32))
  f = functools.partial(fp.flashq_prefill, sas=sas, causal=causal,
                        block_sizes=fp.BlockSizes(block_q=128, block_k=64,
                                                  p_rounding=p_rounding, pv_dtype=pv_dtype),
                        return_residuals=True)
  _export_cuda(f, *args, kv_lengths=S((b,), jnp.int32))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("bits", [4, 2])
def test_decode_lowers_for_cuda(head_dim, bits):
  b, h, t, g, m = 4, 2, 1024, 64, 4
  packed, residual = reference.cache_specs(b, h, t, head_dim, bits=bits, group=g)
  f = functools.partial(fd.flashq_decode, bits=bits, group=g, sas=SAS_BF16)
  _export_cuda(f, S((b, h, m, head_dim), jnp.int8), S((b, h, m), jnp.float32),
               S((b, m), jnp.int32), packed, residual, S((b,), jnp.int32))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_quantization_lowers_for_cuda(head_dim):
  """The statistics pass and the quantization with migrated channels."""
  b, hq, hk, t = 2, 8, 2, 1024
  q, k = S((b, t, hq, head_dim), jnp.bfloat16), S((b, t, hk, head_dim), jnp.bfloat16)
  _export_cuda(functools.partial(qz.channel_stats, smooth=True, layout="bthd"), k,
               S((b,), jnp.int32))
  f = functools.partial(qz.quantize_qkv, block_q=64, block_k=128, sm_scale=0.1,
                        log2e_fold=True, smooth_k=True, layout="bthd")
  _export_cuda(f, q, k, k, kv_lengths=S((b,), jnp.int32),
               k_mean=S((b, hk, head_dim), jnp.float32),
               channel_scale=S((b, hk, head_dim), jnp.float32))


@pytest.mark.parametrize("batch, kv_heads, capacity, splits", [
    (32, 8, 8192, 4),      # 1024 programs: one wave
    (32, 4, 8192, 8),      # 9 splits would need a second wave for 96 programs
    (834, 4, 2176, 2),     # serving shapes: the measured best,
    (1064, 2, 2176, 2),    # and within 4% of it (4 splits)
    (1, 8, 8192, 128),     # batch 1: one tile per program fills the GPU
])
def test_decode_default_splits_follow_the_wave_model(batch, kv_heads, capacity, splits):
  """The H100 defaults reproduce the split counts measured best (gpu_notes.md)."""
  bs = fd.BlockSizes.get_default(batch=batch, num_kv_heads=kv_heads, head_dim=128,
                                 capacity=capacity, group=64, bits=4,
                                 device_kind=tuned_block_sizes.H100_SXM)
  assert bs.num_splits == splits


def test_decode_names_the_misshapen_cache_array():
  b, h, t, d, g, m = 2, 2, 256, 64, 64, 4
  packed, residual = reference.cache_specs(b, h, t, d, bits=4, group=g)
  packed = packed._replace(v_scale=S((b, h, t + 1), jnp.bfloat16))
  f = functools.partial(fd.flashq_decode, bits=4, group=g, sas=SAS_BF16)
  with pytest.raises(ValueError, match=r"packed\.v_scale has shape"):
    jax.eval_shape(f, S((b, h, m, d), jnp.int8), S((b, h, m), jnp.float32),
                   S((b, m), jnp.int32), packed, residual, S((b,), jnp.int32))


def test_quantize_lowers_for_cuda():
  f = functools.partial(qz.quantize_qkv, block_q=64, block_k=64, sm_scale=0.1,
                        log2e_fold=True, smooth_k=True)
  _export_cuda(f, S((2, 8, 256, 128), jnp.bfloat16), S((2, 2, 256, 128), jnp.bfloat16),
               S((2, 2, 256, 128), jnp.bfloat16))


def test_prefill_takes_v_codes_in_bf16():
  """V's codes as bf16 [B, Hk, Tk, D] (what the quantization pass writes for a
  bf16 P.V) give the same result as the transposed int8 codes."""
  q, q_scale, k, k_scale, v_t, v_scale = prefill_inputs(
      3, b=1, hq=2, hk=1, tq=64, tk=128, d=64, block_k=64)
  bs = fp.BlockSizes(block_q=32, block_k=64, num_warps=4, pv_dtype="bfloat16")
  v_codes = jnp.swapaxes(v_t, -1, -2).astype(jnp.bfloat16)
  kw = dict(sas=SAS_F32, block_sizes=bs, causal=True, interpret=True)
  got = fp.flashq_prefill(q, q_scale, k, k_scale, v_codes, v_scale, **kw)
  np.testing.assert_array_equal(
      np.asarray(got), np.asarray(fp.flashq_prefill(q, q_scale, k, k_scale, v_t, v_scale, **kw)))
  ref = fp.flashq_prefill_reference(q, q_scale, k, k_scale, v_codes, v_scale, sas=SAS_F32,
                                    causal=True)
  assert relerr(got, ref) <= 1e-4
  with pytest.raises(ValueError, match="pv_dtype"):
    fp.flashq_prefill(q, q_scale, k, k_scale, v_codes, v_scale, sas=SAS_F32,
                      block_sizes=dataclasses.replace(bs, pv_dtype="int8"), interpret=True)


def test_prefill_sas_table_is_base_2():
  args = prefill_inputs(0, b=1, hq=1, hk=1, tq=64, tk=64, d=64, block_k=64)
  with pytest.raises(NotImplementedError, match="SAS base"):
    fp.flashq_prefill(*args, sas=SASParams(base=float(np.e)), interpret=True)
  exact_e = SASParams(base=float(np.e), exact=True, dtype="float32")
  out = fp.flashq_prefill(*args, sas=exact_e, interpret=True)
  assert relerr(out, fp.flashq_prefill_reference(*args, sas=exact_e)) <= 1e-4


def test_prefill_names_a_misshapen_k_scale():
  """``k_scale`` is per key ([B, Hk, Tk]) or per key tile ([B, Hk, Tk // block_k])."""
  q, q_scale, k, k_scale, v_t, v_scale = prefill_inputs(
      0, b=1, hq=2, hk=1, tq=64, tk=256, d=64, block_k=64)
  with pytest.raises(ValueError, match="k_scale"):
    fp.flashq_prefill(q, q_scale, k, k_scale[..., ::2], v_t, v_scale, sas=SAS_F32,
                      interpret=True)

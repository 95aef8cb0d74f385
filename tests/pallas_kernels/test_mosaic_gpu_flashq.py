"""Pallas Mosaic GPU FlashQ prefill vs its reference on the same quantized inputs.

* CPU (CI): the kernel lowers for CUDA with ``jax.export``, and it runs in the Mosaic GPU
  interpreter (SMEM, barriers, TMA and the three warpgroups simulated on CPU
  threads; the int8 matmuls become XLA dots there, since the interpreter's
  wgmma takes no transposed operand) and matches the reference.
* GPU (``-m gpu``, Hopper): the compiled kernel matches the reference.

The interpreter runs each warpgroup in a thread that blocks inside XLA host
callbacks; XLA:CPU runs executables on a pool sized by the CPU count (or the
``NPROC`` variable), so on a 2-core machine the three warpgroups can starve
each other. The interpreter cases therefore run in one subprocess with
``NPROC=8`` set before JAX starts.
"""

from __future__ import annotations

import functools
import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mosaic_gpu import flashq_prefill as mf
from pallas_kernels.sas import SASParams
from turbojax.testing import run_json_script

SAS_F32 = SASParams(dtype="float32")
SAS_BF16 = SASParams()
SAS_EXACT = SASParams(exact=True)
SAS_BY_NAME = {"f32": SAS_F32, "bf16": SAS_BF16, "exact": SAS_EXACT}


def seed_of(name: str) -> int:
  return zlib.crc32(name.encode()) % 1000


def relerr(out, ref) -> float:
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  assert np.all(np.isfinite(out)), "kernel output has NaN/inf"
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def tolerance(sas: SASParams, out_dtype=jnp.float32) -> float:
  low = sas.dtype in ("bfloat16", "float16") and not sas.exact
  return 1e-2 if low or jnp.dtype(out_dtype) != jnp.float32 else 1e-4


def prefill_inputs(seed, *, b, hq, hk, tq, tk, d, block_k, logit_scale=3.0):
  """Random INT8 prefill inputs (V transposed); logits of a few units."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.integers(-127, 128, (b, hq, tq, d)), jnp.int8)
  k = jnp.asarray(rng.integers(-127, 128, (b, hk, tk, d)), jnp.int8)
  v_t = jnp.asarray(rng.integers(-127, 128, (b, hk, d, tk)), jnp.int8)
  unit = logit_scale / (127.0 * 127.0 * np.sqrt(d) / 3.0)
  q_scale = jnp.asarray(rng.uniform(0.5, 1.5, (b, hq, tq)) * unit, jnp.float32)
  k_scale = jnp.asarray(rng.uniform(0.5, 1.5, (b, hk, tk)), jnp.float32)
  v_scale = jnp.asarray(rng.uniform(0.5, 1.5, (b, hk, tk // block_k)) / 127, jnp.float32)
  return q, q_scale, k, k_scale, v_t, v_scale


# name -> (shape kwargs, call kwargs); call kwargs hold plain Python values.
CASES = {
    "f32_d128_causal_kvlen_gqa_residuals": (
        dict(b=2, hq=4, hk=2, tq=256, tk=384, d=128, block_k=128),
        dict(sas="f32", causal=True, kv_lengths=[384, 200], return_residuals=True)),
    "f32_d64_bk64_causal_offset_qlen": (
        dict(b=1, hq=2, hk=1, tq=200, tk=256, d=64, block_k=64),
        dict(sas="f32", causal=True, query_offset=56, q_lengths=[150],
             return_residuals=True)),
    "bf16_d128_full": (
        dict(b=1, hq=2, hk=2, tq=256, tk=512, d=128, block_k=128),
        dict(sas="bf16")),
    "exact_d64_full_bthd_bf16_out": (
        dict(b=2, hq=2, hk=1, tq=128, tk=256, d=64, block_k=128),
        dict(sas="exact", out_dtype="bfloat16", out_layout="bthd")),
    "f32_kvlen_zero_and_cvt": (
        dict(b=2, hq=1, hk=1, tq=128, tk=256, d=64, block_k=128),
        dict(sas="f32", kv_lengths=[0, 130], return_residuals=True, convert="cvt")),
    "f32_causal_nearest_even_p": (
        dict(b=1, hq=2, hk=1, tq=384, tk=384, d=128, block_k=128),
        dict(sas="f32", causal=True, p_rounding="nearest_even")),
    "f32_bf16_pv_causal_kvlen_gqa_residuals": (
        dict(b=2, hq=4, hk=2, tq=256, tk=384, d=128, block_k=128),
        dict(sas="f32", causal=True, kv_lengths=[384, 0], return_residuals=True,
             pv_dtype="bfloat16")),
    "exact_bf16_pv_d64_bk64_bthd_bf16_out": (
        dict(b=1, hq=2, hk=1, tq=200, tk=256, d=64, block_k=64),
        dict(sas="exact", out_dtype="bfloat16", out_layout="bthd", q_lengths=[150],
             p_rounding="nearest_even", pv_dtype="bfloat16")),
    "exact_bf16_p_causal_kvlen_gqa_residuals": (
        dict(b=2, hq=4, hk=2, tq=256, tk=384, d=128, block_k=128),
        dict(sas="exact", causal=True, kv_lengths=[384, 0], return_residuals=True,
             pv_dtype="bfloat16", quantize_p=False)),
    "bf16_bf16_p_d64_bk64_bthd_bf16_out": (
        dict(b=1, hq=2, hk=1, tq=200, tk=256, d=64, block_k=64),
        dict(sas="bf16", out_dtype="bfloat16", out_layout="bthd", q_lengths=[150],
             pv_dtype="bfloat16", quantize_p=False)),
    "exact_bf16_p_tile_k_causal_kvlen_gqa_residuals": (
        dict(b=2, hq=4, hk=2, tq=256, tk=384, d=128, block_k=128),
        dict(sas="exact", causal=True, kv_lengths=[384, 100], return_residuals=True,
             pv_dtype="bfloat16", quantize_p=False, k_scale_per_tile=True)),
    "bf16_tile_k_d64_bk64_qlen_bthd_bf16_out": (
        dict(b=1, hq=2, hk=1, tq=200, tk=256, d=64, block_k=64),
        dict(sas="bf16", out_dtype="bfloat16", out_layout="bthd", q_lengths=[150],
             k_scale_per_tile=True)),
}
# Small enough for the CPU interpreter (one to two CTAs, a few key tiles).
INTERPRET_CASES = {
    "f32_d64_bk64_causal_kvlen_offset": (
        dict(b=1, hq=2, hk=1, tq=128, tk=256, d=64, block_k=64),
        dict(sas="f32", causal=True, query_offset=64, kv_lengths=[200],
             return_residuals=True)),
    "bf16_d128_full_bthd": (
        dict(b=1, hq=1, hk=1, tq=128, tk=256, d=128, block_k=128),
        dict(sas="bf16", out_dtype="bfloat16", out_layout="bthd")),
    "exact_d64_nearest_even_p": (
        dict(b=1, hq=1, hk=1, tq=128, tk=128, d=64, block_k=64),
        dict(sas="exact", p_rounding="nearest_even")),
    "f32_bf16_pv_causal_kvlen_residuals": (
        dict(b=1, hq=1, hk=1, tq=128, tk=256, d=128, block_k=128),
        dict(sas="f32", causal=True, kv_lengths=[200], return_residuals=True,
             pv_dtype="bfloat16")),
    "exact_bf16_p_d64_bk64_offset": (
        dict(b=1, hq=1, hk=1, tq=128, tk=128, d=64, block_k=64),
        dict(sas="exact", causal=True, query_offset=16, return_residuals=True,
             pv_dtype="bfloat16", quantize_p=False)),
    "exact_bf16_p_tile_k_d64_bk64_causal_kvlen": (
        dict(b=1, hq=1, hk=1, tq=128, tk=256, d=64, block_k=64),
        dict(sas="exact", causal=True, kv_lengths=[200], return_residuals=True,
             pv_dtype="bfloat16", quantize_p=False, k_scale_per_tile=True)),
    "f32_tile_k_full": (
        dict(b=1, hq=1, hk=1, tq=128, tk=256, d=128, block_k=128),
        dict(sas="f32", k_scale_per_tile=True)),
}


def run_case(shape: dict, call: dict, *, interpret) -> dict:
  """Kernel vs reference on one case; returns the relative errors."""
  args = prefill_inputs(seed_of(json.dumps([shape, call], sort_keys=True)), **shape)
  kw = dict(call)
  tile_k = kw.pop("k_scale_per_tile", False)
  if tile_k:  # one K scale per key tile: [B, Hk, Tk // block_k]
    args = args[:3] + (args[3][..., ::shape["block_k"]],) + args[4:]
  kw["sas"] = SAS_BY_NAME[kw["sas"]]
  convert = kw.pop("convert", "magic")
  p_rounding = kw.pop("p_rounding", "half_up")
  pv_dtype = kw.pop("pv_dtype", "int8")
  quantize_p = kw.pop("quantize_p", True)
  for name in ("kv_lengths", "q_lengths"):
    if name in kw:
      kw[name] = jnp.asarray(kw[name], jnp.int32)
  if "out_dtype" in kw:
    kw["out_dtype"] = jnp.dtype(kw["out_dtype"])
  block_sizes = mf.BlockSizes(block_k=shape["block_k"], convert=convert,
                              p_rounding=p_rounding, pv_dtype=pv_dtype,
                              quantize_p=quantize_p)
  out = mf.flashq_prefill(*args, block_sizes=block_sizes, interpret=interpret, **kw)
  ref = mf.flashq_prefill_reference(*args, block_sizes=block_sizes, **kw)
  errs = {}
  if kw.get("return_residuals"):
    (out, (m, l)), (ref, (m_ref, l_ref)) = out, ref
    errs["m"] = relerr(m, m_ref)
    errs["l"] = relerr(l, l_ref)
  assert out.shape == ref.shape and out.dtype == ref.dtype
  errs["out"] = relerr(out.astype(jnp.float32), ref.astype(jnp.float32))
  errs["tol"] = tolerance(kw["sas"], kw.get("out_dtype", jnp.float32))
  if tile_k:  # the folded exponent's row constant rounds at |c * 1.5 * 2**23|: ~c/2
    errs["tol"] = max(errs["tol"], 1e-3)  # absolute in the exponent, flipping P's roundings
  return errs


def check(errs: dict):
  for key in ("out", "m", "l"):
    if key in errs:
      assert errs[key] <= errs["tol"], errs


# --- lowering and argument checks (CPU) -------------------------------------------


def _abstract_args(*, b=1, hq=2, hk=1, tq=256, tk=256, d=128, block_k=128):
  s = jax.ShapeDtypeStruct
  return (s((b, hq, tq, d), jnp.int8), s((b, hq, tq), jnp.float32),
          s((b, hk, tk, d), jnp.int8), s((b, hk, tk), jnp.float32),
          s((b, hk, d, tk), jnp.int8), s((b, hk, tk // block_k), jnp.float32))


@pytest.mark.parametrize("head_dim,block_k,causal,kv_lengths,sas,p_rounding", [
    (128, 128, False, False, SAS_BF16, "half_up"),
    (128, 128, True, True, SAS_EXACT, "nearest_even"),
    (64, 64, True, False, SAS_F32, "half_up"),
], ids=["d128_full_bf16", "d128_causal_kvlen_exact_rne", "d64_bk64_causal_f32"])
def test_lowers_for_cuda(head_dim, block_k, causal, kv_lengths, sas, p_rounding):
  args = _abstract_args(d=head_dim, block_k=block_k)
  kw = dict(sas=sas, causal=causal, return_residuals=True, out_dtype=jnp.bfloat16,
            out_layout="bthd",
            block_sizes=mf.BlockSizes(block_k=block_k, p_rounding=p_rounding))
  if kv_lengths:
    args += (jax.ShapeDtypeStruct((1,), jnp.int32),)
    fn = lambda *a: mf.flashq_prefill(*a[:6], kv_lengths=a[6], **kw)
  else:
    fn = lambda *a: mf.flashq_prefill(*a, **kw)
  exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
  text = exported.mlir_module()
  assert any(f"@{t}(" in text for t in mf.compat.MOSAIC_GPU_CUSTOM_CALL_TARGETS), text[:500]


@pytest.mark.parametrize("quantize_p, k_scale_per_tile", [
    (True, False), (False, False), (False, True)])
def test_bf16_pv_lowers_for_cuda_from_bf16_v_codes(quantize_p, k_scale_per_tile):
  """The API's bf16 P.V path: V's codes arrive as bf16 [B, Hk, Tk, D]; K's
  scale per token or per key tile."""
  s = jax.ShapeDtypeStruct
  args = _abstract_args(tk=384)[:4] + (s((1, 1, 384, 128), jnp.bfloat16),
                                        s((1, 1, 3), jnp.float32))
  if k_scale_per_tile:
    args = args[:3] + (s((1, 1, 3), jnp.float32),) + args[4:]
  kw = dict(sas=SAS_EXACT, causal=True, out_dtype=jnp.bfloat16, out_layout="bthd",
            block_sizes=mf.BlockSizes(block_k=128, p_rounding="nearest_even",
                                      pv_dtype="bfloat16", quantize_p=quantize_p))
  exported = jax.export.export(jax.jit(lambda *a: mf.flashq_prefill(*a, **kw)),
                               platforms=["cuda"])(*args)
  text = exported.mlir_module()
  assert any(f"@{t}(" in text for t in mf.compat.MOSAIC_GPU_CUSTOM_CALL_TARGETS)
  with pytest.raises(ValueError, match="pv_dtype"):
    mf.flashq_prefill(*args, sas=SAS_EXACT, block_sizes=mf.BlockSizes(block_k=128))


def test_rejects_what_it_does_not_support():
  q, q_scale, k, k_scale, v_t, v_scale = prefill_inputs(
      0, b=1, hq=1, hk=1, tq=128, tk=256, d=64, block_k=128)
  with pytest.raises(NotImplementedError, match="local_window"):
    mf.flashq_prefill(q, q_scale, k, k_scale, v_t, v_scale, sas=SAS_F32,
                      local_window=(16, 0))
  with pytest.raises(NotImplementedError, match="base-2|SAS base"):
    mf.flashq_prefill(q, q_scale, k, k_scale, v_t, v_scale,
                      sas=SASParams(base=float(np.e)))
  with pytest.raises(ValueError, match="differs from the V scale tile"):
    mf.flashq_prefill(q, q_scale, k, k_scale, v_t, v_scale, sas=SAS_F32,
                      block_sizes=mf.BlockSizes(block_k=64))
  q96, qs96, k96, ks96, vt96, vs96 = prefill_inputs(
      0, b=1, hq=1, hk=1, tq=128, tk=256, d=96, block_k=128)
  with pytest.raises(NotImplementedError, match="head_dim 96"):
    mf.flashq_prefill(q96, qs96, k96, ks96, vt96, vs96, sas=SAS_F32)
  q32, qs32, k32, ks32, vt32, vs32 = prefill_inputs(
      0, b=1, hq=1, hk=1, tq=128, tk=256, d=64, block_k=32)
  with pytest.raises(NotImplementedError, match="V scale tile"):
    mf.flashq_prefill(q32, qs32, k32, ks32, vt32, vs32, sas=SAS_F32)


def test_block_sizes():
  assert mf.BlockSizes.get_default(head_dim=128, seq_len_q=4096, seq_len_k=4096,
                                   device_kind="cpu").block_k == 128
  assert mf.BlockSizes.get_default(head_dim=64, seq_len_q=100, seq_len_k=320,
                                   device_kind="cpu").block_k == 64
  # The H200 has its own Mosaic entry; other kernels fall back to the H100's.
  tuned = mf.tuned_block_sizes
  h200 = mf.BlockSizes.get_default(head_dim=128, seq_len_q=4096, seq_len_k=16384,
                                   device_kind=tuned.H200)
  assert (h200.quantize_p, h200.max_concurrent_steps) == (False, 3)
  h100 = mf.BlockSizes.get_default(head_dim=128, seq_len_q=4096, seq_len_k=4096,
                                   device_kind=tuned.H100_SXM)
  assert (h100.quantize_p, h100.pv_dtype) == (True, "bfloat16")
  decode = dict(kernel="flashq_decode", dtype="int4", head_dim=128, seq_len=8192)
  assert (tuned.lookup(device_kind=tuned.H200, **decode)
          == tuned.lookup(device_kind=tuned.H100_SXM, **decode) is not None)
  assert tuned.lookup(device_kind="NVIDIA A100-SXM4-80GB", **decode) is None
  # A 3-deep ring of bf16 V tiles fits next to a bf16 output tile, not an f32 one.
  three = mf.BlockSizes(pv_dtype="bfloat16", max_concurrent_steps=3)
  depth = functools.partial(mf.ring_depth, three, head_dim=128, return_residuals=True)
  assert depth(num_k_tiles=32, out_dtype=jnp.bfloat16) == 3
  assert depth(num_k_tiles=32, out_dtype=jnp.float32) == 2
  assert depth(num_k_tiles=1, out_dtype=jnp.bfloat16) == 1
  for bad in (dict(block_q=128), dict(block_k=256), dict(max_concurrent_steps=1),
              dict(convert="fast"), dict(p_rounding="down"), dict(quantize_p=False)):
    with pytest.raises(ValueError):
      mf.BlockSizes(**bad)


# --- the kernel in the Mosaic GPU interpreter (CPU, one subprocess) ------------------

_INTERPRET_SCRIPT = """
import json, sys
sys.path[:0] = {paths!r}
import test_mosaic_gpu_flashq as t
print("RESULTS" + json.dumps(
    {{name: t.run_case(*case, interpret=True) for name, case in t.INTERPRET_CASES.items()}}))
"""


@pytest.fixture(scope="module")
def interpret_results():
  here = os.path.dirname(os.path.abspath(__file__))
  root = os.path.dirname(os.path.dirname(here))
  script = _INTERPRET_SCRIPT.format(paths=[here, root])
  return run_json_script(script, tag="RESULTS", timeout=600)


@pytest.mark.parametrize("name", sorted(INTERPRET_CASES))
def test_interpret_matches_reference(interpret_results, name):
  check(interpret_results[name])


# --- the compiled kernel (Hopper GPU) ------------------------------------------------


def _is_hopper() -> bool:
  if jax.default_backend() != "gpu":
    return False
  capability = getattr(jax.devices()[0], "compute_capability", "0")
  return float(capability) >= 9.0


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_matches_reference(name):
  if not _is_hopper():
    pytest.skip("Mosaic GPU wgmma kernels need Hopper (sm_90) or newer")
  check(run_case(*CASES[name], interpret=False))

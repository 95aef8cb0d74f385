"""Times the Pallas Triton FlashQ kernels against cuDNN bf16 in the same run.

Run on a CUDA GPU (writes JSON with every record, prints a table last):

  PYTHONPATH=. python3 benchmarks/kernels_gpu.py --out /tmp/out [--sweep | --final | --softmax] \
      [--sections prefill,decode]

Timing: each function is jitted; after warm-up, ``--iters`` calls are queued
back to back and blocked on once (asynchronous dispatch hides host overhead),
and the median over ``--repeats`` such runs is the per-call time.
Shapes (design §5): prefill B2 T4096 H32 D128 causal and not; decode B32,
8k cache, 32 query / 8 KV heads, D128, INT4 and half the KV heads INT2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from pallas_kernels.gpu import flashq_decode as fd
from pallas_kernels.gpu import flashq_prefill as fp
from pallas_kernels.gpu import quantize as qz
from pallas_kernels.sas import LOG2_E, SASParams
from turbojax.testing import int8_per_token, int8_window, pack_cache

RECORDS: list[dict] = []
SMOKE = False  # --smoke: tiny shapes, XLA baseline, interpreted kernels (CPU check)
JSON_PATH = None  # rewritten after every record, so a killed run keeps its data
PROFILE = False  # --profile: one config, two launches, no baseline (run under ncu)


def device_info() -> dict:
  d = jax.devices()[0]
  return dict(device=d.device_kind, platform=d.platform, jax=jax.__version__)


def timeit(fn, *args, iters: int, repeats: int, warmup: int = 2) -> dict:
  """Compile time and median per-call milliseconds of ``fn(*args)``."""
  if PROFILE:
    iters, repeats, warmup = 1, 1, 0
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = None
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / iters * 1e3)
  return dict(ms=statistics.median(times), ms_min=min(times), ms_max=max(times),
              compile_s=compile_s)


def dump():
  if JSON_PATH:
    with open(JSON_PATH, "w") as f:
      json.dump(dict(info=device_info(), argv=sys.argv, records=RECORDS), f, indent=1,
                default=str)


def record(**kw):
  kw.update(device_info())
  RECORDS.append(kw)
  dump()
  keys = ("section", "impl", "case", "ms", "ratio_vs_cudnn", "tflops", "tbps", "relerr")
  print(" | ".join(f"{k}={kw[k]:.4g}" if isinstance(kw.get(k), float) else f"{k}={kw.get(k)}"
                   for k in keys if k in kw), flush=True)


def relerr(out, ref) -> float:
  out = jnp.asarray(out, jnp.float32)
  ref = jnp.asarray(ref, jnp.float32)
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def safe(fn):
  @functools.wraps(fn)
  def wrapped(*a, **kw):
    try:
      return fn(*a, **kw)
    except Exception as e:  # noqa: BLE001 - a failed config must not stop the sweep
      print(f"FAILED {fn.__name__} {kw}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
      traceback.print_exc(limit=3)
      RECORDS.append(dict(failed=fn.__name__, args=repr(kw)[:500],
                          error=f"{type(e).__name__}: {str(e)[:2000]}"))
      dump()
      return None
  return wrapped


# --- prefill ---------------------------------------------------------------------

PREFILL_SWEEP = [
    fp.BlockSizes(block_q=128, block_k=64, num_warps=8, num_stages=2),
    fp.BlockSizes(block_q=128, block_k=64, num_warps=8, num_stages=3),
    fp.BlockSizes(block_q=128, block_k=128, num_warps=8, num_stages=2),
    fp.BlockSizes(block_q=64, block_k=64, num_warps=4, num_stages=3),
]
# Measured best of the first sweep, the 16-bit P.V variant (f16 when measured, now bf16
# codes accumulated in place), and larger tiles.
PREFILL_FINAL = [
    fp.BlockSizes(block_q=64, block_k=64, num_warps=4, num_stages=3),
    fp.BlockSizes(block_q=64, block_k=64, num_warps=4, num_stages=3, pv_dtype="bfloat16"),
    fp.BlockSizes(block_q=128, block_k=64, num_warps=8, num_stages=3, pv_dtype="bfloat16"),
    fp.BlockSizes(block_q=64, block_k=128, num_warps=4, num_stages=3, pv_dtype="bfloat16"),
]
# The softmax's element-wise variants at the tuned tiles (session 10, exp2 only):
# hardware conversions (I2F/F2I/FRND on the MUFU pipe) or the magic ones, P
# rounded half up or to nearest even, K's scale per key or per key tile.
_TUNED = dict(block_q=64, block_k=64, num_warps=4, num_stages=3)
PREFILL_SOFTMAX = {
    f"{convert}_{rounding}_{k}_k": (
        fp.BlockSizes(**_TUNED, convert=convert, p_rounding=rounding), k == "tile")
    for convert, rounding, k in [
        ("cvt", "half_up", "token"), ("magic", "half_up", "token"),
        ("magic", "nearest_even", "token"), ("cvt", "nearest_even", "tile"),
        ("magic", "nearest_even", "tile")]}
PREFILL_SOFTMAX.update({
    "magic_nearest_even_tile_k_bq128_w8": (fp.BlockSizes(
        block_q=128, block_k=64, num_warps=8, num_stages=3, p_rounding="nearest_even"), True),
    # P.V as a bf16 dot on the integer codes, accumulating in place.
    "magic_nearest_even_tile_k_bf16_pv": (fp.BlockSizes(
        **_TUNED, p_rounding="nearest_even", pv_dtype="bfloat16"), True),
    "magic_nearest_even_tile_k_bf16_pv_bq128_w8": (fp.BlockSizes(
        block_q=128, block_k=64, num_warps=8, num_stages=3, p_rounding="nearest_even",
        pv_dtype="bfloat16"), True),
})
SAS_CHOICES = {"exp2": SASParams(exact=True), "sas_poly_bf16": SASParams()}


def _baseline_impl():
  return "xla" if SMOKE else "cudnn"


def prefill_section(args):
  b, t, h, d = (1, 256, 2, 128) if SMOKE else (2, 4096, 32, 128)
  sm_scale = 1.0 / math.sqrt(d)
  key = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk in key)
  flops = 4 * b * h * t * t * d
  base = {False: (float("nan"), None), True: (float("nan"), None)}
  for causal in (() if PROFILE else (False, True)):
    cudnn = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                      scale=sm_scale, implementation=_baseline_impl()))
    r = timeit(cudnn, q, k, v, iters=args.iters, repeats=args.repeats)
    eff = flops / (2 if causal else 1)
    base[causal] = (r["ms"], cudnn(q, k, v))
    record(section="prefill", impl="cudnn_bf16", case=f"causal={causal}",
           tflops=eff / r["ms"] / 1e9, **r)

  if args.softmax:
    configs = [(name, bs, tile_k, ["exp2"]) for name, (bs, tile_k) in PREFILL_SOFTMAX.items()]
  else:
    configs = (PREFILL_SWEEP if args.sweep else PREFILL_FINAL if args.final
               else PREFILL_SWEEP[:1])
    if PROFILE:
      configs = PREFILL_FINAL[:1]
    # Final mode: the SAS polynomial only for the first two configs.
    configs = [("", bs, False, ["exp2"] if args.final and n >= 2 else list(SAS_CHOICES))
               for n, bs in enumerate(configs)]
  for variant, bs, tile_k, sas_names in configs:
    quant = jax.jit(functools.partial(
        qz.quantize_qkv, block_q=bs.block_q, block_k=bs.block_k, sm_scale=sm_scale,
        log2e_fold=True, smooth_k=True, k_per_token=not tile_k, layout="bthd",
        v_codes_dtype=jnp.dtype(bs.pv_dtype), interpret=SMOKE))
    rq = safe(timeit)(quant, q, k, v, iters=args.iters, repeats=args.repeats)
    if rq is None:
      continue
    record(section="prefill", impl="quantize_qkv", case=f"block_k={bs.block_k}",
           tbps=(3 * q.nbytes + 1.5 * q.nbytes) / rq["ms"] / 1e9, **rq)
    qkv = quant(q, k, v)
    if tile_k:  # K quantized per block_k keys: one scale per key tile
      qkv = qkv[:3] + (qkv[3][..., ::bs.block_k],) + qkv[4:]
    for causal in ((False,) if PROFILE else (False, True)):
      for sas_name in (["exp2"] if PROFILE else sas_names):
        sas = SAS_CHOICES[sas_name]
        kern = jax.jit(functools.partial(
            fp.flashq_prefill, sas=sas, causal=causal, block_sizes=bs,
            out_dtype=jnp.bfloat16, out_layout="bthd", interpret=SMOKE))
        r = safe(timeit)(kern, *qkv, iters=args.iters, repeats=args.repeats)
        if r is None:
          continue
        cudnn_ms, cudnn_out = base[causal]
        err = float("nan") if cudnn_out is None else relerr(kern(*qkv), cudnn_out)
        eff = flops / (2 if causal else 1)
        total = r["ms"] + rq["ms"]
        record(section="prefill", impl=f"triton_{sas_name}{'_' if variant else ''}{variant}",
               case=f"causal={causal}",
               block_sizes=dataclasses.asdict(bs), kernel_ms=r["ms"], quant_ms=rq["ms"],
               ms=total, ratio_vs_cudnn=cudnn_ms / total,
               kernel_ratio_vs_cudnn=cudnn_ms / r["ms"],
               tflops=eff / r["ms"] / 1e9, relerr=err, compile_s=r["compile_s"],
               ms_min=r["ms_min"], ms_max=r["ms_max"])


# --- decode ----------------------------------------------------------------------


build_cache = jax.jit(pack_cache, static_argnames=("bits", "group"))

DECODE_SWEEP = [
    fd.BlockSizes(num_splits=s, num_warps=1, qk_words=qk)
    for s in (4, 8, 16) for qk in (2, 4, 8)] + [fd.BlockSizes(num_warps=2)]
DECODE_FINAL = [
    fd.BlockSizes(num_splits=8, num_warps=1, num_stages=1),
    fd.BlockSizes(num_splits=4, num_warps=1, num_stages=1),
]


def decode_section(args):
  b, t, hq, hk, d, group = (2, 512, 8, 2, 128, 64) if SMOKE else (32, 8192, 32, 8, 128, 64)
  g = hq // hk
  length = t - 1  # 127 packed groups + 63 tokens in the INT8 residual window
  sm_scale = 1.0 / math.sqrt(d)
  keys = jax.random.split(jax.random.key(1), 3)
  qf = jax.random.normal(keys[0], (b, 1, hq, d), jnp.bfloat16)
  kf = jax.random.normal(keys[1], (b, t, hk, d), jnp.bfloat16)
  vf = jax.random.normal(keys[2], (b, t, hk, d), jnp.bfloat16)
  cudnn = jax.jit(functools.partial(jax.nn.dot_product_attention, scale=sm_scale,
                                    implementation=_baseline_impl()))
  ref_out = None
  r = None if PROFILE else safe(timeit)(cudnn, qf, kf, vf, iters=args.iters * 4,
                                        repeats=args.repeats)
  if PROFILE:
    cudnn_ms = float("nan")
  elif r is not None:
    ref_out = cudnn(qf, kf, vf)
    record(section="decode", impl="cudnn_bf16", case="B32 T8192 Hq32 Hkv8",
           tbps=(kf.nbytes + vf.nbytes) / r["ms"] / 1e9, **r)
    cudnn_ms = r["ms"]
  else:
    xla = jax.jit(functools.partial(jax.nn.dot_product_attention, scale=sm_scale,
                                    implementation="xla"))
    r = timeit(xla, qf, kf, vf, iters=args.iters, repeats=args.repeats)
    ref_out = xla(qf, kf, vf)
    record(section="decode", impl="xla_bf16_fallback", case="B32 T8192 Hq32 Hkv8", **r)
    cudnn_ms = r["ms"]

  # Kernel inputs: [B, Hk, T, D] cache, query rows = the G query heads of a KV head.
  k_bhtd = jnp.transpose(kf, (0, 2, 1, 3)).astype(jnp.float32)
  v_bhtd = jnp.transpose(vf, (0, 2, 1, 3)).astype(jnp.float32)
  n_packed = (length // group) * group
  q_rows = jnp.transpose(qf[:, 0].reshape(b, hk, g, d), (0, 1, 2, 3)).astype(jnp.float32)
  q8, q_s = int8_per_token(q_rows)
  q_scale = q_s.astype(jnp.float32) * (sm_scale * LOG2_E)
  q_pos = jnp.full((b, g), length - 1, jnp.int32)
  lengths = jnp.full((b,), length, jnp.int32)
  sas = SASParams()

  def cache_for(bits, heads):
    packed = build_cache(k_bhtd[:, heads], v_bhtd[:, heads], bits=bits, group=group)
    tail = slice(n_packed, n_packed + group)
    res = int8_window(k_bhtd[:, heads, tail], v_bhtd[:, heads, tail])
    return packed, res

  def nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))

  def out_error(out_rows, heads):
    if ref_out is None:
      return float("nan")
    ref = ref_out[:, 0].reshape(b, hk, g, d)[:, heads]
    return relerr(out_rows, ref)

  # INT4, all KV heads.
  all_heads = slice(0, hk)
  packed4, res4 = cache_for(4, all_heads)
  bytes4 = nbytes(packed4) + nbytes(res4)
  if PROFILE:  # free the float K/V: ncu saves and restores device memory per pass
    kf = vf = k_bhtd = v_bhtd = None
  configs = (DECODE_SWEEP if args.sweep else DECODE_FINAL if args.final else [None])
  if PROFILE:
    configs = DECODE_FINAL[:1]

  def tuned(bits, heads):
    return fd.BlockSizes.get_default(batch=b, num_kv_heads=heads, head_dim=d, capacity=t,
                                     group=group, bits=bits)
  if args.softmax:  # hardware vs magic conversions, at the tuned splits and twice them
    base = tuned(4, hk)
    configs = [dataclasses.replace(base, convert=c, num_splits=n) for c in ("cvt", "magic")
               for n in (base.num_splits, 2 * base.num_splits)]
  best4 = (float("inf"), None)
  for bs in configs:
    kern = jax.jit(functools.partial(fd.flashq_decode, bits=4, group=group, sas=sas,
                                     block_sizes=bs, interpret=SMOKE))
    r = safe(timeit)(kern, q8, q_scale, q_pos, packed4, res4, lengths,
                     iters=args.iters * 4, repeats=args.repeats)
    if r is None:
      continue
    out = kern(q8, q_scale, q_pos, packed4, res4, lengths)
    record(section="decode", impl="triton_int4", case="B32 T8192 Hq32 Hkv8",
           block_sizes=None if bs is None else dataclasses.asdict(bs),
           ratio_vs_cudnn=cudnn_ms / r["ms"], tbps=bytes4 / r["ms"] / 1e9,
           relerr=out_error(out, all_heads), **r)
    if r["ms"] < best4[0]:
      best4 = (r["ms"], bs)

  if PROFILE:
    return
  if best4[1] is not None:  # the exponent: SAS polynomial (above) vs MUFU exp2
    kern = jax.jit(functools.partial(fd.flashq_decode, bits=4, group=group,
                                     sas=SASParams(exact=True), block_sizes=best4[1],
                                     interpret=SMOKE))
    r = safe(timeit)(kern, q8, q_scale, q_pos, packed4, res4, lengths,
                     iters=args.iters * 4, repeats=args.repeats)
    if r is not None:
      out = kern(q8, q_scale, q_pos, packed4, res4, lengths)
      record(section="decode", impl="triton_int4_exp2", case="B32 T8192 Hq32 Hkv8",
             block_sizes=dataclasses.asdict(best4[1]), ratio_vs_cudnn=cudnn_ms / r["ms"],
             tbps=bytes4 / r["ms"] / 1e9, relerr=out_error(out, all_heads), **r)
  # Half the KV heads INT2: two calls (4 heads each) in one jitted step.
  lo_heads, hi_heads = slice(0, hk // 2), slice(hk // 2, hk)
  p4, r4 = cache_for(4, lo_heads)
  p2, r2 = cache_for(2, hi_heads)
  bytes_mixed = nbytes(p4) + nbytes(r4) + nbytes(p2) + nbytes(r2)
  if PROFILE:
    mixed_configs = []
  elif args.softmax:
    mixed_configs = [(dataclasses.replace(tuned(4, hk // 2), convert=c),
                      dataclasses.replace(tuned(2, hk // 2), convert=c)) for c in ("cvt", "magic")]
    # INT2 with magic conversions: 233 registers at qk_words 4, 188 at 2 (local SASS).
    mixed_configs.append((mixed_configs[-1][0],
                          dataclasses.replace(mixed_configs[-1][1], qk_words=2)))
  elif args.final and best4[1] is not None:
    mixed_configs = [(best4[1], best4[1]),
                     (best4[1], dataclasses.replace(best4[1], num_splits=2 * best4[1].num_splits))]
  elif args.sweep and best4[1] is not None:
    # 4 KV heads per call: twice the splits of the 8-head best keeps the SMs busy.
    mixed_configs = [
        (best4[1], dataclasses.replace(best4[1], num_splits=s))
        for s in (best4[1].num_splits, 2 * best4[1].num_splits)]
  else:
    mixed_configs = [(None, None)]
  for bs4, bs2 in mixed_configs:
    def step(q8, q_scale, q_pos, p4, r4, p2, r2, lengths, bs4=bs4, bs2=bs2):
      o4 = fd.flashq_decode(q8[:, lo_heads], q_scale[:, lo_heads], q_pos, p4, r4, lengths,
                            bits=4, group=group, sas=sas, block_sizes=bs4, interpret=SMOKE)
      o2 = fd.flashq_decode(q8[:, hi_heads], q_scale[:, hi_heads], q_pos, p2, r2, lengths,
                            bits=2, group=group, sas=sas, block_sizes=bs2, interpret=SMOKE)
      return o4, o2
    step = jax.jit(step)
    r = safe(timeit)(step, q8, q_scale, q_pos, p4, r4, p2, r2, lengths,
                     iters=args.iters * 4, repeats=args.repeats)
    if r is None:
      continue
    o4, o2 = step(q8, q_scale, q_pos, p4, r4, p2, r2, lengths)
    record(section="decode", impl="triton_mixed_int4_int2", case="B32 T8192 Hq32 Hkv8 4+4",
           block_sizes=None if bs2 is None else dict(int4=dataclasses.asdict(bs4) if bs4 else None,
                                                     int2=dataclasses.asdict(bs2)),
           ratio_vs_cudnn=cudnn_ms / r["ms"], tbps=bytes_mixed / r["ms"] / 1e9,
           relerr_int4_heads=out_error(o4, lo_heads), relerr=out_error(o2, hi_heads), **r)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--sections", default="prefill,decode")
  parser.add_argument("--sweep", action="store_true", help="time every tuning config")
  parser.add_argument("--profile", action="store_true",
                      help="one config per kernel, two launches each (for ncu)")
  parser.add_argument("--final", action="store_true",
                      help="time the short list of best and candidate configs")
  parser.add_argument("--softmax", action="store_true",
                      help="the conversion variants (prefill: with P's rounding and K's "
                           "scales too)")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--tag", default="")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes, XLA baseline, interpreted kernels (CPU check)")
  args = parser.parse_args(argv)
  global SMOKE, JSON_PATH, PROFILE
  SMOKE = args.smoke
  PROFILE = args.profile
  JSON_PATH = os.path.join(args.out, f"kernels_gpu{('_' + args.tag) if args.tag else ''}.json")
  print(device_info(), flush=True)
  sections = args.sections.split(",")
  t0 = time.time()
  try:
    if "prefill" in sections:
      prefill_section(args)
    if "decode" in sections:
      decode_section(args)
  finally:
    RECORDS.append(dict(total_seconds=time.time() - t0))
    dump()
    RECORDS.pop()
  print("\n=== summary ===")
  for rec in RECORDS:
    if "failed" in rec:
      print("FAILED", rec["failed"], rec["args"][:200])
      continue
    bs = rec.get("block_sizes")
    print(f"{rec['section']:8s} {rec['impl']:44s} {rec['case']:28s} {rec['ms']:9.4f} ms"
          f"  ratio={rec.get('ratio_vs_cudnn', float('nan')):.3f}"
          f"  kr={rec.get('kernel_ratio_vs_cudnn', float('nan')):.3f}"
          f"  err={rec.get('relerr', float('nan')):.3g}  {bs if bs else ''}")


if __name__ == "__main__":
  main()

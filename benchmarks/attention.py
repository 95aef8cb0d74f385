"""Attention benchmark CLI: turbojax against jax.nn (cuDNN and XLA) in one run.

Baselines: ``jax.nn.dot_product_attention`` with ``implementation="cudnn"``
(``cudnn``) or ``"xla"`` (``jax-xla``), and tokamax where it is installed
(``tokamax-mosaic``, ``tokamax-triton`` in bf16; ``tokamax-int8``, ``tokamax-int4``:
its Triton kernel on qwix-quantized inputs); other names are turbojax's
``implementation=`` values (``triton``, ``mosaic_gpu`` (Hopper+; its decode
rows run the Triton decode kernel), ``mosaic_tpu``, ``xla``).
Prefill: ``dot_product_attention`` on bf16 inputs, the quantization pass
included in the time and reported beside it (on a GPU the attention kernel's
and the rest of the call's GPU time, from a profiler trace). Decode: one new token per
sequence against a quantized KV cache vs jax.nn over a bf16 cache. Every row
carries the relative error against float32 exact attention on the same inputs.

  python benchmarks/attention.py --suite all --out benchmarks/results/h100
  python benchmarks/attention.py --suite prefill --seq 4096 16384 --causal both
  python benchmarks/attention.py --suite prefill --impls cudnn triton mosaic_gpu
  python benchmarks/attention.py --suite prefill --k-outliers   # the outlier-data error
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

import turbojax  # noqa: E402
from pallas_kernels.gpu import flashq_prefill as triton_prefill  # noqa: E402
from pallas_kernels.mosaic_gpu import flashq_prefill as mosaic_prefill  # noqa: E402
from turbojax.attention.prepare import quantize_for_prefill  # noqa: E402
from turbojax.testing import random_qkv, relative_error  # noqa: E402

# Baselines are jax.nn's implementations and tokamax's; every other name is a turbojax one.
BASELINES = {"cudnn": "cudnn", "jax-xla": "xla"}
TOKAMAX = ("tokamax-mosaic", "tokamax-triton", "tokamax-int8", "tokamax-int4")


def is_baseline(impl: str) -> bool:
  return impl in BASELINES or impl in TOKAMAX


def tokamax_attention(impl: str, **kwargs):
  """``(quantize_kv, attend)`` for one of ``TOKAMAX``: ``quantize_kv(k, v)``
  puts K and V in the format its kernel reads (the KV cache's format in
  decode), ``attend(q, k, v)`` quantizes Q where that format does and runs the
  kernel. The quantized formats are those of tokamax's own tests: qwix INT8
  per token and head for Q, K and V (its INT8 Q.K^T path), INT4 per token and
  head for K and V. Raises ``ImportError`` where tokamax is not installed."""
  import qwix  # noqa: PLC0415 (optional baselines)
  import tokamax  # noqa: PLC0415

  attend = functools.partial(tokamax.dot_product_attention,
                             implementation="mosaic" if impl == "tokamax-mosaic" else "triton",
                             **kwargs)
  int8 = functools.partial(qwix.quantize, qtype=jnp.int8, channelwise_axes=(0, 1, 2))
  if impl == "tokamax-int8":
    return (lambda k, v: (int8(k), int8(v))), (lambda q, k, v: attend(int8(q), k, v))
  if impl == "tokamax-int4":
    def int4(x):
      return qwix.quantize(x, jnp.int4, tiled_axes={0: 1, 1: 1, 2: 1, 3: x.shape[-1]})
    return (lambda k, v: (int4(k), int4(v))), attend
  return (lambda k, v: (k, v)), attend


def _impl_fn(impl: str, config, **kwargs):
  """A jitted ``fn(q, k, v)`` on bf16 inputs, any quantization included."""
  if impl in BASELINES:
    return jax.jit(functools.partial(jax.nn.dot_product_attention,
                                     implementation=BASELINES[impl], **kwargs))
  if impl in TOKAMAX:
    quantize_kv, attend = tokamax_attention(impl, **kwargs)
    return jax.jit(lambda q, k, v: attend(q, *quantize_kv(k, v)))
  return jax.jit(functools.partial(turbojax.dot_product_attention, implementation=impl,
                                   config=config, **kwargs))


# The prefill kernels as GPU traces name them; every other kernel of a call is its quantization pass.
ATTENTION_KERNELS = (triton_prefill.KERNEL_NAME, mosaic_prefill.KERNEL_NAME)


def kernel_and_quantization_ms(fn, *args, calls: int = 10):
  """GPU time per call of the attention kernel and of the rest of the call
  (the quantization pass and its small XLA ops), from a profiler trace of
  ``calls`` calls; ``None`` where the trace has no GPU kernel (CPU) or none of
  ``ATTENTION_KERNELS`` (the ``"xla"`` path)."""
  kernels = common.device_kernel_times(lambda *a: [fn(*a) for _ in range(calls)], *args,
                                       trace_dir=tempfile.mkdtemp(), top=1000)
  attention = sum(ms for name, ms, _ in kernels if any(k in name for k in ATTENTION_KERNELS))
  if not attention:
    return None
  total = sum(ms for _, ms, _ in kernels)
  return attention / calls, (total - attention) / calls


def exact_reference(q, k, v, causal: bool, chunk: int = 1024):
  """Float32 exact attention, ``chunk`` queries at a time: the ``[T, T]``
  scores of a 16k-token prefill do not fit in GPU memory at once."""
  attend = jax.jit(lambda qc, k, v, start: turbojax.dot_product_attention(
      qc, k, v, is_causal=causal, query_offset=start,
      config=turbojax.TurboConfig(exact=True)))
  k, v = k.astype(jnp.float32), v.astype(jnp.float32)
  return jnp.concatenate([
      attend(q[:, i:i + chunk].astype(jnp.float32), k, v, jnp.int32(i))
      for i in range(0, q.shape[1], chunk)], axis=1)


def prefill_suite(args) -> list[dict]:
  rows = []
  on_gpu = jax.default_backend() == "gpu"  # the kernel/quantization split needs a GPU trace
  config = turbojax.TurboConfig()
  for seq in args.seq:
    for causal in args.causal:
      q, k, v = random_qkv(0, args.batch, seq, seq, args.heads, args.kv_heads, args.head_dim,
                           jnp.bfloat16, k_outliers=args.k_outliers)
      exact = exact_reference(q, k, v, causal) if args.check else None
      flops = common.attention_flops(args.batch, seq, seq, args.heads, args.head_dim, causal)
      base_ms = None
      runs = [(impl, scales) for impl in args.impls
              for scales in ((None,) if is_baseline(impl) else args.scales)]
      for impl, scales in runs:
        row = {"suite": "prefill", "impl": impl, "batch": args.batch, "seq": seq,
               "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
               "causal": causal, "k_outliers": args.k_outliers}
        if scales is not None:
          row["scales"] = scales
        row_config = dataclasses.replace(config, per_token_scales=scales == "token")
        try:
          fn = _impl_fn(impl, row_config, is_causal=causal)
          timing = common.time_fn(fn, q, k, v, repeats=args.repeats)
        except Exception as e:  # a missing backend is a row, not a crash
          row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
          rows.append(row)
          print(f"{impl}: {row['error']}", file=sys.stderr)
          continue
        row.update(timing)
        row["tflops"] = flops / timing["ms"] / 1e9
        if not is_baseline(impl):
          split = kernel_and_quantization_ms(fn, q, k, v) if on_gpu else None
          if split is not None:
            row["kernel_ms"], row["quant_ms"] = split
          elif impl == "xla":  # its quantization pass, timed alone
            quant = jax.jit(functools.partial(
                quantize_for_prefill, config=row_config, block_q=config.block_q,
                block_k=config.block_k, softmax_scale=args.head_dim**-0.5))
            row["quant_ms"] = common.time_fn(quant, q, k, v, repeats=args.repeats)["ms"]
        if exact is not None:
          row["relerr"] = relative_error(fn(q, k, v), exact)
        if impl == "cudnn":
          base_ms = timing["ms"]
        rows.append(row)
      for row in rows:
        if row.get("seq") == seq and row.get("causal") == causal and base_ms and "ms" in row:
          row["speedup_vs_cudnn"] = base_ms / row["ms"]
  return rows


def _nbytes(tree) -> int:
  """Bytes of a pytree of arrays, sub-byte dtypes (qwix's int4) counted packed."""
  return sum(x.size * jnp.iinfo(x.dtype).bits // 8 if jnp.issubdtype(x.dtype, jnp.integer)
             else x.nbytes for x in jax.tree.leaves(tree))


def decode_suite(args) -> list[dict]:
  rows = []
  b, t, hq, hk, d = args.batch_decode, args.cache_len, args.heads, args.kv_heads_decode, args.head_dim
  q, k, v = random_qkv(1, b, 1, t, hq, hk, d, jnp.bfloat16)
  exact = turbojax.dot_product_attention(
      *(x.astype(jnp.float32) for x in (q, k, v)),
      config=turbojax.TurboConfig(exact=True)) if args.check else None
  base_ms = None
  for impl in filter(is_baseline, args.impls):
    label = impl.removeprefix("tokamax-") if impl in ("tokamax-int8", "tokamax-int4") else "bf16"
    row = {"suite": "decode", "impl": impl, "cache": label, "batch": b, "cache_len": t,
           "heads": hq, "kv_heads": hk, "head_dim": d}
    try:
      if impl in BASELINES:
        fn, cache_kv = _impl_fn(impl, None), (k, v)
      else:  # the cache is stored in tokamax's format; only attention is timed
        quantize_kv, attend = tokamax_attention(impl)
        fn, cache_kv = jax.jit(attend), jax.jit(quantize_kv)(k, v)
      row.update(common.time_fn(fn, q, *cache_kv, repeats=args.repeats))
    except Exception as e:
      row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
      rows.append(row)
      print(f"{impl}: {row['error']}", file=sys.stderr)
      continue
    row["bytes"] = _nbytes(cache_kv)
    row["tb_per_s"] = row["bytes"] / row["ms"] / 1e9
    if exact is not None:
      row["relerr"] = relative_error(fn(q, *cache_kv), exact)
    if impl == "cudnn":
      base_ms = row["ms"]
    rows.append(row)
  for label, config in (("int4", turbojax.TurboConfig()),
                        ("int4/int2", turbojax.TurboConfig(int2_heads=hk // 2))):
    cache = turbojax.QuantizedKVCache.init(b, t, hk, d, config)
    cache = jax.jit(lambda c, k, v: c.update(k, v))(cache, k, v)
    for impl in args.impls:
      if is_baseline(impl):
        continue
      row = {"suite": "decode", "impl": impl, "cache": label, "batch": b, "cache_len": t,
             "heads": hq, "kv_heads": hk, "head_dim": d, "bytes": cache.nbytes}
      try:
        fn = jax.jit(functools.partial(turbojax.decode_attention, implementation=impl))
        row.update(common.time_fn(fn, q, cache, repeats=args.repeats))
      except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(f"{impl} {label}: {row['error']}", file=sys.stderr)
        continue
      row["tb_per_s"] = cache.nbytes / row["ms"] / 1e9
      if exact is not None:
        row["relerr"] = relative_error(fn(q, cache), exact)
      rows.append(row)
  for row in rows:
    if base_ms and "ms" in row:
      row["speedup_vs_cudnn"] = base_ms / row["ms"]
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  on_gpu = jax.default_backend() == "gpu"
  parser.add_argument("--suite", choices=("prefill", "decode", "all"), default="all")
  parser.add_argument("--impls", nargs="+",
                      default=["cudnn", "jax-xla", "triton"] if on_gpu else ["jax-xla", "xla"],
                      help="baselines (jax.nn's cudnn and jax-xla; with tokamax installed "
                           f"{', '.join(TOKAMAX)}) and turbojax implementations "
                           "(triton, mosaic_gpu, mosaic_tpu, xla)")
  parser.add_argument("--batch", type=int, default=2 if on_gpu else 1)
  parser.add_argument("--seq", type=int, nargs="+", default=[4096] if on_gpu else [512])
  parser.add_argument("--heads", type=int, default=32 if on_gpu else 8)
  parser.add_argument("--kv-heads", type=int, default=32 if on_gpu else 8,
                      help="KV heads for prefill")
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--causal", choices=("true", "false", "both"), default="both")
  parser.add_argument("--scales", nargs="+", choices=("token", "block"), default=["block"],
                      help="prefill INT8 scales of Q/K: per block (default config) and/or "
                           "per token (per_token_scales=True)")
  parser.add_argument("--k-outliers", action="store_true",
                      help="prefill inputs with the design's K outliers (a channel bias and "
                           "6x channels; error bound 4e-2) instead of unit-normal ones")
  parser.add_argument("--batch-decode", type=int, default=32 if on_gpu else 2)
  parser.add_argument("--cache-len", type=int, default=8192 if on_gpu else 1024)
  parser.add_argument("--kv-heads-decode", type=int, default=8 if on_gpu else 2)
  parser.add_argument("--repeats", type=int, default=20 if on_gpu else 3)
  parser.add_argument("--no-check", dest="check", action="store_false",
                      help="skip the float32 exact reference (saves memory)")
  parser.add_argument("--out", default=None, help="output prefix for .json and .csv")
  args = parser.parse_args(argv)
  args.causal = {"true": [True], "false": [False], "both": [False, True]}[args.causal]

  meta = common.metadata()
  print(f"{meta['device_kind']} | jax {meta['jax']} | turbojax {meta['turbojax']}")
  rows = []
  if args.suite in ("prefill", "all"):
    rows += prefill_suite(args)
    print("\nprefill (bf16 inputs; turbojax times include quantization)")
    common.print_table([r for r in rows if r["suite"] == "prefill"], [
        ("impl", "impl", "s"), ("scales", "scales", "s"), ("seq", "seq", "d"),
        ("causal", "causal", ""), ("ms", "ms", ".3f"), ("tflops", "TFLOP/s", ".1f"),
        ("kernel_ms", "kernel ms", ".3f"), ("quant_ms", "quant ms", ".3f"),
        ("speedup_vs_cudnn", "vs cuDNN", ".2f"),
        ("relerr", "rel err", ".2e")])
  if args.suite in ("decode", "all"):
    decode_rows = decode_suite(args)
    rows += decode_rows
    print("\ndecode (1 token, bytes = the whole cache incl. scales)")
    common.print_table(decode_rows, [
        ("impl", "impl", "s"), ("cache", "cache", "s"), ("ms", "ms", ".3f"),
        ("tb_per_s", "TB/s", ".2f"), ("speedup_vs_cudnn", "vs cuDNN", ".2f"),
        ("relerr", "rel err", ".2e")])
  for path in common.write_results(rows, args.out, meta):
    print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  main()

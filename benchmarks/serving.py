"""End-to-end decode throughput at a fixed KV-cache memory budget.

    PYTHONPATH=. python benchmarks/serving.py                 # GPU, large model
    PYTHONPATH=. python benchmarks/serving.py --smoke         # tiny, runs on CPU

The model is ``examples/train_lm.py``'s ``TransformerLM`` (pre-norm, RoPE,
GQA, bf16 weights, random init: throughput does not depend on the weights).
For each cache kind the batch is the largest that fits ``--budget-gib`` of
KV cache for ``context + decoded`` tokens per sequence, computed from the
cache's real bytes per sequence (``nbytes`` of a batch-1 cache per layer:
codes, scales, zero points, INT8 window, lengths):

* ``bf16``: a plain bf16 KV cache (``FloatKVCache``) and exact attention
  (``float_decode_attention``: einsums with f32 accumulation, f32 softmax);
* ``int4``: TurboAttention with the INT4 ``QuantizedKVCache``;
* ``int4/int2``: the same with half the KV heads at INT2.

The caches are filled with ``--context`` random tokens of K/V per layer
(synthetic prefill: the decode cost does not depend on the values), then a
jitted ``lax.scan`` decodes ``--steps`` greedy tokens per run
(``train_lm.greedy_steps``: the caches carried and donated, the weights loop
invariants; one compile). After a warm-up run the median of ``--repeats`` runs gives
ms/step; tokens/s = batch / (s/step). ``--trace DIR`` profiles one more run
per cache and prints its top GPU kernels. Prints a table, writes JSON to
``--out`` (default ``$OUT/serving.json`` or ``benchmarks/results/serving.json``)
and a PNG next to it when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "examples"):
  if str(p) not in sys.path:
    sys.path.insert(0, str(p))

from train_lm import ModelConfig, TransformerLM, greedy_steps, split_caches

from benchmarks.common import device_kernel_times

import turbojax
from turbojax import QuantizedKVCache, TurboConfig
from turbojax.flax import FloatKVCache


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  model: ModelConfig
  context: int
  steps: int
  repeats: int
  budget_gib: float
  max_batch: int


CONFIGS = {
    # ~0.7B params, head_dim 128, 16 query / 4 KV heads (Llama-like GQA).
    "large": BenchConfig(
        model=ModelConfig(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=4,
                          dtype="bfloat16", param_dtype="bfloat16"),
        context=2048, steps=32, repeats=3, budget_gib=16.0, max_batch=4096),
    "smoke": BenchConfig(
        model=ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2),
        context=128, steps=4, repeats=2, budget_gib=0.25 / 1024, max_batch=16),
}


def modes(n_kv: int):
  return [("bf16", TurboConfig(exact=True), "float"),
          ("int4", TurboConfig(), "quantized"),
          (f"int4/int2 ({n_kv // 2}/{n_kv} heads INT2)", TurboConfig(int2_heads=n_kv // 2),
           "quantized")]


def cache_bytes_per_sequence(cfg: ModelConfig, turbo: TurboConfig, kind: str,
                             max_len: int) -> int:
  head_dim = cfg.d_model // cfg.n_heads
  if kind == "float":
    one = FloatKVCache.init(1, max_len, cfg.n_kv_heads, head_dim, jnp.bfloat16)
  else:
    one = QuantizedKVCache.init(1, max_len, cfg.n_kv_heads, head_dim, turbo)
  return cfg.n_layers * one.nbytes


@functools.partial(jax.jit, static_argnums=(2, 3), donate_argnums=0)
def _fill(cache, key, context: int, chunk: int):
  """Appends ``context`` random K/V tokens in chunks (synthetic prefill)."""
  b = cache.lengths.shape[0]
  if isinstance(cache, FloatKVCache):
    hk, d, dtype = cache.key.shape[2], cache.key.shape[3], cache.key.dtype
  else:
    hk, d, dtype = cache.num_kv_heads, cache.head_dim, jnp.bfloat16

  def body(i, cache):
    kk, kv = jax.random.split(jax.random.fold_in(key, i))
    k = jax.random.normal(kk, (b, chunk, hk, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, chunk, hk, d), jnp.float32).astype(dtype)
    return cache.update(k, v)
  return jax.lax.fori_loop(0, context // chunk, body, cache)


def bench_mode(bench: BenchConfig, name: str, turbo: TurboConfig, kind: str, seed: int,
               trace_dir: str | None = None):
  cfg = bench.model
  max_len = bench.context + (bench.repeats + 1) * bench.steps
  max_len = -(-max_len // turbo.group_size) * turbo.group_size
  per_seq = cache_bytes_per_sequence(cfg, turbo, kind, max_len)
  budget = int(bench.budget_gib * 2**30)
  batch = min(budget // per_seq, bench.max_batch)
  if batch < 1:
    raise ValueError(f"{name}: one sequence needs {per_seq} bytes > budget {budget}")
  model = TransformerLM(cfg, turbo, rngs=nnx.Rngs(seed))
  model.init_cache(batch, max_len, kind=kind, dtype=jnp.bfloat16)
  t0 = time.perf_counter()
  chunk = min(256, bench.context)
  for i, block in enumerate(model.blocks):
    cache = _fill(block.attn.kv_cache.get_value(), jax.random.PRNGKey(1000 + i), bench.context,
                  chunk)
    block.attn.kv_cache.set_value(cache)
  jax.block_until_ready(nnx.state(model))
  fill_s = time.perf_counter() - t0
  nbytes = model.cache_nbytes()

  graphdef, caches, rest = split_caches(model)
  del model  # its caches are donated to the decoding loop

  def run(caches, tok):
    caches, _, tok = greedy_steps(graphdef, caches, rest, tok, bench.steps)
    return caches, tok

  tok = jnp.zeros((batch,), jnp.int32)
  t0 = time.perf_counter()
  caches, tok = run(caches, tok)
  jax.block_until_ready(tok)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(bench.repeats):
    t0 = time.perf_counter()
    caches, tok = run(caches, tok)
    jax.block_until_ready(tok)
    times.append((time.perf_counter() - t0) / bench.steps)
  step_s = statistics.median(times)
  kernels = []
  if trace_dir:
    kernels = device_kernel_times(lambda c, t: run(c, t)[1], caches, tok,
                                  trace_dir=os.path.join(trace_dir, name.split(" ")[0]
                                                         .replace("/", "_")))
    for kernel, ms, n in kernels:
      print(f"    {ms / bench.steps:8.3f} ms/step  {n // bench.steps:4d}/step  {kernel[:90]}")
  del caches
  return {
      "mode": name, "kind": kind, "batch": int(batch), "max_len": max_len, "context": bench.context,
      "cache_bytes": int(nbytes), "cache_bytes_per_seq": int(per_seq),
      "bytes_per_token_per_layer": per_seq / (max_len * cfg.n_layers),
      "ms_per_step": step_s * 1e3, "ms_min": min(times) * 1e3, "ms_max": max(times) * 1e3,
      "tokens_per_s": batch / step_s, "compile_s": compile_s, "fill_s": fill_s,
      "top_kernels_ms_per_step": [(k, ms / bench.steps, n // bench.steps)
                                  for k, ms, n in kernels]}


def plot(records, path: pathlib.Path):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  fig, ax = plt.subplots(figsize=(6, 3.5))
  names = [r["mode"] for r in records]
  ax.bar(names, [r["tokens_per_s"] for r in records], color=["#888", "#2a7", "#27a"][:len(names)])
  for i, r in enumerate(records):
    ax.text(i, r["tokens_per_s"], f"batch {r['batch']}\n{r['speedup']:.2f}x", ha="center",
            va="bottom", fontsize=8)
  ax.set_ylabel("decode tokens/s")
  ax.set_title("Decode throughput at a fixed KV-cache budget")
  ax.margins(y=0.25)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return str(path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny config (CPU check)")
  parser.add_argument("--config", choices=sorted(CONFIGS), default=None)
  parser.add_argument("--budget-gib", type=float, default=None)
  parser.add_argument("--context", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--max-batch", type=int, default=None)
  parser.add_argument("--modes", default=None, help="comma-separated subset: bf16,int4,int4/int2")
  parser.add_argument("--out", default=None, help="JSON path")
  parser.add_argument("--trace", default=None, metavar="DIR",
                      help="profile one more run per cache; print its top GPU kernels")
  args = parser.parse_args(argv)
  bench = CONFIGS[args.config or ("smoke" if args.smoke else "large")]
  changes = {k: getattr(args, k) for k in ("budget_gib", "context", "steps", "repeats",
                                           "max_batch") if getattr(args, k) is not None}
  bench = dataclasses.replace(bench, **changes)
  if args.out:
    out = pathlib.Path(args.out)
  elif os.environ.get("OUT"):
    out = pathlib.Path(os.environ["OUT"]) / "serving.json"
  else:
    out = ROOT / "benchmarks" / "results" / ("serving_smoke.json" if args.smoke else
                                             "serving.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  device = jax.devices()[0].device_kind
  print(f"device {device}; model {bench.model}; context {bench.context}, "
        f"budget {bench.budget_gib} GiB of KV cache", flush=True)

  records = []
  wanted = None if args.modes is None else {m.strip() for m in args.modes.split(",")}
  for name, turbo, kind in modes(bench.model.n_kv_heads):
    if wanted is not None and name.split(" ")[0] not in wanted:
      continue
    rec = bench_mode(bench, name, turbo, kind, seed=0, trace_dir=args.trace)
    records.append(rec)
    print(f"  {name:28s} batch {rec['batch']:5d}  {rec['ms_per_step']:8.2f} ms/step  "
          f"{rec['tokens_per_s']:10.1f} tok/s  ({rec['bytes_per_token_per_layer']:.0f} "
          f"B/token/layer, compile {rec['compile_s']:.0f}s)", flush=True)
  base = next((r for r in records if r["kind"] == "float"), records[0])
  for r in records:
    r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
    r["cache_compression"] = base["bytes_per_token_per_layer"] / r["bytes_per_token_per_layer"]

  lines = ["| cache | batch | B/token/layer | compression | ms/step | tokens/s | speedup |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in records:
    lines.append(f"| {r['mode']} | {r['batch']} | {r['bytes_per_token_per_layer']:.0f} | "
                 f"{r['cache_compression']:.2f}x | {r['ms_per_step']:.2f} | "
                 f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x |")
  table = "\n".join(lines)
  print("\n" + table)
  result = {"bench": dataclasses.asdict(bench), "device": device, "platform": jax.default_backend(),
                "jax": jax.__version__, "turbojax": turbojax.__version__, "records": records,
                "table": table}
  out.write_text(json.dumps(result, indent=2) + "\n")
  png = plot(records, out.with_suffix(".png"))
  print(f"wrote {out}" + (f" and {png}" if png else ""))
  return result


if __name__ == "__main__":
  main()

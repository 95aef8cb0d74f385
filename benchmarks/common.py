"""Timing, FLOP/byte formulas and run metadata shared by the benchmark CLIs."""

from __future__ import annotations

import collections
import csv
import datetime
import json
import pathlib
import statistics
import time

import jax

import turbojax


def time_fn(fn, *args, warmup: int = 3, repeats: int = 20, iters: int = 10) -> dict:
  """Compile time and the median/min per-call time (ms) of ``repeats`` samples,
  each ``iters`` calls queued back to back and blocked on once, so host
  dispatch overlaps the device work as in a serving loop."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_ms = (time.perf_counter() - start) * 1e3
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    outs = [fn(*args) for _ in range(iters)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - start) * 1e3 / iters)
  return {"ms": statistics.median(times), "min_ms": min(times), "compile_ms": compile_ms}


def attention_flops(batch, q_len, kv_len, heads, head_dim, causal) -> float:
  """``4 B Tq Tk H D`` (halved for causal self-attention)."""
  flops = 4.0 * batch * q_len * kv_len * heads * head_dim
  return flops / 2 if causal and q_len == kv_len else flops


def metadata() -> dict:
  device = jax.devices()[0]
  return {"device_kind": device.device_kind, "platform": device.platform,
          "jax": jax.__version__, "turbojax": turbojax.__version__,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_results(rows: list[dict], out_prefix: str | None, meta: dict):
  """``<prefix>.json`` (metadata + rows) and ``<prefix>.csv``; returns the paths."""
  if not out_prefix:
    return []
  prefix = pathlib.Path(out_prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  json_path = prefix.with_suffix(".json")
  json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  csv_path = prefix.with_suffix(".csv")
  keys = sorted({k for r in rows for k in r})
  with csv_path.open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
  return [json_path, csv_path]


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]):
  """Columns: (key, header, format)."""
  print("  ".join(f"{h:>{max(len(h), 9)}s}" for _, h, _ in columns))
  for r in rows:
    cells = []
    for key, header, fmt in columns:
      value = r.get(key)
      width = max(len(header), 9)
      cells.append(f"{'-':>{width}s}" if value is None else f"{value:>{width}{fmt}}")
    print("  ".join(cells))


def device_kernel_times(fn, *args, trace_dir: str, top: int = 12) -> list[tuple[str, float, int]]:
  """Runs ``fn(*args)`` once under ``jax.profiler.trace`` and returns the
  ``top`` device kernels by total time: ``(name, total ms, launches)``.
  Empty where the trace has no GPU stream (e.g. on CPU)."""
  with jax.profiler.trace(trace_dir):
    jax.block_until_ready(fn(*args))
  totals = collections.defaultdict(lambda: [0.0, 0])
  for path in pathlib.Path(trace_dir).rglob("*.xplane.pb"):
    profile = jax.profiler.ProfileData.from_file(str(path))
    for plane in profile.planes:
      if not plane.name.startswith("/device:GPU"):
        continue
      for line in plane.lines:
        if not line.name.startswith("Stream"):
          continue
        for event in line.events:
          totals[event.name][0] += event.duration_ns / 1e6
          totals[event.name][1] += 1
  ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
  return [(name, ms, n) for name, (ms, n) in ranked]

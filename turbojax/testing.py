"""Helpers for tests and benchmarks: inputs and the design's error metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from pallas_kernels import common, packing
from pallas_kernels.reference import PackedKV, ResidualKV
from turbojax.quant import quantize


def random_qkv(seed: int, batch: int, q_len: int, kv_len: int, q_heads: int, kv_heads: int,
               head_dim: int, dtype=jnp.float32, *, k_outliers: bool = False):
  """Unit-normal Q/K/V ``[B, T, N, H]``; with ``k_outliers`` K gets a per-channel
  bias and a few channels scaled 6x (the design's outlier case)."""
  kq, kk, kv, kb = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(kq, (batch, q_len, q_heads, head_dim))
  k = jax.random.normal(kk, (batch, kv_len, kv_heads, head_dim))
  v = jax.random.normal(kv, (batch, kv_len, kv_heads, head_dim))
  if k_outliers:
    k = (k + 2.0 * jax.random.normal(kb, (head_dim,))).at[..., :4].multiply(6.0)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def relative_error(out, ref) -> float:
  """Global ``‖out − ref‖ / ‖ref‖``."""
  out = jnp.asarray(out, jnp.float32)
  ref = jnp.asarray(ref, jnp.float32)
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def row_errors(out, ref):
  """Per-row relative error (each row by its own norm): ``(mean, max)``."""
  out = jnp.asarray(out, jnp.float32)
  ref = jnp.asarray(ref, jnp.float32)
  num = jnp.linalg.norm(out - ref, axis=-1)
  den = jnp.linalg.norm(ref, axis=-1)
  err = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), num)
  return float(jnp.mean(err)), float(jnp.max(err))


def run_json_script(script: str, *, tag: str, timeout: float, threads: int = 8):
  """Runs ``script`` in a fresh CPU-only Python and returns the JSON it printed
  after ``tag`` on its last such line.

  For the Mosaic GPU interpreter: it runs each warpgroup in a thread that blocks
  in XLA host callbacks, and XLA:CPU sizes its executor pool by the CPU count
  unless ``NPROC`` is set; with 2 cores the third warpgroup never starts.
  """
  env = dict(os.environ, NPROC=str(threads), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)
  if proc.returncode:
    raise AssertionError(proc.stderr[-4000:])
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith(tag)][-1]
  return json.loads(line[len(tag):])


def int8_per_token(x):
  """Per-token INT8 codes of ``[..., D]`` and bf16 scales (the scale applied as
  stored), as ``QuantizedKVCache`` keeps K/V."""
  absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / 127, 1.0).astype(jnp.bfloat16)
  codes = jnp.clip(common.round_half_up(x / scale.astype(jnp.float32)), -127, 127)
  return codes.astype(jnp.int8), scale[..., 0]


def _stage2(codes, bits: int, axis: int):
  s2, zero = quantize.stage2_params(codes, bits, axis)
  code = quantize.stage2_encode(codes, s2, zero, bits)
  return code, jnp.squeeze(s2, axis), jnp.squeeze(zero, axis)


def pack_cache(k, v, *, bits: int, group: int) -> PackedKV:
  """Float K/V ``[B, H, T, D]`` -> one bit width's packed cache arrays, with the
  library's stage-1 and stage-2 quantizers (K grouped along tokens per channel,
  V along channels per token), for kernel tests and benchmarks."""
  b, h, t, d = k.shape
  k8, k_scale = int8_per_token(k)
  v8, v_scale = int8_per_token(v)
  k_code, k_s2, k_z = _stage2(k8.reshape(b, h, t // group, group, d), bits, 3)
  gv = min(group, d)
  v_code, v_s2, v_z = _stage2(v8.reshape(b, h, t, d // gv, gv), bits, 4)
  return PackedKV(
      packing.pack(k_code.reshape(b, h, t, d), bits), k_s2, k_z, k_scale,
      packing.pack(v_code.reshape(b, h, t, d), bits), v_s2, v_z, v_scale)


def int8_window(k, v) -> ResidualKV:
  """Float K/V ``[B, H, G, D]`` -> an INT8 residual window."""
  return ResidualKV(*int8_per_token(k), *int8_per_token(v))

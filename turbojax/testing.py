"""Helpers for tests and benchmarks: inputs and the design's error metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp


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

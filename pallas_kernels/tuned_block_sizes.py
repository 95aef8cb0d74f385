"""Checked-in tuned block sizes for the Pallas kernels, with a lookup helper.

Keys are ``(kernel, device_kind, dtype, head_dim, seq_bucket)`` where
``seq_bucket`` is the sequence length rounded up to a power of two (clamped to
``[MIN_BUCKET, MAX_BUCKET]``): the key-sequence length for prefill, the cache
capacity for decode. Values are plain dicts of ``BlockSizes`` fields; each
kernel's ``BlockSizes.get_default`` turns them into its dataclass and falls
back to its own heuristic when no entry is close enough.

Only entries measured on the named device belong here. Each entry notes the
benchmark that produced it (``benchmarks/kernels_gpu.py``; numbers in
``benchmarks/results/gpu_notes.md``).
"""

from __future__ import annotations

import math
from typing import Any

MIN_BUCKET = 128
MAX_BUCKET = 1 << 17

# (kernel, device_kind, dtype, head_dim, seq_bucket) -> BlockSizes fields.
TUNED_BLOCK_SIZES: dict[tuple[str, str, str, int, int], dict[str, Any]] = {
}


def seq_bucket(seq_len: int) -> int:
  """Power-of-two bucket of a sequence length."""
  seq_len = max(int(seq_len), 1)
  return min(max(1 << math.ceil(math.log2(seq_len)), MIN_BUCKET), MAX_BUCKET)


def current_device_kind() -> str | None:
  """``device_kind`` of the default backend's first device (``None`` on CPU)."""
  import jax  # local: this module is plain data plus lookups
  try:
    device = jax.devices()[0]
  except RuntimeError:  # pragma: no cover - no backend at all
    return None
  if device.platform == "cpu":
    return None
  return device.device_kind


def lookup(kernel: str, *, device_kind: str | None, dtype: str, head_dim: int,
           seq_len: int) -> dict[str, Any] | None:
  """The tuned entry for these keys, or the one of the nearest bucket.

  Returns ``None`` when the device, dtype or head_dim was never tuned, so the
  caller uses its heuristic.
  """
  if device_kind is None:
    return None
  bucket = seq_bucket(seq_len)
  exact = TUNED_BLOCK_SIZES.get((kernel, device_kind, dtype, head_dim, bucket))
  if exact is not None:
    return dict(exact)
  candidates = [
      (abs(math.log2(key[4]) - math.log2(bucket)), key)
      for key in TUNED_BLOCK_SIZES
      if key[:4] == (kernel, device_kind, dtype, head_dim)]
  if not candidates:
    return None
  return dict(TUNED_BLOCK_SIZES[min(candidates)[1]])

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

H100_SXM = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
# Devices with the same SM (die, SM count, shared memory) as a tuned one: the
# H200 is the H100's GH100 with larger, faster HBM. Its own entries come
# first; where it has none, the H100's apply (bandwidth-bound kernels such as
# decode may be retuned for it).
SAME_SM_AS = {H200: H100_SXM}

# (kernel, device_kind, dtype, head_dim, seq_bucket) -> BlockSizes fields.
# Decode entries give ``resident_programs`` (programs the GPU runs at once) and
# ``program_overhead_tiles``; the kernel turns them into splits per (batch, KV
# head).
TUNED_BLOCK_SIZES: dict[tuple[str, str, str, int, int], dict[str, Any]] = {
    # benchmarks/kernels_gpu.py --sweep/--final, B2 T4096 H32 D128 (2026-11-23):
    # 64x64 tiles, 4 warps, 3 stages beat 128-row tiles (8 warps) and 128-key
    # tiles by 15-40%; int8 P.V beat f16 P.V by 25%. P rounded to nearest even
    # in its scaling FMA (session 10, not yet timed: 610 SASS instructions per
    # 64x64 tile and thread against 770 for half-up, as on Mosaic GPU where
    # it was measured faster).
    ("flashq_prefill", H100_SXM, "int8", 128, 4096): dict(
        block_q=64, block_k=64, num_warps=4, num_stages=3, pv_dtype="int8",
        p_rounding="nearest_even"),
    # python3 -m pallas_kernels.mosaic_gpu.flashq_prefill (B2 T4096 H32 D128,
    # session 2): P rounded to nearest even with the magic conversions, 1.53 /
    # 0.93 ms non-causal / causal, against 1.81 / 1.17 ms for the defaults
    # (half-up rounding) and 1.72 / 1.04 ms for hardware conversions.
    # Session 5: P.V as a bf16 wgmma accumulating in place, kernel 1019-1028 ->
    # 921 us non-causal, 603 -> 577 us causal (GPU time, B2 T4096 H32 D128).
    ("mosaic_gpu_flashq_prefill", H100_SXM, "int8", 128, 4096): dict(
        p_rounding="nearest_even", pv_dtype="bfloat16"),
    # Session 6, on the H200 (GPU time, B2 H32 D128, T4096 / T16384): P to the
    # bf16 P.V wgmma without INT8 codes and a 3-deep K/V ring, 0.920 -> 0.878
    # ms non-causal, 0.596 -> 0.547 causal; 14.02 -> 13.59 / 7.88 -> 7.19 at
    # 16k (mosaic_gpu_notes.md).
    ("mosaic_gpu_flashq_prefill", H200, "int8", 128, 4096): dict(
        pv_dtype="bfloat16", quantize_p=False, max_concurrent_steps=3),
    # B32 T8192 Hq32 Hkv8 D128 (kernels_gpu.py --sweep, 2026-11-23, session 3,
    # dp4a kernel): 1 warp, 4 K words per Q.K product; qk_words 2 / 8 10% / 20%
    # slower; 2 warps 7% slower. Splits follow a wave model (``get_default``)
    # with 132 SMs x 8 resident programs and 2 tiles of overhead per program,
    # which matches every split count measured (B32 x 8 or 4 heads, 8k cache;
    # B834 x 4 and B1064 x 2 heads, 2176-token cache; gpu_notes.md, session 4).
    ("flashq_decode", H100_SXM, "int4", 128, 8192): dict(
        resident_programs=1056, program_overhead_tiles=2, num_warps=1, num_stages=1,
        qk_words=4),
    ("flashq_decode", H100_SXM, "int2", 128, 8192): dict(
        resident_programs=1056, program_overhead_tiles=2, num_warps=1, num_stages=1,
        qk_words=4),
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
  for device in (device_kind, SAME_SM_AS.get(device_kind)):
    candidates = [
        (abs(math.log2(key[4]) - math.log2(bucket)), key)
        for key in TUNED_BLOCK_SIZES
        if key[:4] == (kernel, device, dtype, head_dim)]
    if candidates:
      return dict(TUNED_BLOCK_SIZES[min(candidates)[1]])
  return None

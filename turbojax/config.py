"""TurboConfig: every choice of the TurboAttention algorithm, as one frozen value."""

from __future__ import annotations

import dataclasses
import math

from pallas_kernels.sas import LOG2_E, SASParams

_SUPPORTED_KV_BITS = (2, 4)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TurboConfig:
  """Configuration of quantized attention (defaults follow the paper and design).

  Attributes:
    exact: plain float attention through the same entry points (A/B checks).
    block_q: query tokens per tile of the XLA path (Q's INT8 scales are per
      token: a per-row factor in every kernel, so they cost nothing).
    block_k: key/value tokens per INT8 scale and per key tile. Pallas
      backends may use their tuned tile instead (the scale follows the tile).
    per_token_scales: one INT8 scale per K token instead of per block of
      ``block_k`` keys (the paper's block-wise scales, the default). Block
      scales let the Mosaic GPU kernel fold K's scale into its exponent: ~10%
      faster there (``benchmarks/results/mosaic_gpu_notes.md``). Per-token
      scales cut the error a little (NumPy model of the design's outlier data,
      with ``qk_migration``: 2.9e-2 -> 2.5e-2).
    smooth_k: subtract K's per-channel mean before quantizing (SageAttention);
      softmax is invariant to it.
    qk_migration: move K's outlier channels into Q before quantizing
      (SmoothQuant: per channel, Q times and K divided by a power of two near
      ``sqrt(max|K| / max|Q|)``; Q.K^T is unchanged). Without it block scales
      miss the design's 4e-2 bound on K-outlier data (4.6-4.8e-2).
    sas_threshold: ``n_r``: weights of scores more than ``n_r`` (natural-log
      units) below the row max are exactly 0. 8 keeps the error at the level
      of INT8 P quantization (``e^-8 = 3e-4``, below half a step of 1/127).
    sas_degree: degree of the SAS polynomial (2 or 3).
    sas_base: 2.0 (table from the float exponent field, what kernels use) or
      ``math.e`` (a gathered table of ``e^-i``, the paper's form).
    sas_dtype: dtype of the polynomial ("bfloat16" or "float16"; "float32"
      for tight kernel-vs-reference checks).
    kv_bits: bits of the packed KV cache for the high-priority heads (4 or 2).
    int2_heads: the number of lowest-priority KV heads stored at 2 bits.
    group_size: tokens per K group and channels per V group of the packed
      cache; the INT8 residual window holds up to ``group_size - 1`` tokens.
    interpret: run Pallas backends in interpret mode (numerics on CPU), and
      ``QuantizedKVCache``'s one-token update with its GPU kernel interpreted.
    batch_axes, head_axes: names of the axes of a mesh set with
      ``jax.set_mesh`` over which the kernels are ``shard_map``-ped (batch and
      heads); names the mesh lacks are ignored.
  """

  exact: bool = False
  block_q: int = 64
  block_k: int = 64
  per_token_scales: bool = False
  smooth_k: bool = True
  qk_migration: bool = True
  sas_threshold: float = 8.0
  sas_degree: int = 3
  sas_base: float = 2.0
  sas_dtype: str = "bfloat16"
  kv_bits: int = 4
  int2_heads: int = 0
  group_size: int = 64
  interpret: bool = False
  batch_axes: tuple[str, ...] = ("data", "fsdp")
  head_axes: tuple[str, ...] = ("model", "tensor")

  def __post_init__(self):
    for name in ("block_q", "block_k", "group_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 8 or value & (value - 1):
        raise ValueError(
            f"TurboConfig.{name} must be a power of two >= 8, got {value!r}")
    if self.kv_bits not in _SUPPORTED_KV_BITS:
      raise ValueError(
          f"TurboConfig.kv_bits must be one of {_SUPPORTED_KV_BITS}, got {self.kv_bits!r}")
    if not isinstance(self.int2_heads, int) or self.int2_heads < 0:
      raise ValueError(
          f"TurboConfig.int2_heads must be a non-negative int, got {self.int2_heads!r}")
    if not (isinstance(self.sas_threshold, (int, float)) and self.sas_threshold > 0):
      raise ValueError(
          f"TurboConfig.sas_threshold must be > 0, got {self.sas_threshold!r}")
    if self.sas_degree not in (2, 3):
      raise ValueError(f"TurboConfig.sas_degree must be 2 or 3, got {self.sas_degree!r}")
    if self.sas_base not in (2.0, math.e):
      raise ValueError(
          f"TurboConfig.sas_base must be 2.0 or math.e, got {self.sas_base!r}")
    if self.sas_dtype not in ("bfloat16", "float16", "float32"):
      raise ValueError(
          "TurboConfig.sas_dtype must be 'bfloat16', 'float16' or 'float32', "
          f"got {self.sas_dtype!r}")

  @property
  def log2_base(self) -> float:
    """Multiplier from natural-log units to the exponent's units."""
    return LOG2_E if self.sas_base == 2.0 else 1.0

  def sas_params(self) -> SASParams:
    """The kernel-level SAS parameters (threshold converted to the base's units)."""
    return SASParams(
        threshold=self.sas_threshold * self.log2_base, degree=self.sas_degree,
        base=self.sas_base, dtype=self.sas_dtype, exact=self.exact)

  def replace(self, **changes) -> "TurboConfig":
    return dataclasses.replace(self, **changes)

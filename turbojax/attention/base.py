"""Types shared by the attention backends (kept apart from the registry)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax

from turbojax.config import TurboConfig

Implementation = Literal["xla", "triton", "mosaic_gpu", "mosaic_tpu"]
Capability = tuple[int, int]  # CUDA compute capability, e.g. (9, 0) for Hopper


class Extras(NamedTuple):
  """Array arguments of a prefill call besides Q/K/V (any may be None)."""

  bias: Any
  mask: Any
  query_seq_lengths: Any
  key_value_seq_lengths: Any
  query_offset: Any


@dataclasses.dataclass(frozen=True)
class Call:
  """Static arguments of an attention call (hashable)."""

  scale: float
  is_causal: bool
  local_window: tuple[int, int] | None
  config: TurboConfig


@dataclasses.dataclass(frozen=True)
class Backend:
  """An implementation: ``prefill(q, k, v, extras, call)`` and
  ``decode(query, cache, call)`` return float32 ``[B, T, N, H]``; either may
  raise ``NotImplementedError`` (with the reason) for inputs it cannot take.
  ``min_compute_capability``: the oldest CUDA GPU it compiles for (``None``: any)."""

  name: str
  platforms: tuple[str, ...]
  prefill: Callable[..., jax.Array]
  decode: Callable[..., jax.Array]
  min_compute_capability: Capability | None = None

  def runs_on_device(self, platform: str, capability: Capability | None) -> bool:
    """Whether the devices meet ``min_compute_capability`` (``None``: unknown, fails)."""
    if platform != "gpu" or self.min_compute_capability is None:
      return True
    return capability is not None and capability >= self.min_compute_capability

  def check_platform(self, platform: str, config: TurboConfig,
                     capability: Capability | None = None) -> None:
    """Raises ``NotImplementedError`` unless this backend compiles for ``platform``
    (with ``capability``, see ``compute_capability``) or runs interpreted."""
    if config.interpret:
      return
    if platform not in self.platforms:
      raise NotImplementedError(
          f"implementation={self.name!r} runs on {'/'.join(self.platforms)}, not on "
          f"{platform!r} (TurboConfig(interpret=True) runs it interpreted)")
    if not self.runs_on_device(platform, capability):
      found = "unknown" if capability is None else ".".join(map(str, capability))
      need = ".".join(map(str, self.min_compute_capability))
      raise NotImplementedError(
          f"implementation={self.name!r} needs a GPU of compute capability >= {need} "
          f"(found {found})")


def parse_compute_capability(value) -> Capability | None:
  """``"9.0"`` -> ``(9, 0)``; ``None`` for anything else (e.g. a non-CUDA device)."""
  match = re.match(r"(\d+)\.(\d+)", str(value))
  return None if match is None else (int(match[1]), int(match[2]))


def compute_capability(platform: str) -> Capability | None:
  """The lowest compute capability of the local ``platform`` devices: ``None``
  off GPU or when a device reports none (ROCm)."""
  if platform != "gpu":
    return None
  try:
    devices = jax.local_devices(backend=platform)
  except RuntimeError:  # pragma: no cover - no such backend
    return None
  caps = [parse_compute_capability(getattr(d, "compute_capability", None)) for d in devices]
  return None if not caps or None in caps else min(caps)

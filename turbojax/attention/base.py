"""Types shared by the attention backends (kept apart from the registry)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax

from turbojax.config import TurboConfig

Implementation = Literal["xla", "triton", "mosaic_tpu"]


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
  raise ``NotImplementedError`` (with the reason) for inputs it cannot take."""

  name: str
  platforms: tuple[str, ...]
  prefill: Callable[..., jax.Array]
  decode: Callable[..., jax.Array]

  def check_platform(self, platform: str, config: TurboConfig) -> None:
    if config.interpret or platform in self.platforms:
      return
    raise NotImplementedError(
        f"implementation={self.name!r} runs on {'/'.join(self.platforms)}, not on "
        f"{platform!r} (TurboConfig(interpret=True) runs it interpreted)")

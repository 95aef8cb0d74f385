"""Backend registry and dispatch: the implementations behind ``implementation=``.

Pallas backends register when their kernels import; the default order for a
platform always ends in the pure-JAX ``"xla"`` path, so every platform works.
On GPUs ``"mosaic_gpu"`` (Hopper wgmma, measured 1.4-1.6x faster than the
Triton prefill) leads where the devices are sm_90+; elsewhere it is left out
of the default order silently (``default_order``), not tried and warned about.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable

from turbojax.attention import xla
from turbojax.attention.base import (  # noqa: F401
    Backend, Call, Capability, Extras, Implementation, compute_capability)

KNOWN = ("xla", "triton", "mosaic_gpu", "mosaic_tpu")  # every name some build may have


def _registry() -> types.MappingProxyType:
  backends = {"xla": xla.BACKEND}
  try:  # Pallas is part of jax, but a stripped build may lack a backend.
    from turbojax.attention import pallas_backends
    backends["triton"] = pallas_backends.TRITON
    if pallas_backends.MOSAIC_GPU is not None:  # None without Pallas Mosaic GPU
      backends["mosaic_gpu"] = pallas_backends.MOSAIC_GPU
    backends["mosaic_tpu"] = pallas_backends.MOSAIC_TPU
  except ImportError:
    pass
  return types.MappingProxyType(backends)


BACKENDS = _registry()  # read-only: name -> Backend, for what imports here


DEFAULT_ORDER = {"gpu": ("mosaic_gpu", "triton", "xla"), "tpu": ("mosaic_tpu", "xla")}


def default_order(platform: str, capability: Capability | None = None) -> list[str]:
  """``DEFAULT_ORDER`` for ``platform`` less the backends this build lacks and
  those the devices (compute ``capability``, ``None``: unknown) cannot run:
  ``"mosaic_gpu"`` leads on Hopper or newer, ``"triton"`` on older GPUs."""
  return [n for n in DEFAULT_ORDER.get(platform, ("xla",))
          if n in BACKENDS and BACKENDS[n].runs_on_device(platform, capability)]


def resolve(implementation, platform: str,
            capability: Capability | None = None) -> tuple[list[str], bool]:
  """Candidate names and whether the choice is a single explicit one."""
  if implementation is None:
    return default_order(platform, capability), False
  if isinstance(implementation, str):
    names, explicit = [implementation], True
  else:
    names, explicit = list(implementation), False
    if not names:
      raise ValueError("implementation must be a name or a non-empty sequence of names")
  for name in names:
    if name not in BACKENDS:
      hint = "" if name in KNOWN else f"; known names: {', '.join(KNOWN)}"
      raise ValueError(
          f"implementation={name!r} is not available here (available: "
          f"{', '.join(BACKENDS)}){hint}")
  return names, explicit


def dispatch(implementation, config, run: Callable[[str], object]):
  """Runs ``run(name)`` for the resolved implementations: one explicit name
  fails fast; otherwise ``NotImplementedError`` falls through to the next
  (with a warning), and an ``ExceptionGroup`` is raised if none ran."""
  import jax
  platform = jax.default_backend()
  capability = compute_capability(platform)
  names, explicit = resolve(implementation, platform, capability)
  errors = []
  for name in names:
    try:
      BACKENDS[name].check_platform(platform, config, capability)
      return run(name)
    except NotImplementedError as e:
      if explicit:
        raise
      errors.append(e)
      if name != names[-1]:
        warnings.warn(f"turbojax: implementation {name!r} unavailable ({e}); falling back",
                      stacklevel=3)
  raise ExceptionGroup("no turbojax implementation could run this attention", errors)

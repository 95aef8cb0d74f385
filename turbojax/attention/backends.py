"""Backend registry and dispatch: the implementations behind ``implementation=``.

Pallas backends register when their kernels import; the default order for a
platform always ends in the pure-JAX ``"xla"`` path, so every platform works.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable

from turbojax.attention import xla
from turbojax.attention.base import Backend, Call, Extras, Implementation  # noqa: F401


def _registry() -> types.MappingProxyType:
  backends = {"xla": xla.BACKEND}
  try:  # Pallas is part of jax, but a stripped build may lack a backend.
    from turbojax.attention import pallas_backends
    backends["triton"] = pallas_backends.TRITON
    backends["mosaic_tpu"] = pallas_backends.MOSAIC_TPU
  except ImportError:
    pass
  return types.MappingProxyType(backends)


BACKENDS = _registry()  # read-only: name -> Backend, for what imports here


DEFAULT_ORDER = {"gpu": ("triton", "xla"), "tpu": ("mosaic_tpu", "xla")}


def resolve(implementation, platform: str) -> tuple[list[str], bool]:
  """Candidate names and whether the choice is a single explicit one."""
  if implementation is None:
    names = [n for n in DEFAULT_ORDER.get(platform, ("xla",)) if n in BACKENDS]
    return names, False
  if isinstance(implementation, str):
    names, explicit = [implementation], True
  else:
    names, explicit = list(implementation), False
    if not names:
      raise ValueError("implementation must be a name or a non-empty sequence of names")
  for name in names:
    if name not in BACKENDS:
      known = ("xla", "triton", "mosaic_tpu")
      hint = "" if name in known else f"; known names: {', '.join(known)}"
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
  names, explicit = resolve(implementation, platform)
  errors = []
  for name in names:
    try:
      BACKENDS[name].check_platform(platform, config)
      return run(name)
    except NotImplementedError as e:
      if explicit:
        raise
      errors.append(e)
      if name != names[-1]:
        warnings.warn(f"turbojax: implementation {name!r} unavailable ({e}); falling back",
                      stacklevel=3)
  raise ExceptionGroup("no turbojax implementation could run this attention", errors)

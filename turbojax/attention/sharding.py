"""Runs attention under ``jax.shard_map`` over batch and heads of the current mesh.

Pallas kernels cannot be partitioned by XLA's sharding propagation, so with a
mesh set (``jax.set_mesh``) the dispatch maps the backend over the shards:
batch over ``config.batch_axes``, heads over ``config.head_axes`` (GQA groups
stay whole because query and KV heads split into the same number of blocks).
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from turbojax.config import TurboConfig


def mesh_axes(config: TurboConfig):
  """``(mesh, batch_axes, head_axes)`` present in the current mesh, or ``None``."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  names = set(mesh.axis_names)
  batch = tuple(a for a in config.batch_axes if a in names)
  heads = tuple(a for a in config.head_axes if a in names)
  if not batch and not heads:
    return None
  return mesh, batch, heads


def _size(mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _spec(axes):
  return axes if axes else None


def check_divisible(mesh, batch_axes, head_axes, batch: int, heads: dict[str, int]):
  nb = _size(mesh, batch_axes)
  if batch % nb:
    raise ValueError(f"batch ({batch}) must be divisible by the mesh axes {batch_axes} "
                     f"({nb} devices) to shard attention")
  nh = _size(mesh, head_axes)
  for name, h in heads.items():
    if h % nh:
      raise ValueError(f"{name} ({h}) must be divisible by the mesh axes {head_axes} "
                       f"({nh} devices) to shard attention")


def bthd(batch_axes, head_axes) -> P:
  """Spec of a ``[B, T, N, H]`` array."""
  return P(_spec(batch_axes), None, _spec(head_axes), None)


def bias_like(x, batch_axes, head_axes) -> P | None:
  """Spec of a ``[B|1, N|1, T, S]`` bias or mask (broadcast dims replicated)."""
  if x is None:
    return None
  return P(_spec(batch_axes) if x.shape[0] > 1 else None,
           _spec(head_axes) if x.shape[1] > 1 else None, None, None)


def per_batch(x, batch_axes) -> P | None:
  """Spec of a ``[B]`` array (or a replicated scalar)."""
  if x is None:
    return None
  return P(_spec(batch_axes)) if getattr(x, "ndim", 0) == 1 else P()


def shard(fn, mesh, in_specs, out_specs):
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

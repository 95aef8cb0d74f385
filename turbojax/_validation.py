"""Input checks at the public boundary: errors name the argument, the value
received and what was expected, before any kernel sees the input."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from turbojax.quant import PQArray, QArray

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_array(name: str, x, *, rank: int | None = None, floating: bool = True):
  if isinstance(x, (QArray, PQArray)):
    shape, dtype = x.shape, None
  else:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    shape, dtype = x.shape, x.dtype
  if rank is not None and len(shape) != rank:
    raise ValueError(
        f"{name} must have rank {rank} [batch, seq, heads, head_dim], got shape {tuple(shape)}")
  if floating and dtype is not None and dtype not in [jnp.dtype(d) for d in FLOAT_DTYPES]:
    raise TypeError(
        f"{name} must be float32, bfloat16 or float16, got dtype {jnp.dtype(dtype).name}")
  return tuple(shape)


def check_qkv(query, key, value):
  """Shapes of Q/K/V ``[B, T, N, H]``: matching batch/head_dim, GQA head counts."""
  qs = check_array("query", query, rank=4)
  ks = check_array("key", key, rank=4)
  vs = check_array("value", value, rank=4)
  if ks != vs:
    raise ValueError(f"key and value must have the same shape, got key {ks} and value {vs}")
  if qs[0] != ks[0]:
    raise ValueError(f"query and key must have the same batch size, got {qs[0]} and {ks[0]}")
  if qs[3] != ks[3]:
    raise ValueError(f"query and key must have the same head_dim, got {qs[3]} and {ks[3]}")
  if qs[2] % ks[2]:
    raise ValueError(
        f"query heads ({qs[2]}) must be a multiple of key/value heads ({ks[2]}) for GQA/MQA")
  dtypes = {getattr(x, "dtype", None) for x in (query, key, value)} - {None}
  if len(dtypes) > 1:
    raise TypeError(
        "query, key and value must share a dtype, got "
        + ", ".join(jnp.dtype(getattr(x, 'dtype', 'float32')).name for x in (query, key, value)))
  return qs, ks


def check_lengths(name: str, lengths, batch: int, max_len: int):
  if lengths is None:
    return None
  lengths = jnp.asarray(lengths)
  if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(
        f"{name} must be an int array of shape ({batch},), got "
        f"{lengths.dtype.name} {tuple(lengths.shape)}")
  if is_concrete(lengths):
    values = np.asarray(lengths)
    if (values < 0).any() or (values > max_len).any():
      raise ValueError(f"{name} must lie in [0, {max_len}], got {values.tolist()}")
  return lengths.astype(jnp.int32)


def check_broadcast(name: str, x, target, *, boolean: bool):
  if x is None:
    return None
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"{name} must have rank 4, broadcastable to {target}, got shape {x.shape}")
  try:
    jnp.broadcast_shapes(x.shape, target)
  except ValueError:
    raise ValueError(f"{name} of shape {x.shape} does not broadcast to {target}") from None
  if boolean and x.dtype != jnp.bool_:
    raise TypeError(f"{name} must be a boolean array, got dtype {x.dtype.name}")
  if not boolean and not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype.name}")
  return x


def check_window(local_window_size):
  if local_window_size is None:
    return None
  if isinstance(local_window_size, int):
    local_window_size = (local_window_size, local_window_size)
  window = tuple(local_window_size)
  if len(window) != 2 or any(not isinstance(w, int) or w < 0 for w in window):
    raise ValueError(
        "local_window_size must be a non-negative int or a (left, right) pair of them, "
        f"got {local_window_size!r}")
  return window


def check_scale(scale, head_dim: int) -> float:
  """The logit scale as a Python float (``1 / sqrt(head_dim)`` for ``None``):
  the kernels fold it into Q's scales at trace time, so it must be concrete."""
  if scale is None:
    return 1.0 / math.sqrt(head_dim)
  try:
    if isinstance(scale, (str, bytes)) or not is_concrete(scale):
      raise TypeError
    value = float(scale)
  except (TypeError, ValueError):
    raise TypeError(f"scale must be a real number (a Python or concrete scalar) or None, "
                    f"got {scale!r}") from None
  if not math.isfinite(value):
    raise ValueError(f"scale must be finite, got {value}")
  return value

"""QuantizedKVCache: a progressive INT4/INT2 KV cache with head-wise mixed precision.

Every token enters as INT8 (stage 1: per token and head, bf16 scale, K minus
the prefill's per-channel mean). The newest ``lengths % group_size`` tokens
stay INT8 in a residual window; when a group of ``group_size`` tokens fills,
it is packed to INT4/INT2 (stage 2) with integer scales and zero points by
integer arithmetic alone: K grouped along tokens per channel, V along
channels per token (KIVI). The ``int2_heads`` lowest-priority KV heads
(TurboAttention's range x std-of-ranges priority, fixed by the first update)
store INT2, the others ``kv_bits``. Heads live in *slot order* (high-bit heads
first) so each bit width is one dense array; ``head_perm`` maps slots to heads.

A chunked update and the same tokens one at a time give bit-identical caches.
A one-token update (a decoding step) runs ``pallas_kernels.gpu.append_token``
on CUDA, which packs each sequence's window when its token fills it, with no
``lax.cond`` (whose predicate XLA:GPU reads back on the host in every layer).
Overflow: outside ``jit``, an update past ``max_len`` raises ``ValueError``;
inside ``jit`` the tokens past capacity are dropped, earlier tokens are never
touched, and the sticky per-sequence flag ``overflow`` is set.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels import packing
from pallas_kernels.gpu import append_token
from pallas_kernels.reference import PackedKV, ResidualKV, unpack_keys, unpack_values
from turbojax import _validation as v
from turbojax.attention import sharding
from turbojax.config import TurboConfig
from turbojax.quant import quantize as Q

SCALE_DTYPE = jnp.bfloat16


def _segment_layout(num_kv_heads: int, config: TurboConfig):
  """``((bits, heads), ...)`` in slot order: high-bit heads, then INT2 heads."""
  if config.int2_heads > num_kv_heads:
    raise ValueError(
        f"TurboConfig.int2_heads ({config.int2_heads}) exceeds num_kv_heads ({num_kv_heads})")
  n2 = num_kv_heads if config.kv_bits == 2 else config.int2_heads
  layout = [(config.kv_bits, num_kv_heads - n2), (2, n2)]
  return tuple((b, h) for b, h in layout if h > 0)


def _channel_group(head_dim: int, group_size: int) -> int:
  return min(group_size, head_dim)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("segments", "residuals", "k_mean", "head_perm", "lengths", "overflow",
                 "calibrated"),
    meta_fields=("segment_bits", "segment_heads", "max_len", "head_dim", "config"))
@dataclasses.dataclass(frozen=True)
class QuantizedKVCache:
  """Progressive quantized KV cache of one attention layer (a pytree).

  Attributes:
    segments: one ``PackedKV`` per bit width, heads in slot order.
    residuals: the INT8 window, one ``ResidualKV`` ``[B, h, G, D]`` per
      segment (its ``h`` heads), so a kernel reads a segment's window in place.
    k_mean: f32 ``[B, Hk, D]``, K's per-channel mean (smoothing), slot order.
    head_perm: int32 ``[Hk]``, the original head of each slot.
    lengths: int32 ``[B]``, tokens stored per sequence (ragged batches).
    overflow: bool ``[B]``, set when an update under ``jit`` exceeded capacity.
    calibrated: bool ``[]``, whether the head order has been fixed.
  """

  segments: tuple[PackedKV, ...]
  residuals: tuple[ResidualKV, ...]
  k_mean: jax.Array
  head_perm: jax.Array
  lengths: jax.Array
  overflow: jax.Array
  calibrated: jax.Array
  segment_bits: tuple[int, ...]
  segment_heads: tuple[int, ...]
  max_len: int
  head_dim: int
  config: TurboConfig

  # --- construction -----------------------------------------------------------------------
  @classmethod
  def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
           config: TurboConfig | None = None) -> "QuantizedKVCache":
    """An empty cache for ``max_len`` tokens (rounded up to ``group_size``)."""
    config = TurboConfig() if config is None else config
    for name, value in (("batch", batch), ("max_len", max_len),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    g = config.group_size
    cg = _channel_group(head_dim, g)
    if head_dim % cg or head_dim % 4:
      raise ValueError(
          f"head_dim ({head_dim}) must be a multiple of 4 and of min(group_size, head_dim)"
          f" ({cg})")
    capacity = -(-max_len // g) * g
    layout = _segment_layout(num_kv_heads, config)
    segments = []
    for bits, h in layout:
      width = head_dim * bits // 8
      segments.append(PackedKV(
          k_codes=jnp.zeros((batch, h, capacity, width), jnp.uint8),
          k_scale2=jnp.ones((batch, h, capacity // g, head_dim), jnp.uint8),
          k_zero=jnp.zeros((batch, h, capacity // g, head_dim), jnp.int8),
          k_scale=jnp.ones((batch, h, capacity), SCALE_DTYPE),
          v_codes=jnp.zeros((batch, h, capacity, width), jnp.uint8),
          v_scale2=jnp.ones((batch, h, capacity, head_dim // cg), jnp.uint8),
          v_zero=jnp.zeros((batch, h, capacity, head_dim // cg), jnp.int8),
          v_scale=jnp.ones((batch, h, capacity), SCALE_DTYPE)))
    residuals = tuple(ResidualKV(
        k=jnp.zeros((batch, h, g, head_dim), jnp.int8),
        k_scale=jnp.ones((batch, h, g), SCALE_DTYPE),
        v=jnp.zeros((batch, h, g, head_dim), jnp.int8),
        v_scale=jnp.ones((batch, h, g), SCALE_DTYPE)) for _, h in layout)
    return cls(
        segments=tuple(segments), residuals=residuals,
        k_mean=jnp.zeros((batch, num_kv_heads, head_dim), jnp.float32),
        head_perm=jnp.arange(num_kv_heads, dtype=jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32), overflow=jnp.zeros((batch,), jnp.bool_),
        calibrated=jnp.zeros((), jnp.bool_),
        segment_bits=tuple(b for b, _ in layout), segment_heads=tuple(h for _, h in layout),
        max_len=capacity, head_dim=head_dim, config=config)

  # --- properties ---------------------------------------------------------------------------
  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  @property
  def num_kv_heads(self) -> int:
    return self.head_perm.shape[0]

  @property
  def group_size(self) -> int:
    return self.config.group_size

  @property
  def nbytes(self) -> int:
    """Bytes of every array: codes, scales, zero points, residual, lengths, flags."""
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self)))

  @property
  def mixed(self) -> bool:
    """Whether heads store different bit widths (else ``head_perm`` stays the identity)."""
    return len(self.segment_bits) > 1

  @property
  def segment_slices(self) -> tuple[slice, ...]:
    """Each segment's KV-head slots (the slot order of ``head_perm``)."""
    bounds = np.cumsum((0,) + self.segment_heads).tolist()
    return tuple(slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]))

  def head_bits(self) -> jax.Array:
    """Bits per original KV head, int32 ``[Hk]``."""
    slot_bits = np.repeat(self.segment_bits, self.segment_heads)
    return jnp.zeros((self.num_kv_heads,), jnp.int32).at[self.head_perm].set(slot_bits)

  # --- update -------------------------------------------------------------------------------
  def update(self, key: jax.Array, value: jax.Array, *,
             new_lengths: jax.Array | None = None) -> "QuantizedKVCache":
    """Appends ``key``/``value`` ``[B, L, Hk, D]`` (the first ``new_lengths[b]``
    tokens of each sequence; default all ``L``) and returns the new cache."""
    b, l = self._check_update(key, value, new_lengths)
    n = jnp.full((b,), l, jnp.int32) if new_lengths is None else jnp.asarray(new_lengths, jnp.int32)
    room = self.max_len - self.lengths
    n_kept = jnp.clip(n, 0, room)
    config = self.config

    # Head order and smoothing mean: fixed by the first update (the prefill).
    n2 = sum(h for bits, h in zip(self.segment_bits, self.segment_heads) if bits == 2)
    key, value = key.astype(jnp.float32), value.astype(jnp.float32)
    perm = self.head_perm
    if self.mixed:
      bits = Q.assign_head_bits(Q.head_priority(key, lengths=n_kept), n2,
                                high_bits=self.segment_bits[0])
      perm = jnp.where(self.calibrated, self.head_perm, Q.head_order(bits))
      key, value = jnp.take(key, perm, axis=2), jnp.take(value, perm, axis=2)
    valid = (jnp.arange(l)[None, :] < n_kept[:, None])[:, :, None, None]
    if config.smooth_k:
      new_mean = jnp.sum(jnp.where(valid, key, 0.0), axis=1) / jnp.maximum(n_kept, 1)[:, None, None]
      k_mean = jnp.where((self.lengths == 0)[:, None, None], new_mean, self.k_mean)
    else:
      k_mean = self.k_mean
    key = key - k_mean[:, None]

    k8 = Q.quantize_int8_sym(key, channelwise_axes=(0, 1, 2), scale_dtype=SCALE_DTYPE)
    v8 = Q.quantize_int8_sym(value, channelwise_axes=(0, 1, 2), scale_dtype=SCALE_DTYPE)
    new = ResidualKV(  # [B, Hk, L, ...], the residual's layout
        k=jnp.swapaxes(k8.qvalue, 1, 2), k_scale=jnp.swapaxes(k8.scale[..., 0], 1, 2),
        v=jnp.swapaxes(v8.qvalue, 1, 2), v_scale=jnp.swapaxes(v8.scale[..., 0], 1, 2))
    kept = jnp.arange(l)[None, None, :] < n_kept[:, None, None]  # dropped tokens leave no trace
    new = ResidualKV(*(_clear_unused(x, kept) for x in new))
    new = tuple(ResidualKV(*(x[:, sl] for x in new)) for sl in self.segment_slices)

    def with_cond():
      # Packing is the costly part; most single-token steps fill no group, and
      # then only the residual window changes (a batch-wide cond, not a select).
      fills = jnp.any(self.lengths % self.group_size + n_kept >= self.group_size)
      return jax.lax.cond(
          fills,
          lambda: jax.vmap(self._append_one)(self.segments, self.residuals, new, self.lengths,
                                             n_kept),
          lambda: (self.segments, jax.vmap(self._append_to_window)(
              self.residuals, new, self.lengths)))

    if l == 1 and append_token.supports(head_dim=self.head_dim, group=self.group_size):
      # A decoding step: on GPU a kernel decides per sequence (no host sync).
      # ``config.interpret`` runs that kernel interpreted on other platforms.
      segments, residuals = jax.lax.platform_dependent(
          cuda=lambda: self._append_token(new, n_kept),
          default=(lambda: self._append_token(new, n_kept, interpret=True))
          if config.interpret else with_cond)
    else:
      segments, residuals = with_cond()
    return dataclasses.replace(
        self, segments=segments, residuals=residuals, k_mean=k_mean, head_perm=perm,
        lengths=self.lengths + n_kept, overflow=self.overflow | (n_kept < n),
        calibrated=jnp.ones((), jnp.bool_))

  def _check_update(self, key, value, new_lengths):
    ks = v.check_array("key", key, rank=4)
    vs = v.check_array("value", value, rank=4)
    expected = (self.batch, ks[1], self.num_kv_heads, self.head_dim)
    for name, shape in (("key", ks), ("value", vs)):
      if shape != expected:
        raise ValueError(
            f"{name} must have shape [batch={self.batch}, seq, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}], got {shape}")
    if key.dtype != value.dtype:
      raise TypeError(f"key and value must share a dtype, got {key.dtype} and {value.dtype}")
    if new_lengths is not None:
      new_lengths = v.check_lengths("new_lengths", new_lengths, self.batch, ks[1])
    if v.is_concrete(self.lengths) and (new_lengths is None or v.is_concrete(new_lengths)):
      n = np.full(self.batch, ks[1]) if new_lengths is None else np.asarray(new_lengths)
      total = np.asarray(self.lengths) + n
      if (total > self.max_len).any():
        raise ValueError(
            f"cache overflow: lengths {np.asarray(self.lengths).tolist()} + new tokens "
            f"{n.tolist()} exceed max_len={self.max_len}")
    return self.batch, ks[1]

  def _append_token(self, new, n_kept, *, interpret: bool = False):
    """One token per sequence with ``pallas_kernels.gpu.append_token``: the
    same packed groups as ``_append_one`` (unused window slots keep stale
    tokens instead of being reset; nothing reads them)."""
    def run(segments, residuals, new, lengths, n_kept):
      out = [append_token.append_token(seg, res, nw, lengths, n_kept, bits=bits,
                                       group=self.group_size, interpret=interpret)
             for seg, res, nw, bits in zip(segments, residuals, new, self.segment_bits)]
      return tuple(s for s, _ in out), tuple(r for _, r in out)

    args = (self.segments, self.residuals, new, self.lengths, n_kept)
    axes = sharding.mesh_axes(self.config)
    if axes is not None and axes[1]:  # a kernel is not partitioned by XLA: map it over batch
      mesh, batch_axes, _ = axes
      sharding.check_divisible(mesh, batch_axes, (), self.batch, {})
      specs = jax.tree_util.tree_map(lambda _: P(batch_axes), args)
      run = sharding.shard(run, mesh, specs, specs[:2])
    return run(*args)

  def _append_to_window(self, residuals, new, length):
    """One sequence whose new tokens all fit in the residual window (no group
    fills): written into their slots, in place when the cache is donated
    (dropped tokens, already cleared, may land in unused slots or past the end)."""
    slots = length % self.group_size + jnp.arange(new[0].k.shape[1])
    def put(x, y):  # distinct, ascending slots: a plain store, no atomics
      return x.at[:, slots].set(y, mode="drop", unique_indices=True, indices_are_sorted=True)
    return tuple(ResidualKV(*(put(x, y) for x, y in zip(res, nw)))
                 for res, nw in zip(residuals, new))

  def _append_one(self, segments, residuals, new, length, n):
    """One sequence: residual + new tokens -> packed full groups + new residual."""
    g = self.group_size
    l = new[0].k.shape[1]
    span = g + (-(-l // g)) * g
    r = length % g
    first_group = length // g

    n_groups = span // g
    full = (jnp.arange(n_groups) + 1) * g <= r + n
    group_idx = jnp.where(full, first_group + jnp.arange(n_groups), self.max_len // g)
    token_idx = (group_idx[:, None] * g + jnp.arange(g)).reshape(-1)
    n_full = (r + n) // g
    new_segments, new_residuals = [], []
    for seg, res, seg_new, bits in zip(segments, residuals, new, self.segment_bits):
      buf = _merge_window(res, seg_new, r, span)
      packed = _pack_groups(buf.k, buf.v, bits, g, _channel_group(self.head_dim, g))
      k_codes, k_scale2, k_zero, v_codes, v_scale2, v_zero = packed
      new_segments.append(PackedKV(
          k_codes=seg.k_codes.at[:, token_idx].set(k_codes, mode="drop"),
          k_scale2=seg.k_scale2.at[:, group_idx].set(k_scale2, mode="drop"),
          k_zero=seg.k_zero.at[:, group_idx].set(k_zero, mode="drop"),
          k_scale=seg.k_scale.at[:, token_idx].set(buf.k_scale, mode="drop"),
          v_codes=seg.v_codes.at[:, token_idx].set(v_codes, mode="drop"),
          v_scale2=seg.v_scale2.at[:, token_idx].set(v_scale2, mode="drop"),
          v_zero=seg.v_zero.at[:, token_idx].set(v_zero, mode="drop"),
          v_scale=seg.v_scale.at[:, token_idx].set(buf.v_scale, mode="drop")))
      new_residuals.append(ResidualKV(
          *(jax.lax.dynamic_slice_in_dim(x, n_full * g, g, axis=1) for x in buf)))
    return tuple(new_segments), tuple(new_residuals)

  # --- checks -------------------------------------------------------------------------------
  def dequantize(self) -> tuple[jax.Array, jax.Array]:
    """Float32 ``(key, value)`` ``[B, max_len, Hk, D]`` as the cache stores them
    (original head order, mean added back, zero past each length)."""
    g = self.group_size
    ks, vs = [], []
    for seg, bits in zip(self.segments, self.segment_bits):
      ks.append(unpack_keys(seg, bits, g).astype(jnp.float32)
                * seg.k_scale.astype(jnp.float32)[..., None])
      vs.append(unpack_values(seg, bits, g).astype(jnp.float32)
                * seg.v_scale.astype(jnp.float32)[..., None])
    k_packed, v_packed = jnp.concatenate(ks, axis=1), jnp.concatenate(vs, axis=1)
    res = ResidualKV(*(jnp.concatenate(xs, axis=1) for xs in zip(*self.residuals)))
    k_res = res.k.astype(jnp.float32) * res.k_scale.astype(jnp.float32)[..., None]
    v_res = res.v.astype(jnp.float32) * res.v_scale.astype(jnp.float32)[..., None]

    def place(packed, window, length):  # [Hk, T, D]: the window after the packed part
      buf = jnp.concatenate([packed, jnp.zeros_like(window)], axis=1)
      buf = jax.lax.dynamic_update_slice_in_dim(buf, window, (length // g) * g, axis=1)
      valid = jnp.arange(self.max_len) < length
      return jnp.where(valid[None, :, None], buf[:, :self.max_len], 0.0)

    k = jax.vmap(place)(k_packed, k_res, self.lengths)
    val = jax.vmap(place)(v_packed, v_res, self.lengths)
    valid = (jnp.arange(self.max_len)[None, :] < self.lengths[:, None])[:, None, :, None]
    k = jnp.where(valid, k + self.k_mean[:, :, None, :], 0.0)
    inverse = jnp.argsort(self.head_perm)
    k = jnp.take(k, inverse, axis=1)
    val = jnp.take(val, inverse, axis=1)
    return jnp.swapaxes(k, 1, 2), jnp.swapaxes(val, 1, 2)


def _merge_window(residual: ResidualKV, new: ResidualKV, r, span: int) -> ResidualKV:
  """``[Hk, span, ...]`` buffers: the window's tokens, then the new tokens from slot ``r``."""
  def merge(res_x, new_x):
    buf = jnp.full(res_x.shape[:1] + (span,) + res_x.shape[2:], _fill(res_x), res_x.dtype)
    buf = jax.lax.dynamic_update_slice_in_dim(buf, res_x, 0, axis=1)
    return jax.lax.dynamic_update_slice_in_dim(buf, new_x, r, axis=1)
  return ResidualKV(*(merge(a, b) for a, b in zip(residual, new)))


def _fill(x):
  """Content of unused token slots: codes 0, scales 1 (never a zero scale)."""
  return 0 if x.dtype == jnp.int8 else 1


def _clear_unused(x, kept):
  """Sets the token slots where ``kept`` ([B, H, L]) is False to ``_fill``."""
  kept = kept if x.ndim == kept.ndim else kept[..., None]
  return jnp.where(kept, x, jnp.asarray(_fill(x), x.dtype))


def _pack_groups(k8, v8, bits: int, group: int, channel_group: int):
  """Stage 2 of whole groups: ``[H, n*G, D]`` INT8 K/V -> packed codes and params."""
  h, t, d = k8.shape
  kg = k8.reshape(h, t // group, group, d)
  k_scale2, k_zero = Q.stage2_params(kg, bits, axis=2)
  k_codes = Q.stage2_encode(kg, k_scale2, k_zero, bits).reshape(h, t, d)
  vg = v8.reshape(h, t, d // channel_group, channel_group)
  v_scale2, v_zero = Q.stage2_params(vg, bits, axis=3)
  v_codes = Q.stage2_encode(vg, v_scale2, v_zero, bits).reshape(h, t, d)
  return (packing.pack(k_codes, bits), k_scale2[:, :, 0], k_zero[:, :, 0],
          packing.pack(v_codes, bits), v_scale2[..., 0], v_zero[..., 0])

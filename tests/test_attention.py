"""turbojax.dot_product_attention against jax.nn.dot_product_attention (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import turbojax
from pallas_kernels.gpu.quantize import channel_stats_reference
from turbojax.attention import prepare
from turbojax.attention.exact import structured_keep
from turbojax.testing import random_qkv, relative_error, row_errors

# (batch, q_len, kv_len, q_heads, kv_heads, head_dim, causal)
CASES = [
    (1, 128, 128, 4, 4, 128, False),
    (1, 128, 128, 4, 4, 128, True),
    (2, 123, 250, 8, 2, 64, True),    # GQA 4:1, lengths off the tiles, Tq != Tk
    (1, 250, 123, 4, 1, 64, False),   # MQA, Tq > Tk
    (1, 64, 256, 4, 2, 128, False),
]


def _ids(case):
  b, tq, tk, hq, hk, d, causal = case
  return f"{b=}_{tq=}_{tk=}_{hq=}_{hk=}_{d=}_{causal=}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("outliers, bound", [(False, 2.5e-2), (True, 4e-2)],
                         ids=["unit_normal", "k_outliers"])
def test_accuracy_vs_jax_nn(case, outliers, bound):
  b, tq, tk, hq, hk, d, causal = case
  q, k, v = random_qkv(0, b, tq, tk, hq, hk, d, k_outliers=outliers)
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  out = jax.jit(lambda q, k, v: turbojax.dot_product_attention(q, k, v, is_causal=causal))(q, k, v)
  err = relative_error(out, ref)
  mean_row, max_row = row_errors(out, ref)
  print(f"{_ids(case)} outliers={outliers}: global {err:.2e}, rows mean {mean_row:.2e} "
        f"max {max_row:.2e}")
  assert out.shape == q.shape and out.dtype == q.dtype
  assert err <= bound


@pytest.mark.parametrize("case", CASES[:3], ids=_ids)
def test_exact_mode_matches_jax_nn(case):
  b, tq, tk, hq, hk, d, causal = case
  q, k, v = random_qkv(1, b, tq, tk, hq, hk, d)
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  out = turbojax.dot_product_attention(q, k, v, is_causal=causal,
                                       config=turbojax.TurboConfig(exact=True))
  assert relative_error(out, ref) <= 1e-5


def test_quantized_differs_from_exact():
  """The default path really quantizes: not bit-equal to exact attention."""
  q, k, v = random_qkv(2, 1, 64, 64, 2, 2, 64)
  out = turbojax.dot_product_attention(q, k, v)
  exact = turbojax.dot_product_attention(q, k, v, config=turbojax.TurboConfig(exact=True))
  assert 1e-4 < relative_error(out, exact) < 2.5e-2


def test_masks_lengths_window_and_bias_match_jax_nn():
  q, k, v = random_qkv(3, 2, 96, 160, 4, 2, 64)
  q_lens = jnp.array([96, 50])
  kv_lens = jnp.array([160, 77])
  mask = jax.random.bernoulli(jax.random.PRNGKey(0), 0.8, (2, 1, 96, 160))
  bias = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 96, 160))
  kwargs = dict(bias=bias, mask=mask, query_seq_lengths=q_lens, key_value_seq_lengths=kv_lens,
                local_window_size=(40, 8), is_causal=True)
  ref = jax.nn.dot_product_attention(q, k, v, **kwargs)
  out = turbojax.dot_product_attention(q, k, v, **kwargs)
  # Compare rows that see at least one key (jax.nn averages V on fully masked
  # rows; turbojax returns 0 there, checked below).
  keep = structured_keep(2, 96, 160, is_causal=True, local_window=(40, 8), query_offset=0,
                         query_seq_lengths=q_lens, key_value_seq_lengths=kv_lens) & mask
  valid = jnp.any(keep, axis=-1)[:, 0, :, None, None]
  assert bool(jnp.any(~valid[1])) and float(jnp.mean(valid)) > 0.5
  assert relative_error(jnp.where(valid, out, 0), jnp.where(valid, ref, 0)) <= 2.5e-2
  exact = turbojax.dot_product_attention(q, k, v, config=turbojax.TurboConfig(exact=True),
                                         **kwargs)
  assert relative_error(jnp.where(valid, exact, 0), jnp.where(valid, ref, 0)) <= 1e-5
  # Padded and fully masked query rows are 0 (never NaN).
  assert np.all(np.asarray(out)[1, 50:] == 0)
  assert np.all(np.where(valid, 0.0, np.asarray(out)) == 0)


def test_query_offset_is_bottom_right_causal():
  """A chunk of queries at the end of the keys == the tail of full causal attention."""
  q, k, v = random_qkv(4, 1, 200, 200, 4, 2, 64)
  # Jitted (a third of the eager time); the offset stays a Python int.
  attention = jax.jit(turbojax.dot_product_attention,
                      static_argnames=("is_causal", "query_offset", "config"))
  full = attention(q, k, v, is_causal=True, config=turbojax.TurboConfig(exact=True))
  tail = attention(q[:, 136:], k, v, is_causal=True, query_offset=136,
                   config=turbojax.TurboConfig(exact=True))
  np.testing.assert_allclose(np.asarray(tail), np.asarray(full[:, 136:]), atol=1e-5)
  quant_tail = attention(q[:, 136:], k, v, is_causal=True, query_offset=136)
  assert relative_error(quant_tail, full[:, 136:]) <= 2.5e-2


def test_fully_masked_rows_are_zero():
  q, k, v = random_qkv(5, 1, 64, 64, 2, 2, 64)
  mask = jnp.ones((1, 1, 64, 64), bool).at[:, :, :10].set(False)
  out = np.asarray(turbojax.dot_product_attention(q, k, v, mask=mask))
  assert np.all(out[:, :10] == 0) and np.all(np.isfinite(out))


@pytest.mark.parametrize("dtype, bound", [(jnp.bfloat16, 3e-2), (jnp.float16, 2.5e-2)])
def test_low_precision_inputs(dtype, bound):
  q, k, v = random_qkv(6, 1, 128, 128, 4, 4, 64, dtype=dtype)
  ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
  out = turbojax.dot_product_attention(q, k, v)
  assert out.dtype == dtype
  assert relative_error(out, ref) <= bound


def test_jit_vmap_grad():
  q, k, v = random_qkv(7, 2, 64, 64, 2, 2, 32)
  f = lambda q, k, v: turbojax.dot_product_attention(q, k, v, is_causal=True)
  eager = f(q, k, v)
  np.testing.assert_allclose(np.asarray(jax.jit(f)(q, k, v)), np.asarray(eager), atol=1e-6)
  # vmap and grad run jitted (as in training): eager op-by-op dispatch of the
  # batched and differentiated paths took most of this test's time.
  vm = jax.jit(jax.vmap(lambda q, k, v: f(q[None], k[None], v[None])[0]))(q, k, v)
  np.testing.assert_allclose(np.asarray(vm), np.asarray(eager), atol=1e-6)

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

  exact = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
  grads = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v)
  ref_grads = jax.jit(jax.grad(loss(exact), argnums=(0, 1, 2)))(q, k, v)
  for g, r in zip(grads, ref_grads):
    assert np.all(np.isfinite(np.asarray(g)))
    # Straight-through: exact attention's backward at the quantized output's cotangent.
    assert relative_error(g, r) < 5e-2


def test_prequantized_qarray_inputs():
  q, k, v = random_qkv(8, 1, 128, 128, 2, 2, 64)
  per_token = dict(channelwise_axes=(0, 1, 2))
  qq, kq, vq = (turbojax.quant.quantize_int8_sym(x, **per_token) for x in (q, k, v))
  ref = jax.nn.dot_product_attention(q, k, v)
  out = turbojax.dot_product_attention(qq, kq, vq)
  assert out.dtype == jnp.float32
  assert relative_error(out, ref) <= 2.5e-2


# --- K's outlier channels moved into Q (config.qk_migration) -------------------------------


def test_migration_scale_is_exact_and_balances_channels():
  q, k, _ = random_qkv(4, 1, 16, 32, 4, 2, 64, k_outliers=True)
  q = q.at[0, 0, 0, 5].set(jnp.inf)  # non-finite inputs leave their channel alone
  _, k_absmax = channel_stats_reference(k, smooth=True, layout="bthd")
  _, q_absmax = channel_stats_reference(q, smooth=False, layout="bthd")
  s = prepare.migration_scale(q_absmax, k_absmax)
  assert s.shape == (1, 2, 64)
  np.testing.assert_array_equal(s, jnp.exp2(jnp.round(jnp.log2(s))))  # powers of two
  assert np.all(s[0, 0, 5] == 1) and np.all(s[:, :, :4] >= 2)        # K's 6x channels move
  group_s = jnp.repeat(s, 2, axis=1)[:, None]
  np.testing.assert_array_equal((q * group_s) / group_s, q)          # exact both ways
  np.testing.assert_array_equal((k / s[:, None]) * s[:, None], k)
  # Afterwards K's and Q's channel maxima are within a factor of 2 of each other.
  q_absmax = jnp.max(jnp.abs(q * group_s), axis=1).reshape(1, 2, 2, 64).max(axis=2)
  ratio = (k_absmax / s) / q_absmax
  moved = ratio[ratio > 0]  # not the channel with Q's inf
  assert moved.size == 127 and np.all((moved >= 0.5) & (moved <= 2.0))


@pytest.mark.parametrize("per_token_scales", [False, True])
def test_migration_cuts_the_outlier_error(per_token_scales):
  """Block scales meet the design's outlier bound only with migration."""
  q, k, v = random_qkv(0, 1, 256, 512, 4, 4, 128, k_outliers=True)
  ref = jax.nn.dot_product_attention(q, k, v)

  def err(migrate):
    config = turbojax.TurboConfig(qk_migration=migrate, per_token_scales=per_token_scales)
    return relative_error(turbojax.dot_product_attention(q, k, v, config=config), ref)

  with_migration, without = err(True), err(False)
  print(f"{per_token_scales=}: {with_migration:.2e} with migration, {without:.2e} without")
  assert with_migration <= 0.8 * without
  assert with_migration <= 4e-2

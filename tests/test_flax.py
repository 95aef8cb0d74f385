"""turbojax.flax: the attention_fn hook (nnx and linen) and the TurboAttention
nnx module with its quantized KV cache (issue 7)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import turbojax
from turbojax.flax import TurboAttention, apply_rope, make_attention_fn
from turbojax.testing import random_qkv, relative_error

EXACT = turbojax.TurboConfig(exact=True)
PREFILL_BOUND = 2.5e-2  # design §4: default config vs jax.nn on unit-normal data


def _x(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


# Everything runs jitted (eager op-by-op dispatch of the quantized paths is slow).
_forward = nnx.jit(lambda m, x: m(x, is_causal=True))
_decode = nnx.jit(lambda m, x: m(x, decode=True))
_decode_attention = jax.jit(turbojax.decode_attention)
_update = jax.jit(lambda cache, k, v: cache.update(k, v))


# --- make_attention_fn ----------------------------------------------------------------------
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_fn_matches_jax_nn(is_causal):
  q, k, v = random_qkv(0, 2, 96, 96, 4, 2, 64)
  out = jax.jit(functools.partial(make_attention_fn(), is_causal=is_causal))(q, k, v)
  ref = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)
  assert out.shape == ref.shape and out.dtype == q.dtype
  assert relative_error(out, ref) <= PREFILL_BOUND
  exact = jax.jit(functools.partial(make_attention_fn(EXACT), is_causal=is_causal))(q, k, v)
  assert relative_error(exact, ref) <= 1e-5


def test_attention_fn_extra_batch_dims_mask_and_dtype():
  q, k, v = (x.reshape(2, 3, 80, 2, 32) for x in random_qkv(1, 6, 80, 80, 2, 2, 32))
  mask = jnp.tril(jnp.ones((80, 80), jnp.bool_))[None, None, None]  # [1, 1, 1, T, S]
  out = jax.jit(functools.partial(make_attention_fn(), mask=mask, dtype=jnp.bfloat16))(q, k, v)
  assert out.shape == q.shape and out.dtype == jnp.bfloat16
  ref = jax.nn.dot_product_attention(
      q.reshape(6, 80, 2, 32), k.reshape(6, 80, 2, 32), v.reshape(6, 80, 2, 32), is_causal=True)
  assert relative_error(out.reshape(ref.shape), ref) <= 3e-2  # bf16 inputs


def test_nnx_multihead_attention_hook():
  x = _x(2, (2, 96, 64))
  kw = {"num_heads": 4, "in_features": 64, "num_kv_heads": 2, "decode": False}
  ref_mod = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
  mod = nnx.MultiHeadAttention(**kw, attention_fn=make_attention_fn(), rngs=nnx.Rngs(0))
  mask = nnx.make_causal_mask(x[..., 0])
  ref = ref_mod(x, mask=mask)
  out = nnx.jit(lambda m, x: m(x, mask=mask))(mod, x)
  assert relative_error(out, ref) <= PREFILL_BOUND
  out_causal = _forward(mod, x)
  assert relative_error(out_causal, ref) <= PREFILL_BOUND


def test_nnx_multihead_attention_hook_decode_mode():
  """nnx's own float cache + mask path works through the hook."""
  x = _x(3, (2, 8, 32))
  kw = {"num_heads": 2, "in_features": 32, "decode": True}
  ref_mod = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
  mod = nnx.MultiHeadAttention(**kw, attention_fn=make_attention_fn(EXACT), rngs=nnx.Rngs(0))
  for m in (ref_mod, mod):
    m.init_cache(x.shape)
  step = nnx.jit(lambda m, x: m(x))
  for t in range(x.shape[1]):
    np.testing.assert_allclose(step(mod, x[:, t:t + 1]), step(ref_mod, x[:, t:t + 1]), atol=1e-5)


def test_linen_multihead_attention_hook():
  x = _x(4, (2, 96, 64))
  mask = nn.make_causal_mask(x[..., 0])
  ref_mod = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64)
  mod = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64,
                                        attention_fn=make_attention_fn())
  params = ref_mod.init(jax.random.PRNGKey(0), x, mask=mask)
  ref = ref_mod.apply(params, x, mask=mask)
  out = jax.jit(lambda p, x: mod.apply(p, x, mask=mask))(params, x)
  assert relative_error(out, ref) <= PREFILL_BOUND


def test_attention_fn_unsupported_features_raise():
  q, k, v = random_qkv(5, 1, 16, 16, 2, 2, 32)
  fn = make_attention_fn()
  with pytest.raises(NotImplementedError, match="dropout"):
    fn(q, k, v, dropout_rate=0.1, deterministic=False, dropout_rng=jax.random.PRNGKey(0))
  jax.jit(functools.partial(fn, dropout_rate=0.1, deterministic=True))(q, k, v)  # fine
  with pytest.raises(NotImplementedError, match="sow"):
    fn(q, k, v, module=object())
  with pytest.raises(TypeError, match="unsupported"):
    fn(q, k, v, some_future_flag=3)
  mha = nnx.MultiHeadAttention(2, 32, dropout_rate=0.1, attention_fn=fn, decode=False,
                               rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match="dropout"):
    mha(_x(0, (1, 16, 32)), deterministic=False)
  layer = TurboAttention(2, 32, dropout_rate=0.1, rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match="dropout"):
    layer(_x(0, (1, 16, 32)), deterministic=False)


# --- TurboAttention -------------------------------------------------------------------------
def _manual_attention(layer: TurboAttention, x):
  """Reference: the layer's projections + RoPE + jax.nn causal attention."""
  q = apply_rope(layer.query(x), jnp.arange(x.shape[1]))
  k = apply_rope(layer.key(x), jnp.arange(x.shape[1]))
  v = layer.value(x)
  return layer.out(jax.nn.dot_product_attention(q, k, v, is_causal=True))


def test_turbo_attention_forward_matches_reference():
  x = _x(6, (2, 128, 64))
  layer = TurboAttention(4, 64, num_kv_heads=2, config=EXACT, rngs=nnx.Rngs(0))
  ref = _manual_attention(layer, x)
  assert relative_error(_forward(layer, x), ref) <= 1e-5
  quant = nnx.with_attributes(layer, config=turbojax.TurboConfig())
  out = _forward(quant, x)
  assert out.shape == (2, 128, 64)
  assert relative_error(out, ref) <= PREFILL_BOUND


def test_prefill_chunk_equals_forward():
  """An empty cache's prefill chunk attends over the chunk's own float K/V:
  the same computation as the causal forward."""
  x = _x(7, (2, 100, 64))
  layer = TurboAttention(4, 64, num_kv_heads=2, rngs=nnx.Rngs(0))
  full = _forward(layer, x)
  layer.init_cache(2, 256)
  np.testing.assert_allclose(_decode(layer, x), full, atol=1e-5)
  np.testing.assert_array_equal(layer.cache_index, [100, 100])


@pytest.mark.parametrize("config", [turbojax.TurboConfig(), turbojax.TurboConfig(int2_heads=1)],
                         ids=["int4", "mixed"])
def test_token_by_token_decode_equals_one_shot_decode_attention(config):
  """Streaming decode == one ``decode_attention`` over the same quantized cache.

  A token's K/V stays INT8 (in the residual window) until its group of
  ``group_size`` tokens fills, then it is re-encoded at INT4/INT2. So the
  streamed outputs equal the one-shot causal computation only while no group
  boundary is crossed: the prefill ends on a boundary (64 tokens) and the
  ``group_size - 1`` next tokens stay in the window. There, step ``i`` saw
  exactly the cache contents that row ``i`` of ``decode_attention(q_all,
  cache)`` sees (causal among the new tokens), so they agree to f32 rounding.
  """
  b, p, n, hq, hk, d = 2, 64, 63, 4, 2, 32
  q, k, v = random_qkv(8, b, p + n, p + n, hq, hk, d)
  cache = _update(turbojax.QuantizedKVCache.init(b, 256, hk, d, config), k[:, :p], v[:, :p])
  @jax.jit
  def step(cache, q, k, v):
    cache = cache.update(k, v)
    return cache, turbojax.decode_attention(q, cache)

  outs = []
  for t in range(p, p + n):
    cache, out = step(cache, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
    outs.append(out)
  one_shot = _decode_attention(q[:, p:], cache)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), one_shot, atol=1e-5, rtol=0)


def test_module_streaming_decode_equals_chunked_decode():
  """The module's version of the test above: after a 64-token prefill, 8
  tokens one by one give the outputs of one 8-token decode call (the cache
  contents are bit-identical; no group boundary is crossed)."""
  x = _x(9, (2, 72, 64))
  layer = TurboAttention(4, 64, num_kv_heads=2, rngs=nnx.Rngs(0))
  layer.init_cache(2, 256)
  _decode(layer, x[:, :64])
  chunked = nnx.clone(layer)
  streamed = jnp.concatenate([_decode(layer, x[:, t:t + 1]) for t in range(64, 72)], 1)
  np.testing.assert_allclose(streamed, _decode(chunked, x[:, 64:72]), atol=1e-5, rtol=0)


def test_decode_through_group_boundaries_tracks_exact():
  """Prefill + 60 decode steps crossing two group boundaries: close to exact
  attention (INT4 cache error on random weights is about 0.1, design §4)."""
  x = _x(10, (2, 160, 64))
  layer = TurboAttention(4, 64, num_kv_heads=2, rngs=nnx.Rngs(0))
  exact = _forward(nnx.with_attributes(layer, config=EXACT), x)
  layer.init_cache(2, 256)
  outs = [_decode(layer, x[:, :100])] + [_decode(layer, x[:, t:t + 1]) for t in range(100, 160)]
  out = jnp.concatenate(outs, axis=1)
  assert relative_error(out[:, :100], exact[:, :100]) <= PREFILL_BOUND
  assert relative_error(out[:, 100:], exact[:, 100:]) <= 0.2
  assert bool(jnp.all(jnp.isfinite(out)))


def test_exact_config_float_cache_decode_equals_forward():
  x = _x(11, (2, 90, 64))
  layer = TurboAttention(4, 64, num_kv_heads=1, config=EXACT, rngs=nnx.Rngs(0))
  full = _forward(layer, x)
  layer.init_cache((2, 90, 64))  # nnx.MultiHeadAttention's init_cache(input_shape) form
  assert isinstance(layer.kv_cache.get_value(), turbojax.flax.FloatKVCache)
  outs = [_decode(layer, x[:, :70])] + [_decode(layer, x[:, t:t + 1]) for t in range(70, 90)]
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)


def test_decode_does_not_retrace():
  layer = TurboAttention(4, 64, num_kv_heads=2, rngs=nnx.Rngs(0))
  layer.init_cache(2, 256)
  traces = []

  @nnx.jit
  def step(m, x):
    traces.append(x.shape)
    return m(x, decode=True)

  x = _x(12, (2, 136, 64))
  step(layer, x[:, :100])
  for t in range(100, 136):  # packs a group at 128: same trace
    step(layer, x[:, t:t + 1])
  assert traces == [(2, 100, 64), (2, 1, 64)]
  np.testing.assert_array_equal(layer.cache_index, [136, 136])


def test_decode_errors():
  layer = TurboAttention(2, 32, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="init_cache"):
    layer(_x(0, (1, 1, 32)), decode=True)
  layer.init_cache(1, 64)
  with pytest.raises(NotImplementedError, match="mask"):
    layer(_x(0, (1, 1, 32)), decode=True, mask=jnp.ones((1, 1, 1, 64), bool))


# --- training -------------------------------------------------------------------------------
class _TinyLM(nnx.Module):
  def __init__(self, config, *, rngs):
    self.embed = nnx.Embed(64, 32, rngs=rngs)
    self.attn = nnx.List([TurboAttention(4, 32, num_kv_heads=2, config=config, rngs=rngs)
                          for _ in range(2)])
    self.head = nnx.Linear(32, 64, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.attn:
      x = x + layer(x, is_causal=True)
    return self.head(x)


def test_training_under_nnx_jit_decreases_loss():
  model = _TinyLM(turbojax.TurboConfig(), rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 65), 0, 64)

  @nnx.jit
  def train_step(model, opt, tokens):
    def loss_fn(model):
      logits = model(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(train_step(model, opt, tokens)) for _ in range(8)]
  assert all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.3


def test_straight_through_gradients():
  """Backward = exact attention's backward on the same Q/K/V: with a loss
  linear in the attention output, the Q/K/V projection gradients of the
  quantized layer equal the exact layer's; they are finite and nonzero."""
  x = _x(13, (2, 96, 32))
  r = _x(14, (2, 96, 32))
  layer = TurboAttention(4, 32, num_kv_heads=2, rngs=nnx.Rngs(0))

  def grads(config):
    m = nnx.with_attributes(layer, config=config)
    return nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, is_causal=True) * r)))(m)

  g, g_exact = grads(turbojax.TurboConfig()), grads(EXACT)
  for name in ("query", "key", "value"):
    gq = g[name]["kernel"].get_value()
    ge = g_exact[name]["kernel"].get_value()
    assert bool(jnp.all(jnp.isfinite(gq))) and float(jnp.linalg.norm(gq)) > 0
    np.testing.assert_allclose(gq, ge, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(ge))))
  assert relative_error(g["out"]["kernel"].get_value(),
                        g_exact["out"]["kernel"].get_value()) <= PREFILL_BOUND


# --- the example and the benchmark (slow: run with -m slow) ---------------------------------
def _load_script(relative_path: str, name: str):
  import importlib.util
  import pathlib
  import sys
  path = pathlib.Path(__file__).resolve().parents[1] / relative_path
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up while the file executes
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_train_lm_example_runs(tmp_path):
  train_lm = _load_script("examples/train_lm.py", "train_lm")
  result = train_lm.main(["--steps", "4", "--qat-steps", "2", "--out",
                          str(tmp_path / "lm.json"), "--checkpoint-dir", str(tmp_path)])
  assert (tmp_path / "lm.json").exists()
  assert all(np.isfinite(r["ppl"]) for r in result["rows"])


@pytest.mark.slow
def test_serving_benchmark_smoke(tmp_path):
  serving = _load_script("benchmarks/serving.py", "serving")
  result = serving.main(["--smoke", "--out", str(tmp_path / "serving.json")])
  assert [r["kind"] for r in result["records"]] == ["float", "quantized", "quantized"]
  assert all(r["tokens_per_s"] > 0 for r in result["records"])

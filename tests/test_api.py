"""Dispatch and the errors of bad input at the public boundary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import turbojax
from turbojax.attention import backends

Q = jnp.zeros((2, 16, 4, 32))
K = jnp.zeros((2, 24, 2, 32))


def call(**overrides):
  args = dict(query=Q, key=K, value=K)
  args.update(overrides)
  q, k, v = args.pop("query"), args.pop("key"), args.pop("value")
  return turbojax.dot_product_attention(q, k, v, **args)


BAD_INPUTS = [
    ("query rank", dict(query=jnp.zeros((16, 4, 32))), ValueError, "query must have rank 4"),
    ("batch mismatch", dict(key=jnp.zeros((3, 24, 2, 32)), value=jnp.zeros((3, 24, 2, 32))),
     ValueError, "same batch size"),
    ("head_dim mismatch", dict(key=jnp.zeros((2, 24, 2, 16)), value=jnp.zeros((2, 24, 2, 16))),
     ValueError, "same head_dim"),
    ("heads not divisible", dict(key=jnp.zeros((2, 24, 3, 32)), value=jnp.zeros((2, 24, 3, 32))),
     ValueError, "multiple of key/value heads"),
    ("key/value shapes", dict(value=jnp.zeros((2, 20, 2, 32))), ValueError, "same shape"),
    ("int inputs", dict(query=jnp.zeros((2, 16, 4, 32), jnp.int32)), TypeError,
     "query must be float32, bfloat16 or float16"),
    ("mixed dtypes", dict(query=Q.astype(jnp.bfloat16)), TypeError, "share a dtype"),
    ("bias shape", dict(bias=jnp.zeros((2, 4, 16, 23))), ValueError, "bias of shape"),
    ("mask dtype", dict(mask=jnp.zeros((2, 4, 16, 24))), TypeError, "mask must be a boolean"),
    ("negative lengths", dict(key_value_seq_lengths=jnp.array([3, -1])), ValueError,
     r"key_value_seq_lengths must lie in \[0, 24\]"),
    ("too-long lengths", dict(query_seq_lengths=jnp.array([17, 3])), ValueError,
     r"query_seq_lengths must lie in \[0, 16\]"),
    ("lengths shape", dict(key_value_seq_lengths=jnp.array([3])), ValueError, "shape \\(2,\\)"),
    ("window", dict(local_window_size=(-1, 2)), ValueError, "local_window_size"),
    ("query_offset", dict(query_offset=jnp.array([1, 2, 3])), ValueError, "query_offset"),
    ("config type", dict(config={"exact": True}), TypeError, "config must be a TurboConfig"),
    ("scale type", dict(scale="0.1"), TypeError, "scale must be a real number"),
    ("scale not finite", dict(scale=float("nan")), ValueError, "scale must be finite"),
    ("unknown implementation", dict(implementation="cuda_magic"), ValueError,
     "implementation='cuda_magic' is not available"),
    ("empty implementation list", dict(implementation=[]), ValueError, "non-empty sequence"),
]


@pytest.mark.parametrize("name, overrides, error, match", BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_table(name, overrides, error, match):
  with pytest.raises(error, match=match):
    call(**overrides)


def test_traced_scale_is_a_clear_error():
  """The kernels fold the scale into Q's scales at trace time."""
  with pytest.raises(TypeError, match="scale must be a real number"):
    jax.jit(lambda s: call(scale=s))(0.1)
  np.testing.assert_allclose(call(scale=np.float32(0.1)), call(scale=0.1))


@pytest.mark.parametrize("changes, match", [
    (dict(block_k=48), "block_k must be a power of two"),
    (dict(kv_bits=3), "kv_bits must be one of"),
    (dict(int2_heads=-1), "int2_heads must be a non-negative"),
    (dict(sas_threshold=0.0), "sas_threshold must be > 0"),
    (dict(sas_degree=5), "sas_degree must be 2 or 3"),
    (dict(sas_base=10.0), "sas_base must be 2.0 or math.e"),
    (dict(sas_dtype="int8"), "sas_dtype must be"),
])
def test_invalid_config_values(changes, match):
  with pytest.raises(ValueError, match=match):
    turbojax.TurboConfig(**changes)


def test_default_order_ends_in_xla():
  for platform in ("cpu", "gpu", "tpu"):
    names, explicit = backends.resolve(None, platform)
    assert names[-1] == "xla" and not explicit


def test_unavailable_explicit_backend_fails_fast():
  name = next((n for n in backends.BACKENDS if n != "xla"), None)
  if name is None:
    pytest.skip("no Pallas backend is importable in this environment")
  if jax.default_backend() in backends.BACKENDS[name].platforms:
    pytest.skip(f"{name} runs on this platform")
  with pytest.raises(NotImplementedError, match=f"implementation={name!r} runs on"):
    call(implementation=name)


def test_sequence_falls_back_to_xla_with_warning():
  name = next((n for n in backends.BACKENDS if n != "xla"), None)
  if name is None or jax.default_backend() in backends.BACKENDS[name].platforms:
    pytest.skip("needs a Pallas backend that cannot run on this platform")
  with pytest.warns(UserWarning, match="falling back"):
    out = call(implementation=[name, "xla"])
  assert out.shape == Q.shape


def test_exception_group_when_nothing_runs():
  name = next((n for n in backends.BACKENDS if n != "xla"), None)
  if name is None or jax.default_backend() in backends.BACKENDS[name].platforms:
    pytest.skip("needs a Pallas backend that cannot run on this platform")
  with pytest.raises(ExceptionGroup):
    call(implementation=[name])


def test_inputs_are_not_modified():
  q = jax.random.normal(jax.random.PRNGKey(0), Q.shape)
  k = jax.random.normal(jax.random.PRNGKey(1), K.shape)
  copies = [np.array(x) for x in (q, k)]
  turbojax.dot_product_attention(q, k, k)
  for x, c in zip((q, k), copies):
    np.testing.assert_array_equal(np.asarray(x), c)

"""Run in a fresh process with 8 simulated CPU devices (see test_sharding.py)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import turbojax
from turbojax.testing import random_qkv

assert len(jax.devices()) == 8, jax.devices()
MANUAL = "sdy.manual_computation"  # how shard_map appears in the lowered module
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
q, k, v = random_qkv(0, 4, 96, 96, 8, 4, 64)
lengths = jnp.array([96, 50, 70, 96])
f = jax.jit(lambda q, k, v, n: turbojax.dot_product_attention(
    q, k, v, is_causal=True, key_value_seq_lengths=n))
single = f(q, k, v, lengths)
with jax.set_mesh(mesh):
  spec = NamedSharding(mesh, P("data", None, "model", None))
  qs, ks, vs = (jax.device_put(x, spec) for x in (q, k, v))
  sharded = f(qs, ks, vs, jax.device_put(lengths, NamedSharding(mesh, P("data"))))
  text = f.lower(qs, ks, vs, lengths).as_text()
assert MANUAL in text, "the kernels must run under shard_map"
np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-6)
print("prefill sharded == unsharded", float(jnp.max(jnp.abs(sharded - single))))

# The single-device references run jitted too (eagerly, each op compiles alone).
fill = jax.jit(lambda c, k, v: c.update(k, v))
cache = fill(turbojax.QuantizedKVCache.init(4, 128, 4, 64), k, v)
single = jax.jit(turbojax.decode_attention)(q[:, -1:], cache)
with jax.set_mesh(mesh):
  sharded = jax.jit(turbojax.decode_attention)(q[:, -1:], cache)
  assert MANUAL in jax.jit(turbojax.decode_attention).lower(q[:, -1:], cache).as_text()
np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-6)
print("decode sharded == unsharded")

# A one-token update packs a group (63 cached + 1) with the append_token kernel
# (interpreted here), mapped over the batch shards.
cache = turbojax.QuantizedKVCache.init(4, 128, 4, 64, turbojax.TurboConfig(interpret=True))
cache = fill(cache, k[:, :63], v[:, :63])
step = jax.jit(lambda c, k, v: c.update(k, v))
single = step(cache, k[:, 63:64], v[:, 63:64])
with jax.set_mesh(mesh):
  sharded = step(cache, k[:, 63:64], v[:, 63:64])
  assert MANUAL in step.lower(cache, k[:, 63:64], v[:, 63:64]).as_text()
for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded)):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("update sharded == unsharded")

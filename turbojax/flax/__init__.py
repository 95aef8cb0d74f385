"""Flax integration of turbojax (needs ``flax>=0.12``).

* ``make_attention_fn(config)``: a drop-in ``attention_fn`` for
  ``nnx.MultiHeadAttention`` and linen's ``MultiHeadDotProductAttention``.
* ``TurboAttention``: an ``nnx`` attention layer (GQA, RoPE) whose decode mode
  keeps K/V in a ``QuantizedKVCache`` (or a ``FloatKVCache`` for exact runs).
"""

from turbojax.flax.attention import FloatKVCache as FloatKVCache
from turbojax.flax.attention import TurboAttention as TurboAttention
from turbojax.flax.attention import apply_rope as apply_rope
from turbojax.flax.attention import float_decode_attention as float_decode_attention
from turbojax.flax.attention import make_attention_fn as make_attention_fn

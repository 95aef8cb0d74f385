"""turbojax: TurboAttention (FlashQ + SAS) for JAX: quantized attention execution."""

from turbojax import quant as quant
from turbojax import sas as sas
from turbojax._version import __version__ as __version__
from turbojax.attention.api import dot_product_attention as dot_product_attention
from turbojax.attention.base import Implementation as Implementation
from turbojax.config import TurboConfig as TurboConfig
from turbojax.quant import PQArray as PQArray
from turbojax.quant import QArray as QArray
from turbojax.quant import dequantize as dequantize
from turbojax.attention.decode import decode_attention as decode_attention
from turbojax.kv_cache import QuantizedKVCache as QuantizedKVCache

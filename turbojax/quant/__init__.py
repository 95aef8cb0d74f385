"""turbojax.quant: pure, jittable progressive quantization (FlashQ)."""

from pallas_kernels.packing import pack as pack
from pallas_kernels.packing import unpack as unpack
from turbojax.quant.qarray import PQArray as PQArray
from turbojax.quant.qarray import QArray as QArray
from turbojax.quant.quantize import assign_head_bits as assign_head_bits
from turbojax.quant.quantize import dequantize as dequantize
from turbojax.quant.quantize import head_order as head_order
from turbojax.quant.quantize import head_priority as head_priority
from turbojax.quant.quantize import quantize_asym as quantize_asym
from turbojax.quant.quantize import quantize_int8_sym as quantize_int8_sym
from turbojax.quant.quantize import to_int8 as to_int8

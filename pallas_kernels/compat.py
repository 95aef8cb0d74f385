"""The one place where Pallas API differences between JAX versions are handled.

turbojax supports ``jax>=0.10`` (CI: 0.10.x on Python 3.11; the GPU machine:
0.11.x). Kernels import version-dependent names from here, never directly.
"""

from __future__ import annotations

import jax

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

# --- Pallas Triton (GPU) ------------------------------------------------------

try:  # Pallas Triton is importable on any platform (lowering needs no GPU).
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - very old or stripped jax builds
  plgpu = None

# The custom-call target of Pallas Triton kernels; ``jax.export`` needs it in
# ``disabled_checks`` (Triton IR carries no compatibility guarantee).
TRITON_CUSTOM_CALL_TARGET = getattr(
    plgpu, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")


def triton_compiler_params(*, num_warps: int, num_stages: int):
  """``plgpu.CompilerParams`` (jax >= 0.5) or the older ``TritonCompilerParams``."""
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def triton_dot(a, b, *, trans_b: bool = False, preferred_element_type=None):
  """2-D ``a @ b`` (``a @ b.T`` with ``trans_b``) inside a Pallas Triton kernel.

  ``pl.dot`` is gone in jax 0.11; ``lax.dot_general`` lowers on every version.
  With ``trans_b`` the second operand is K-major (``[N, K]``), the layout that
  makes 8-bit tensor-core dots fast on Hopper.
  """
  contract_b = 1 if trans_b else 0
  return jax.lax.dot_general(
      a, b, (((1,), (contract_b,)), ((), ())),
      preferred_element_type=preferred_element_type)


def elementwise_ptx(asm: str, *args, dtype=None, constraints: str | None = None):
  """PTX applied elementwise inside a Pallas Triton kernel (``$0`` out,
  ``$1..`` in; ``args`` broadcast to the first one's shape). Defaults: int32
  registers in and out."""
  import jax.numpy as jnp
  args = [jnp.broadcast_to(a, jnp.shape(args[0])) for a in args]
  [out] = plgpu.elementwise_inline_asm(
      asm, args=args, constraints=constraints or "=r" + ",r" * len(args), pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, dtype or jnp.int32)])
  return out


def dp4a(a, b, c, *, interpret: bool, signed_a: bool = False):
  """``c + sum_k a.byte[k] * b.byte[k]`` per int32 element, ``b``'s bytes signed
  and ``a``'s unsigned (or signed with ``signed_a``): PTX ``dp4a``, four int8
  products in one CUDA-core instruction. Exact in int32; interpret mode
  computes the same sum.
  """
  import jax.numpy as jnp
  if not interpret:
    kind = "s32" if signed_a else "u32"
    return elementwise_ptx(f"dp4a.{kind}.s32 $0, $1, $2, $3;", a, b, c)
  for k in range(4):
    a_k = ((a << (24 - 8 * k)) >> 24) if signed_a else ((a >> (8 * k)) & 0xFF)
    b_k = (b << (24 - 8 * k)) >> 24          # arithmetic shift: sign-extended byte
    c = c + a_k * b_k
  return c.astype(jnp.int32)


def prmt(a, b, selector: int, *, interpret: bool):
  """PTX ``prmt.b32``: byte ``i`` of the result is byte ``selector``'s nibble
  ``i`` (0..7) of the 8-byte value ``b:a`` (no sign-replication modes)."""
  import jax.numpy as jnp
  if not interpret:
    return elementwise_ptx(f"prmt.b32 $0, $1, $2, {selector:#06x};", a, b)
  out = jnp.zeros_like(a)
  for i in range(4):
    n = (selector >> (4 * i)) & 0x7
    src = a if n < 4 else b
    out = out | (((src >> (8 * (n % 4))) & 0xFF) << (8 * i))
  return out.astype(jnp.int32)


# --- Pallas Mosaic TPU ----------------------------------------------------------

try:  # Pallas Mosaic TPU is importable on any platform (lowering needs no TPU).
  from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover - very old or stripped jax builds
  pltpu = None

# ``pltpu.PrefetchScalarGridSpec`` on every supported version (jax 0.10, 0.11).
TPU_PREFETCH_SCALAR_GRID_SPEC = getattr(pltpu, "PrefetchScalarGridSpec", None)
TPU_SMEM = getattr(pltpu, "SMEM", None)
TPU_VMEM = getattr(pltpu, "VMEM", None)


def tpu_compiler_params(*, dimension_semantics, vmem_limit_bytes=None):
  """``pltpu.CompilerParams`` (jax >= 0.7) or the older ``TPUCompilerParams``."""
  cls = (getattr(pltpu, "CompilerParams", None)
         or getattr(pltpu, "TPUCompilerParams"))
  kwargs = {}
  if vmem_limit_bytes is not None:
    kwargs["vmem_limit_bytes"] = vmem_limit_bytes
  return cls(dimension_semantics=tuple(dimension_semantics), **kwargs)


def tpu_interpret(interpret):
  """The ``interpret=`` value for a Mosaic TPU ``pallas_call``.

  ``True`` selects the TPU interpreter (``pltpu.InterpretParams()``, jax >=
  0.7), which models scalar prefetch, SMEM/VMEM and the grid order like the
  hardware; ``pltpu.InterpretParams`` objects pass through. Older jax falls
  back to the generic HLO interpreter (``interpret=True``).
  """
  if interpret is True:
    params = getattr(pltpu, "InterpretParams", None)
    return params() if params is not None else True
  return interpret


def force_tpu_interpret_mode(*args, **kwargs):
  """Context manager running every Mosaic TPU ``pallas_call`` in the interpreter.

  ``pltpu.force_tpu_interpret_mode`` on jax 0.10 and 0.11.
  """
  return pltpu.force_tpu_interpret_mode(*args, **kwargs)


# --- Pallas Mosaic GPU ----------------------------------------------------------

try:  # Pallas Mosaic GPU is importable on any platform (lowering needs no GPU).
  from jax.experimental.pallas import mosaic_gpu as plmgpu
except ImportError:  # pragma: no cover - very old or stripped jax builds
  plmgpu = None

# Custom-call targets of Mosaic GPU kernels (``jax.export`` allows them).
MOSAIC_GPU_CUSTOM_CALL_TARGETS = ("mosaic_gpu", "mosaic_gpu_v2")


def mgpu_load(ref, *, layout):
  """Whole-ref ``plgpu.load`` with a register layout.

  jax 0.10 takes the index positionally (``load(ref, (), layout=...)``); jax
  0.11 deprecates the index (``load(ref, layout=...)``).
  """
  import inspect  # local: keep this module's import cheap
  idx = inspect.signature(plmgpu.load).parameters["idx"]
  if idx.default is inspect.Parameter.empty:
    return plmgpu.load(ref, (), layout=layout)
  return plmgpu.load(ref, layout=layout)


def mgpu_interpret(interpret):
  """The ``interpret=`` value for ``plgpu.kernel``.

  ``True`` selects the Mosaic GPU interpreter (``InterpretGPUParams()``, which
  simulates SMEM, barriers, TMA and warpgroups on CPU); objects pass through.
  """
  if interpret is True:
    params = getattr(plmgpu, "InterpretGPUParams", None)
    if params is None:  # jax 0.10 has it but does not re-export it
      from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()
  return interpret or None

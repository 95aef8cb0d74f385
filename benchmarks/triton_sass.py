"""Registers and SASS of the Pallas Triton kernels, compiled here without a GPU.

    pip install triton   # Linux x86-64; brings its own ptxas and cuobjdump
    PYTHONPATH=. python benchmarks/triton_sass.py decode --bits 4 --splits 8 [--warps 2 --stages 2]
    PYTHONPATH=. python benchmarks/triton_sass.py prefill
    PYTHONPATH=. python benchmarks/triton_sass.py quantize
    PYTHONPATH=. python benchmarks/triton_sass.py append --bits 4   # one-token cache update

Pallas prints the Triton IR it emits when a kernel is traced with
``debug=True``; this script exports the kernel for CUDA (``jax.export``, no GPU
needed), compiles that IR with the installed Triton for sm_90a and prints, per
Triton module: registers per thread (``ptxas -v``), shared memory, and the
instruction mix of each loop in the SASS, in program order (the whole kernel
when it has no loop; prefill: the unmasked key tiles, then the masked ones).
The numbers track the device's within ~10% (jaxlib bundles its own Triton
build), which is enough to compare variants before spending GPU time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import io
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from pallas_kernels import compat, reference, tuned_block_sizes
from pallas_kernels.gpu import append_token as at
from pallas_kernels.gpu import flashq_decode as fd
from pallas_kernels.gpu import flashq_prefill as fp
from pallas_kernels.gpu import quantize as qz
from pallas_kernels.sas import SASParams

S = jax.ShapeDtypeStruct


def triton_modules(fn, *args) -> list[str]:
  """The Triton IR modules Pallas emits for ``fn(*args)`` (``debug=True`` in ``fn``)."""
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
            compat.TRITON_CUSTOM_CALL_TARGET)])(*args)
  lines = buf.getvalue().split("\n")
  modules = []
  for start, line in enumerate(lines):
    if line.startswith("module @"):
      end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("}"))
      text = "\n".join(lines[start:end + 1])
      # Locations print as `[unknown]` or `"name:"(#locN)`; the parser wants neither.
      text = re.sub(r' "[^"\n]*"\(#loc[0-9]*\)', "", text)
      modules.append(re.sub(r" \[unknown\]", "", text))
  return modules


def _ttir_passes(path: str, target, options: dict) -> str:
  """Triton's TTIR passes (canonicalize, combine dot + add, CSE...) over the
  module Pallas emitted: ``triton.compile`` skips its first stage for an IR
  file, while XLA's Triton pipeline on the device runs them."""
  from triton._C.libtriton import ir
  from triton.compiler.compiler import make_backend
  backend = make_backend(target)
  context = ir.context()
  ir.load_dialects(context)
  backend.load_dialects(context)
  module = ir.parse_mlir_module(path, context)
  module.context = context
  module = backend.make_ttir(module, {}, backend.parse_options(options), target.arch)
  return str(module)


def compile_and_report(ttir: str, *, num_warps: int, num_stages: int) -> str:
  import triton  # optional dependency of this tool only
  from triton.backends.compiler import GPUTarget
  bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
  target = GPUTarget("cuda", 90, 32)
  options = dict(num_warps=num_warps, num_stages=num_stages)
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "kernel.ttir")
    with open(src, "w") as f:
      f.write(ttir)
    ttir = _ttir_passes(src, target, options)
    with open(src, "w") as f:
      f.write(ttir)
    kernel = triton.compile(src, target=target, options=options)
    ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
    with open(ptx, "w") as f:
      f.write(kernel.asm["ptx"])
    info = subprocess.run([os.path.join(bin_dir, "ptxas"), "-arch=sm_90a", "-v", ptx,
                           "-o", cubin], capture_output=True, text=True, check=True)
    sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", cubin],
                          capture_output=True, text=True, check=True).stdout
  regs = re.search(r"Used (\d+) registers", info.stdout + info.stderr).group(1)
  spills = re.search(r"(\d+) bytes spill stores", info.stdout + info.stderr)
  instrs = [(int(m.group(1), 16), m.group(2).strip()) for m in
            re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
  loops = sorted((int(m.group(1), 16), addr) for addr, text in instrs
                 if (m := re.search(r"BRA (0x[0-9a-f]+)", text)) and int(m.group(1), 16) < addr)
  spilled = f" ({spills.group(1)} B spilled)" if spills and int(spills.group(1)) else ""
  lines = [f"{regs} registers{spilled}, {kernel.metadata.shared} B shared"]
  for where, (lo, hi) in ([(f"loop {i}", r) for i, r in enumerate(loops)] if loops
                          else [("kernel", (0, instrs[-1][0]))]):
    ops = collections.Counter(
        re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
        for addr, text in instrs if lo <= addr <= hi)
    mix = " ".join(f"{op}:{n}" for op, n in ops.most_common(16))
    lines.append(f"  {where}: {sum(ops.values())} instructions per thread\n    {mix}")
  return "\n".join(lines)


def decode_case(args):
  b, h, t, g, m, d, bits = 32, 8, 8192, args.group, 4, args.head_dim, args.bits
  packed, residual = reference.cache_specs(b, h, t, d, bits=bits, group=g)
  bs = fd.BlockSizes(num_splits=args.splits, num_warps=args.warps or 1,
                     num_stages=args.stages or 1, convert=args.convert or "magic")
  fn = functools.partial(fd.flashq_decode, bits=bits, group=g, block_sizes=bs, debug=True,
                         sas=SASParams(exact=args.exp2))
  return fn, (S((b, h, m, d), jnp.int8), S((b, h, m), jnp.float32), S((b, m), jnp.int32),
              packed, residual, S((b,), jnp.int32))


def prefill_case(args):
  """The API's default path on an H100: its tuned blocks, one K scale per key tile."""
  b, hq, hk, t, d = 2, 32, 32, 4096, args.head_dim
  bs = fp.BlockSizes.get_default(head_dim=d, seq_len_q=t, seq_len_k=t,
                                 device_kind=tuned_block_sizes.H100_SXM)
  bs = dataclasses.replace(bs, num_warps=args.warps or bs.num_warps,
                           num_stages=args.stages or bs.num_stages,
                           convert=args.convert or bs.convert)
  tiles = t // bs.block_k
  fn = functools.partial(fp.flashq_prefill, sas=SASParams(exact=args.exp2), causal=False,
                         block_sizes=bs, debug=True)
  return fn, (S((b, hq, t, d), jnp.int8), S((b, hq, t), jnp.float32),
              S((b, hk, t, d), jnp.int8), S((b, hk, t if args.per_token_k else tiles), jnp.float32),
              S((b, hk, d, t), jnp.int8), S((b, hk, tiles), jnp.float32))


def quantize_case(args):
  x = S((2, 4096, 32, args.head_dim), jnp.bfloat16)
  fn = functools.partial(qz.quantize_qkv, block_q=64, block_k=64, sm_scale=0.088,
                         log2e_fold=True, smooth_k=True, layout="bthd", debug=True)
  return fn, (x, x, x)


def append_case(args):
  b, h, t, d, bits, g = 834, 4, 2176, args.head_dim, args.bits, 64
  packed, window = reference.cache_specs(b, h, t, d, bits=bits, group=g)
  token = reference.ResidualKV(S((b, h, 1, d), jnp.int8), S((b, h, 1), jnp.bfloat16),
                               S((b, h, 1, d), jnp.int8), S((b, h, 1), jnp.bfloat16))
  fn = functools.partial(at.append_token, bits=bits, group=g, debug=True)
  return fn, (packed, window, token, S((b,), jnp.int32), S((b,), jnp.int32))


CASES = {"decode": decode_case, "prefill": prefill_case, "quantize": quantize_case,
         "append": append_case}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("kernel", choices=sorted(CASES))
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--bits", type=int, default=4, choices=(2, 4))
  parser.add_argument("--group", type=int, default=64, help="decode: the stage-2 group (tile)")
  parser.add_argument("--splits", type=int, default=8)
  parser.add_argument("--warps", type=int, help="default: the kernel's tuned value")
  parser.add_argument("--stages", type=int, help="default: the kernel's tuned value")
  parser.add_argument("--sas-polynomial", dest="exp2", action="store_false",
                      help="the SAS polynomial instead of exp2 (the GPU default)")
  parser.add_argument("--convert", choices=("magic", "cvt"),
                      help="decode, prefill: conversions (default: the kernel's)")
  parser.add_argument("--per-token-k", action="store_true",
                      help="prefill: K scales per key (per_token_scales=True)")
  args = parser.parse_args(argv)
  fn, fn_args = CASES[args.kernel](args)
  sizes = fn.keywords.get("block_sizes")
  warps = args.warps or getattr(sizes, "num_warps", 4)
  stages = args.stages or getattr(sizes, "num_stages", 3)
  for ttir in triton_modules(fn, *fn_args):
    name = ttir.split("\n", 1)[0].split()[1]
    print(f"{name}: " + compile_and_report(ttir, num_warps=warps, num_stages=stages))


if __name__ == "__main__":
  main()

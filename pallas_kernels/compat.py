"""The one place where Pallas API differences between JAX versions are handled.

turbojax supports ``jax>=0.10`` (CI: 0.10.x on Python 3.11; the GPU machine:
0.11.x). Kernels import version-dependent names from here, never directly.
"""

from __future__ import annotations

import jax

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

# --- Pallas Triton (GPU) ------------------------------------------------------

# --- Pallas Mosaic TPU ----------------------------------------------------------

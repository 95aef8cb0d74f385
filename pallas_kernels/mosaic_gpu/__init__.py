"""Pallas Mosaic GPU (Hopper and newer) FlashQ kernels, one module each:

- ``flashq_prefill``: ``flashq_prefill(q, q_scale, k, k_scale, v_t, v_scale, ...)``,
  INT8 wgmma (s8 x s8 -> s32) for Q.K^T and P.V, TMA and warp specialization;
  same contract as ``pallas_kernels.gpu.flashq_prefill`` (the portable Triton
  kernel).

Every entry point takes explicit INT8 arrays and has an in-file
``*_reference`` taking the same inputs. The kernels run compiled on sm_90+
GPUs and in the Mosaic GPU interpreter (``interpret=True``) on CPU. Modules are
not imported here (their names equal their entry points').
"""

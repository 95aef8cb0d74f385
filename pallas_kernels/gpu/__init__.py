"""Pallas Triton (GPU) FlashQ kernels, one module each:

- ``flashq_prefill``: ``flashq_prefill(q, q_scale, k, k_scale, v_t, v_scale, ...)``
- ``flashq_decode``: ``flashq_decode(q, q_scale, q_pos, packed, residual, lengths, ...)``
- ``quantize``: ``quantize_qkv(q, k, v, ...)``, the fused INT8 quantizer that
  produces the prefill kernel's inputs.

Every entry point takes explicit INT8/packed arrays and has an in-file
``*_reference`` taking the same inputs. The kernels run compiled on CUDA GPUs
(Ampere, Ada, Hopper) and in interpret mode (``interpret=True``) anywhere.
Modules are not imported here (their names equal their entry points').
"""

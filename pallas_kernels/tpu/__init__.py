"""Pallas Mosaic TPU FlashQ kernels, one module each:

- ``flashq_prefill``: ``flashq_prefill(q, q_scale, k, k_scale, v, v_scale, *,
  sas, causal, query_offset, q_lengths, kv_lengths, local_window, block_sizes,
  interpret, return_residuals)``: INT8 Q.K^T and P.V on the MXU (int32
  accumulation), the SAS online softmax on the VPU, GQA query heads sharing
  each K/V tile, causal / length / local-window block skipping driven by
  scalar-prefetched lengths.
- ``flashq_decode``: ``flashq_decode(q, q_scale, q_pos, packed, residual,
  lengths, *, bits, group, sas, block_sizes, interpret, return_residuals)``:
  a few query rows per KV head against a progressive INT4/INT2 cache (packed
  groups unpacked in-kernel with shifts and masks, exact integer stage-2
  decode) plus the INT8 residual window.

Each module has a ``BlockSizes`` dataclass and, at the bottom, a
``*_reference`` taking the kernel's inputs and calling
``pallas_kernels.reference``. The kernels compile for TPU (v5e and newer: int8
MXU) and run on any platform in the Pallas TPU interpreter
(``interpret=True`` or ``pltpu.force_tpu_interpret_mode()``).
Modules are not imported here (their names equal their entry points').
"""

"""Pallas kernels for FlashQ attention, with their pure-JAX references.

This package never imports ``turbojax``: entry points take explicit arrays
(INT8 codes, scales, packed cache arrays) so that each kernel is testable
against the reference in ``pallas_kernels.reference``.
"""

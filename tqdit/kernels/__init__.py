"""Kernels and the low-bit deployment path: Triton GEMMs (int8, FP8), the fused quantized attention,
the fused elementwise kernels of block reconstruction, and ``lowbit.to_low_bit``, which swaps a
calibrated model's fake-quantized layers for real 8-bit ones.

Importable without the calibration stack: these modules use the quantizer primitives and layers
(``tqdit.quant.quantizers``, ``tqdit.quant.layers``) and never the methods, the search or the
reconstruction. The algorithms, in turn, import nothing from here at module level: they look a fast
path up at call time, where one serves the tensors at hand.
"""

"""Post-training quantization: quantizer primitives, quantized layers, the calibration engine, the methods.

Nothing here knows about Hydra, W&B or files other than the explicit save/load helpers. Import what
you need from its module (``tqdit.quant.methods``, ``tqdit.quant.config``, ...); this package file
imports nothing, so that the kernels can use the primitives without loading the calibration stack.
"""

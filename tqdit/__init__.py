"""tqdit: post-training quantization of Diffusion Transformers, swept under one protocol."""

__version__ = "0.1.0"

"""Data: the embedded MNIST digits (calibration capture joins here with the quantization work)."""

from tqdit.data.mnist import holdout_split, load_digits, to_model_range, to_uint8

__all__ = ["holdout_split", "load_digits", "to_model_range", "to_uint8"]

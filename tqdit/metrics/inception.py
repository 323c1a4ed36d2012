"""The ADM evaluator's Inception-v3 features, through torch-fidelity's TF-compatible port.

Registered with torch-fidelity as ``tqdit-inception-v3``. It wraps torch-fidelity's
``inception-v3-compat`` (the 2015 TensorFlow graph's weights, with TF 1.x bilinear resizing to 299)
and provides the three features the ADM evaluator (openai/guided-diffusion ``evaluations/evaluator.py``)
reads:

- ``pool``    pool3, 2048-d (FID, precision/recall);
- ``logits``  the 1008 logits without the bias (``logits_unbiased``; Inception Score);
- ``spatial`` ``mixed_6/conv`` = ``Mixed_6d.branch1x1`` after its ReLU, 17×17×192, channels-last,
  first 7 channels, flattened to 2023 dims (sFID). torch-fidelity does not expose this layer; a
  forward hook reads it.

Weights: ``feature_extractor_weights_path`` when given, otherwise torch-fidelity's own file in the
torch hub cache (downloaded there if the network allows). When neither is possible the error names
the file and where to put it. Files are checked with ``torch.load(weights_only=True)`` before
torch-fidelity (which loads with ``weights_only=False``) sees them, so a pickle with code is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from tqdit.errors import TqditError
from tqdit.metrics.base import RoleFeatureExtractor

FEATURE_EXTRACTOR_NAME = "tqdit-inception-v3"
INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]
SFID_CHANNELS = 7  # ADM: spatial features [..., :7] of mixed_6/conv


class InceptionWeightsError(TqditError, FileNotFoundError):
    """The Inception-v3 weights are missing, cannot be downloaded, or are not a plain state_dict."""


def default_weights_path() -> Path:
    """Where torch-fidelity keeps its Inception weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def inception_weights(path: str | Path | None = None) -> Path:
    """The weights file to load: ``path``, or torch-fidelity's cached file (downloaded if possible)."""
    if path is not None:
        weights = Path(path).expanduser()
        if not weights.is_file():
            raise InceptionWeightsError(
                f"eval.weights={path}: file not found; it should be torch-fidelity's {INCEPTION_FILE} "
                f"(from {INCEPTION_URL})"
            )
    else:
        weights = default_weights_path()
        if not weights.is_file():
            try:
                weights.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(INCEPTION_URL, str(weights), progress=False)
            except Exception as error:
                raise InceptionWeightsError(
                    f"the Inception-v3 weights {INCEPTION_FILE} are not in {weights.parent} "
                    f"and could not be downloaded ({type(error).__name__}); fetch {INCEPTION_URL} "
                    "on a machine with internet and put it there, "
                    f"or set eval.weights=/path/to/{INCEPTION_FILE}"
                ) from None
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InceptionWeightsError(
            f"cannot read {weights} with torch.load(weights_only=True) ({str(error).splitlines()[0][:120]}); "
            f"it should be torch-fidelity's {INCEPTION_FILE}: download it again"
        ) from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise InceptionWeightsError(
            f"{weights} is not an Inception-v3 state_dict (no fc.weight); "
            f"use torch-fidelity's {INCEPTION_FILE}"
        )
    return weights


class InceptionFeatureExtractor(RoleFeatureExtractor):
    """uint8 (N, 3, H, W) images of any size -> ADM's pool / logits / spatial features (float32)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.weights_path = inception_weights(feature_extractor_weights_path)
        self.inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                     feature_extractor_weights_path=str(self.weights_path))
        self._spatial: torch.Tensor | None = None
        self.inception.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = (
            output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()
        )  # NHWC, like the TF graph

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 299, 299, dtype=torch.uint8)

    def roles(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if images.dim() == 4 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # grayscale, as torch-fidelity's datasets deliver it
        pool, logits = self.inception(images)
        spatial, self._spatial = self._spatial, None
        return pool, logits, spatial


def save_random_weights(path: str | Path, seed: int = 0) -> None:
    """A randomly initialised Inception-v3 of the real architecture, saved as torch-fidelity's file would be.

    For tests and benchmarks where the real weights cannot be downloaded: He-normal convolutions keep
    the activations O(1) through the 94 layers, so the features are not degenerate.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
    from unittest import mock

    torch.manual_seed(seed)
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)

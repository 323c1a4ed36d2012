"""What every tqdit feature network provides: the ADM evaluator's three feature roles."""

from __future__ import annotations

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

FEATURES = ("pool", "logits", "spatial")  # roles: FID & precision/recall, IS, sFID


class RoleFeatureExtractor(FeatureExtractorBase):
    """A torch-fidelity feature extractor providing the ADM evaluator's three roles (FEATURES).

    Subclasses implement ``roles(images) -> (pool, logits, spatial)`` and ``get_dummy_input_for_compile``.
    """

    @staticmethod
    def get_provided_features_list():
        return FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    def roles(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        by_name = dict(zip(FEATURES, self.roles(images)))
        return tuple(by_name[name] for name in self.features_list)

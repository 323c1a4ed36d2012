"""Named DiT configurations: the twelve official ones and the small embedded MNIST model."""

from __future__ import annotations

from tqdit.models.dit import DiT

_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}

# Official configurations (facebookresearch/DiT): latent 4-channel inputs, 1000 ImageNet classes,
# learned sigma. input_size is the latent size: image size / 8 (32 for 256×256, 64 for 512×512).
DIT_CONFIGS: dict[str, dict] = {
    f"DiT-{size}/{patch}": dict(
        depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, in_channels=4, num_classes=1000
    )
    for size, (depth, hidden, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}

# The embedded default: 32×32 single-channel MNIST digits (28×28 padded), 10 classes, patch 4
# (64 tokens), 4 blocks of width 128. Sized so that sampling 500 digits × 50 steps with guidance
# fits a 2-core CPU in about a minute (see README, "Embedded model").
DIT_CONFIGS["DiT-MNIST"] = dict(
    depth=4, hidden_size=128, num_heads=4, patch_size=4, in_channels=1, num_classes=10, input_size=32
)


def build_dit(name: str, input_size: int | None = None, **overrides) -> DiT:
    """A DiT of the named configuration (random initialisation); ``input_size`` in latent pixels."""
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT configuration '{name}': choose one of {', '.join(DIT_CONFIGS)}")
    config = {**DIT_CONFIGS[name], **overrides}
    if input_size is not None:
        config["input_size"] = input_size
    if "input_size" not in config:
        raise ValueError(f"{name} needs input_size (latent size = image size / 8, e.g. 32 for 256×256)")
    return DiT(**config)

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"

# Without a GPU, Triton kernels (the fused quantized attention) run in Triton's interpreter, so
# the CPU suite tests them too. Set before any tqdit module defines a kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def reference():
    """Outputs of the reference DiT code on a small random model (see fixtures/make_reference.py)."""
    path = FIXTURES / "reference_dit.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
    return {
        "state": state,
        "config": json.loads(metadata["config"]),
        "spacings": json.loads(metadata["spacings"]),
        **tensors,
    }


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)

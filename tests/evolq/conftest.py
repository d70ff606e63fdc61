"""Shared fixtures for the evolq quantization-core tests (CPU only, no network; one thread: tests/conftest.py).

The session builds the default architecture with random weights and one calibrated w4a8
QuantizedModel; tests that change scales get a deep copy (``qmodel``), so they never see each
other's changes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from evolq_testing import CALIB_BATCH, CALIB_SIZE, random_vit
from torch import nn

from evolq.qmodel import QuantizedModel
from evolq.zoo import DEFAULT_CHECKPOINT


@pytest.fixture(scope="session")
def fp_model() -> nn.Module:
    """A timm VisionTransformer of the default architecture (28x28x1, patch 4, depth 6, dim 64)."""
    return random_vit(0)


@pytest.fixture(scope="session")
def calib_images() -> torch.Tensor:
    return torch.randn(CALIB_SIZE, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def calibrated_w4a8(fp_model, calib_images) -> QuantizedModel:
    """Calibrated once per session; use ``qmodel`` (a private copy) in tests that change it."""
    return QuantizedModel(fp_model, "w4a8").calibrate(calib_images, batch_size=CALIB_BATCH, progress=False)


@pytest.fixture
def qmodel(calibrated_w4a8) -> QuantizedModel:
    clone = copy.deepcopy(calibrated_w4a8)
    owned = {id(m) for m in clone.modules()}
    assert all(id(layer) in owned for block in clone.blocks for layer in block.layers)
    return clone


@pytest.fixture
def fresh_qmodel(calibrated_w4a8):
    """Factory: another private copy of the calibrated w4a8 model."""
    return lambda: copy.deepcopy(calibrated_w4a8)


@pytest.fixture(scope="session")
def trained_model() -> nn.Module:
    """The shipped default model; skipped while the checkpoint has not been trained yet."""
    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip(f"trained default checkpoint {DEFAULT_CHECKPOINT} does not exist yet")
    from evolq.zoo import load_default

    return load_default()

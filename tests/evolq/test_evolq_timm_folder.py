"""A real timm DeiT (random weights) on a tiny ImageNet-style folder: data -> calibration -> objective."""

import numpy as np
import pytest
import torch
from PIL import Image

from evolq.data import load_data, stack
from evolq.models import create_model
from evolq.objective import BlockObjective
from evolq.qmodel import QuantizedModel
from evolq.quant.config import QuantConfig


def write_image_folder(root, train_per_class=3, val_per_class=1, classes=("cat", "dog"), size=32):
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in classes:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{label}{i}.png")
    return root


@pytest.fixture(scope="module")
def deit():
    torch.manual_seed(0)
    return create_model("deit_tiny_patch16_224")


def test_deit_tiny_through_folder_calibration_and_one_evaluation(deit, tmp_path):
    root = write_image_folder(tmp_path / "images")
    splits = load_data(str(root), deit, calib_size=4, selection_size=2)
    assert (len(splits.calib), len(splits.selection), len(splits.evaluation)) == (4, 2, 2)
    assert not set(splits.calib.indices) & set(splits.selection.indices)
    images, labels = stack(splits.calib)
    assert images.shape == (4, 3, 224, 224) and labels.dtype == torch.int64
    assert set(labels.tolist()) <= {0, 1}
    assert abs(images.mean().item()) < 1.0  # normalized by the model's mean / std, not raw 0..1 pixels

    # w4a8 with min-max activation ranges: the default OMSE search (tested on the small ViT) costs ~15 s here
    config = QuantConfig.preset("w4a8", act_observer="minmax")
    qmodel = QuantizedModel(deit, config).calibrate(images, batch_size=4, progress=False)
    assert qmodel.config.name == "w4a8" and qmodel.config.ptf and qmodel.config.bias_correction
    assert len(qmodel.blocks) == 12
    f = BlockObjective(qmodel, -1, images, batch_size=4)
    assert f.dim == 576 + 192  # the paper's 768 values per DeiT-Tiny block
    value = f(f.x0)
    assert isinstance(value, float) and np.isfinite(value)
    assert f.cache_bytes == 4 * 197 * 192 * 4 + 4 * 1000 * 4

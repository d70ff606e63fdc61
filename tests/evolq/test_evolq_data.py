"""Data: Fashion-MNIST reading, splits and folder errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

import evolq.data
from evolq.data import FMNIST_ENV, load_data, load_fmnist, make_splits
from evolq.errors import UsageError
from evolq.models import create_model
from evolq.zoo import default_architecture

FMNIST = evolq.data.FMNIST_DEFAULT_DIR


@pytest.fixture(scope="module")
def small_model():
    return default_architecture().eval()


def png(path, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size, size), dtype=np.uint8)).save(path)


@pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST package not installed")
def test_fmnist_test_split_is_read_and_normalized():
    images, labels = load_fmnist("test", FMNIST)
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert abs(images.mean().item()) < 0.02 and 0.95 < images.std().item() < 1.05  # mean 0.286, std 0.353 removed


def test_fmnist_unknown_split():
    with pytest.raises(UsageError, match="split 'valid' is unknown; allowed: train, test"):
        load_fmnist("valid")


def test_missing_fmnist_names_both_ways_to_get_it_and_downloads_nothing(tmp_path):
    with pytest.raises(UsageError) as error:
        load_fmnist("train", tmp_path)
    message = str(error.value)
    assert list(tmp_path.iterdir()) == []  # no download attempt (no network at run time)
    assert str(tmp_path) in message and "train-images-idx3-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message and FMNIST_ENV in message
    assert "\n" not in message


def test_fmnist_folder_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(FMNIST_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(UsageError, match="elsewhere"):
        load_fmnist("test")


def test_make_splits_are_seeded_and_disjoint():
    train = TensorDataset(torch.arange(50))
    splits = make_splits(train, train, calib_size=10, selection_size=15, seed=3)
    assert len(splits.calib) == 10 and len(splits.selection) == 15 and splits.evaluation is train
    assert not set(splits.calib.indices) & set(splits.selection.indices)
    again = make_splits(train, train, calib_size=10, selection_size=15, seed=3)
    assert again.calib.indices == splits.calib.indices
    assert make_splits(train, train, 10, 15, seed=4).calib.indices != splits.calib.indices


@pytest.mark.parametrize(
    "calib, selection, phrase",
    [
        (20, 1, "calib size 20 + selection size 1 exceeds the 10 training images; allowed: at most 10 together"),
        (5, 6, "exceeds the 10 training images"),
        (0, 1, "calib size 0 is not allowed"),
        (1, -1, "selection size -1 is not allowed"),
    ],
)
def test_make_splits_sizes_larger_than_the_data(calib, selection, phrase):
    train = TensorDataset(torch.arange(10))
    with pytest.raises(UsageError, match=phrase.replace("+", r"\+")):
        make_splits(train, train, calib_size=calib, selection_size=selection)


def test_missing_data_folder(small_model):
    message = r"data folder '/nonexistent' does not exist; give a folder holding train and val/"
    with pytest.raises(UsageError, match=message):
        load_data("/nonexistent", small_model, calib_size=1, selection_size=1)


def test_folder_without_val(tmp_path, small_model):
    for i in range(3):
        png(tmp_path / "train" / "a" / f"{i}.png")
    with pytest.raises(UsageError, match=r"has no val/ subfolder; expected train and val/"):
        load_data(str(tmp_path), small_model, calib_size=1, selection_size=1)


def test_folder_without_images(tmp_path, small_model):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(UsageError, match="holds no readable images"):
        load_data(str(tmp_path), small_model, calib_size=1, selection_size=1)


def test_folder_with_more_classes_than_the_head(tmp_path, small_model):
    for split in ("train", "val"):
        for c in range(11):
            png(tmp_path / split / f"class{c}" / "0.png")
    with pytest.raises(UsageError, match="has 11 classes but the model's head has 10"):
        load_data(str(tmp_path), small_model, calib_size=1, selection_size=1)


def test_folder_images_fit_the_default_model(tmp_path, small_model):
    for split in ("train", "val"):
        for i in range(3):
            png(tmp_path / split / "a" / f"{i}.png", size=28)
    try:
        splits = load_data(str(tmp_path), small_model, calib_size=1, selection_size=1)
    except UsageError:
        return  # refusing the folder up front, with one line, is fine too
    images, _ = evolq.data.stack(splits.calib)
    assert images.shape[1:] == (1, 28, 28)
    with torch.inference_mode():
        small_model(images)


# -- Fashion-MNIST for any timm ViT -----------------------------------------------------------------
needs_fmnist = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                  reason="Fashion-MNIST package not installed")


@needs_fmnist
def test_the_default_model_gets_fashion_mnist_as_before(small_model):
    dataset = evolq.data.fmnist_for(small_model, "test")
    images, labels = load_fmnist("test")
    assert isinstance(dataset, TensorDataset)
    assert torch.equal(dataset.tensors[0], images) and torch.equal(dataset.tensors[1], labels)


@needs_fmnist
def test_fashion_mnist_is_adapted_to_a_timm_vit_and_runs_through_it():
    model = create_model("vit_tiny_patch16_224", img_size=32)  # the registry users name, a small input
    with pytest.warns(UserWarning, match="1000 classes, Fashion-MNIST 10: its top-1 .* meaningless"):
        splits = load_data("fmnist", model, calib_size=3, selection_size=1)
    image, label = splits.calib[0]
    assert image.shape == (3, 32, 32) and label.dtype == torch.int64
    pixels = evolq.data._fmnist_pixels("train", None)[0][splits.calib.indices[0]]
    resized = torch.nn.functional.interpolate(pixels[None], size=(32, 32), mode="bicubic", align_corners=False)
    mean, std = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.5, 0.5, 0.5])  # vit_tiny's data config
    expected = (resized[0].clamp(0, 1).expand(3, 32, 32) - mean[:, None, None]) / std[:, None, None]
    assert torch.equal(image, expected)
    assert model(torch.stack([splits.calib[i][0] for i in range(3)])).shape == (3, 1000)


@needs_fmnist
def test_a_gray_vit_gets_fashion_mnist_statistics():
    model = create_model("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, num_classes=10)
    dataset = evolq.data.fmnist_for(model, "test")
    assert isinstance(dataset, TensorDataset)  # 1 x 28 x 28: nothing to adapt


def test_a_model_input_that_gray_images_cannot_become_is_one_line():
    model = create_model("vit_tiny_patch16_224", img_size=32, in_chans=4)
    with pytest.raises(UsageError, match="model input of 4 channels cannot be made from gray Fashion-MNIST; "
                                         "allowed with --data fmnist: 1 or 3 channels"):
        load_data("fmnist", model, calib_size=1, selection_size=1)


def test_a_model_without_a_convolution_to_read_its_input_from_is_one_line():
    with pytest.raises(UsageError, match="model 'Linear' has no convolution to read its input channels from") as error:
        load_data("fmnist", torch.nn.Linear(2, 2), calib_size=1, selection_size=1)
    assert "\n" not in str(error.value)

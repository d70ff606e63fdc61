"""Datasets and the calibration / selection / evaluation splits.

Two sources: Fashion-MNIST read from the raw ``*-ubyte.gz`` files (the Debian package
``dataset-fashion-mnist``), and ImageNet-style folders (``train/``, ``val/``) read with
timm's data config for the model. Both end in plain ``(images, labels)`` tensors or a
``torch.utils.data.Dataset`` that :func:`make_splits` cuts into seeded, disjoint splits.
Fashion-MNIST goes to a model that wants other images (any timm ViT) through
:class:`AdaptedImages`: resized, its gray channel repeated, normalized as the model expects.
"""

from __future__ import annotations

import gzip
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from evolq.errors import RunError, UsageError

FMNIST_ENV = "EVOLQ_FMNIST_DIR"
FMNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_SPLITS = ("train", "val")


def fmnist_dir(path: str | os.PathLike | None = None) -> Path:
    """The Fashion-MNIST folder: ``path``, else ``$EVOLQ_FMNIST_DIR``, else the Debian one."""
    return Path(path or os.environ.get(FMNIST_ENV) or FMNIST_DEFAULT_DIR)


def _read_idx(path: Path, header_ints: int) -> np.ndarray:
    """One gzipped IDX file; a damaged one is named in the error rather than failing deep in gzip."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
        header = np.frombuffer(raw[: 4 * header_ints], dtype=">i4")
        data = np.frombuffer(raw[4 * header_ints :], dtype=np.uint8)
        return data.reshape(tuple(int(n) for n in header[1:]) or (-1,))
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise RunError(f"Fashion-MNIST file {str(path)!r} cannot be read ({error}); it is truncated or damaged: "
                       "reinstall dataset-fashion-mnist or copy the file again") from None


def _locate_fmnist_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / "FashionMNIST" / "raw" / name):
        if candidate.is_file():
            return candidate
    return None


def load_fmnist(split: str, path: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized ``(N, 1, 28, 28)`` float images and ``(N,)`` int64 labels of one split."""
    pixels, labels = _fmnist_pixels(split, path)
    return pixels.sub_(FMNIST_MEAN).div_(FMNIST_STD), labels


def _fmnist_pixels(split: str, path: str | os.PathLike | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 1, 28, 28)`` float images in [0, 1] and ``(N,)`` int64 labels of one split."""
    if split not in FMNIST_FILES:
        raise UsageError(f"Fashion-MNIST split {split!r} is unknown; allowed: {', '.join(FMNIST_FILES)}")
    folder = fmnist_dir(path)
    names = FMNIST_FILES[split]
    files = [_locate_fmnist_file(folder, name) for name in names]
    if None in files:
        raise UsageError(
            f"Fashion-MNIST files {names[0]} and {names[1]} not found in {folder}; "
            f"install the Debian package (apt-get install dataset-fashion-mnist), "
            f"or point --data-dir / ${FMNIST_ENV} at a folder holding them"
        )
    images = torch.from_numpy(_read_idx(files[0], 4).copy()).float().div_(255.0).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(files[1], 2).astype(np.int64))
    return images, labels


FMNIST_SHAPE = (1, 28, 28)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")  # timm's names that torch's interpolate shares
FMNIST_CLASSES = 10


class AdaptedImages(Dataset):
    """Fashion-MNIST as a model with another input wants it, one image at a time (a whole split
    at 224 x 224 x 3 would take 36 GB): resized with ``interpolation``, clamped to [0, 1] (as
    8-bit pixels would be), the gray channel repeated, normalized with ``mean`` and ``std``."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, shape: tuple[int, int, int],
                 mean: tuple[float, ...], std: tuple[float, ...], interpolation: str) -> None:
        self.pixels, self.labels, self.shape, self.interpolation = pixels, labels, shape, interpolation
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        channels, height, width = self.shape
        image = self.pixels[index : index + 1]
        if image.shape[-2:] != (height, width):
            extra = {} if self.interpolation == "nearest" else {"align_corners": False}
            image = torch.nn.functional.interpolate(image, size=(height, width), mode=self.interpolation, **extra)
        image = image[0].clamp(0.0, 1.0).expand(channels, height, width)
        return (image - self.mean) / self.std, self.labels[index]


def model_input(model: torch.nn.Module) -> tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...], str]:
    """The input ``model`` takes: (channels, height, width), per-channel mean and std, interpolation.

    The size is the patch embedding's where the model has one (what a ViT or Swin accepts), else
    timm's data config's (a CNN or LeViT); the channels are the first convolution's; mean, std and
    interpolation timm's data config for the model (a gray model without a gray config:
    Fashion-MNIST's own mean and std); a value that does not fit is one line naming it.
    """
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or tuple(config["input_size"][1:])
    channels = _input_channels(model)
    if channels is None:
        raise UsageError(f"model {type(model).__name__!r} has no convolution to read its input channels from; "
                         "allowed with --data fmnist: a model whose first layer is a convolution, "
                         "or --data with an ImageNet-style folder")
    if channels not in (1, 3):
        raise UsageError(f"model input of {channels} channels cannot be made from gray Fashion-MNIST; "
                         "allowed with --data fmnist: 1 or 3 channels, or --data with an ImageNet-style folder")
    mean, std = tuple(config["mean"]), tuple(config["std"])
    if channels == 1 and len(mean) == 3:  # a gray model with timm's RGB default (no config of its own)
        mean, std = (FMNIST_MEAN,), (FMNIST_STD,)
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise UsageError(f"model's data config {name} {values} does not fit its {channels} input channels; "
                             f"allowed: 1 or {channels} values")
    interpolation = config.get("interpolation", "bicubic")
    return (channels, *(int(n) for n in size)), mean, std, interpolation if interpolation in INTERPOLATIONS else "bicubic"


def _input_channels(model: torch.nn.Module) -> int | None:
    """The input channels of the model's first convolution (its stem or patch embedding), quantized or not."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 4:  # a convolution (plain or quantized)
            return weight.shape[1] * getattr(module, "groups", 1)
    return None


def fmnist_for(model: torch.nn.Module, split: str, path: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST for ``model``: as is (normalized with its own mean and std) where the model takes
    1 x 28 x 28 images, like the default model; else adapted to the model's input (:class:`AdaptedImages`)."""
    shape, mean, std, interpolation = model_input(model)
    if shape == FMNIST_SHAPE:
        return TensorDataset(*load_fmnist(split, path))
    return AdaptedImages(*_fmnist_pixels(split, path), shape, mean, std, interpolation)


def image_folder(root: str | os.PathLike, split: str, model: torch.nn.Module) -> Dataset:
    """An ImageNet-style ``root/split/<class>/<image>`` folder with the model's eval transform."""
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    root = Path(root)
    folder = root / split
    if not root.is_dir():
        raise UsageError(f"data folder {str(root)!r} does not exist; give a folder holding {' and '.join(IMAGE_SPLITS)}/")
    if not folder.is_dir():
        raise UsageError(f"data folder {str(root)!r} has no {split}/ subfolder; expected {' and '.join(IMAGE_SPLITS)}/")
    channels, size = model.patch_embed.proj.in_channels, tuple(model.patch_embed.img_size)
    config = resolve_data_config({}, model=model)
    loader = None
    if tuple(config["input_size"]) != (channels, *size):
        # No pretrained config (e.g. the default model): follow the model's own input shape.
        config.update(input_size=(channels, *size), crop_pct=1.0)
        if channels == 1:
            config.update(mean=(FMNIST_MEAN,), std=(FMNIST_STD,))
    if channels == 1:
        loader = _grayscale
    transform = create_transform(**config)
    try:
        dataset = ImageFolder(str(folder), transform=transform, **({"loader": loader} if loader else {}))
    except (FileNotFoundError, OSError) as error:
        raise UsageError(f"data folder {str(folder)!r} holds no readable images: {error}") from None
    classes = getattr(model, "num_classes", None)
    if classes and len(dataset.classes) > classes:
        raise UsageError(
            f"data folder {str(folder)!r} has {len(dataset.classes)} classes but the model's head has {classes}; "
            "allowed: at most as many class folders as the head has outputs"
        )
    return dataset


def _grayscale(path: str):
    from PIL import Image

    with open(path, "rb") as handle:
        return Image.open(handle).convert("L")


@dataclass
class Splits:
    """Disjoint data splits: ``calib`` (search images), ``selection`` (choosing results), ``evaluation``."""

    calib: Dataset
    selection: Dataset
    evaluation: Dataset


def make_splits(
    train: Dataset,
    evaluation: Dataset,
    calib_size: int = 1000,
    selection_size: int = 1000,
    seed: int = 0,
) -> Splits:
    """Seeded, disjoint calibration and selection subsets of ``train``; ``evaluation`` as given."""
    if calib_size < 1:
        raise UsageError(f"calib size {calib_size} is not allowed; allowed: a positive number of images")
    if selection_size < 0:
        raise UsageError(f"selection size {selection_size} is not allowed; allowed: 0 or a positive number of images")
    if calib_size + selection_size > len(train):
        raise UsageError(
            f"calib size {calib_size} + selection size {selection_size} exceeds the {len(train)} training images; "
            f"allowed: at most {len(train)} together"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    return Splits(
        calib=Subset(train, order[:calib_size]),
        selection=Subset(train, order[calib_size : calib_size + selection_size]),
        evaluation=evaluation,
    )


def load_data(
    source: str,
    model: torch.nn.Module,
    calib_size: int = 1000,
    selection_size: int = 1000,
    seed: int = 0,
    data_dir: str | None = None,
) -> Splits:
    """Splits for ``source``: ``"fmnist"`` or the path of an ImageNet-style folder."""
    if source == "fmnist":
        train, evaluation = fmnist_for(model, "train", data_dir), fmnist_for(model, "test", data_dir)
        classes = getattr(model, "num_classes", FMNIST_CLASSES)
        if classes != FMNIST_CLASSES:
            warnings.warn(f"the model's head has {classes} classes, Fashion-MNIST 10: its top-1 on Fashion-MNIST "
                          "labels is meaningless (the search's loss compares with the FP model and is unaffected)",
                          stacklevel=2)
    else:
        train = image_folder(source, "train", model)
        evaluation = image_folder(source, "val", model)
    return make_splits(train, evaluation, calib_size, selection_size, seed)


def stack(dataset: Dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a (small) dataset as two tensors, in order: the calibration set lives in memory."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)

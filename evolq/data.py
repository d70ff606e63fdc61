"""Datasets and the calibration / selection / evaluation splits.

Two sources: Fashion-MNIST read from the raw ``*-ubyte.gz`` files (the Debian package
``dataset-fashion-mnist``), and ImageNet-style folders (``train/``, ``val/``) read with
timm's data config for the model. Both end in plain ``(images, labels)`` tensors or a
``torch.utils.data.Dataset`` that :func:`make_splits` cuts into seeded, disjoint splits.
"""

from __future__ import annotations

import gzip
import os
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
    images = torch.from_numpy(_read_idx(files[0], 4).copy()).float().div_(255.0)
    images = images.sub_(FMNIST_MEAN).div_(FMNIST_STD).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(files[1], 2).astype(np.int64))
    return images, labels


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
        train = TensorDataset(*load_fmnist("train", data_dir))
        evaluation = TensorDataset(*load_fmnist("test", data_dir))
    else:
        train = image_folder(source, "train", model)
        evaluation = image_folder(source, "val", model)
    return make_splits(train, evaluation, calib_size, selection_size, seed)


def stack(dataset: Dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a (small) dataset as two tensors, in order: the calibration set lives in memory."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)

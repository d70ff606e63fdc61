"""Top-1 accuracy: one helper for every place that counts correct predictions."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

Labelled = Dataset | tuple[torch.Tensor, torch.Tensor]


def percent_correct(outputs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy in percent over ``(logits, labels)`` batches (0 for no images)."""
    correct = total = 0
    for logits, labels in outputs:
        correct += (logits.argmax(-1) == labels.to(logits.device)).sum().item()
        total += len(labels)
    return 100.0 * correct / max(total, 1)


def batch_outputs(model: Callable[[torch.Tensor], torch.Tensor], data: Labelled, batch_size: int = 500,
                  device: torch.device | str | None = None, progress: bool = False,
                  desc: str = "evaluate") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits, labels)`` per batch of ``data``: a Dataset, or images and labels as two tensors.

    Images are moved to ``device`` when one is given. Run it under ``torch.inference_mode()``
    (as :func:`top1` does) unless gradients are wanted.
    """
    if isinstance(data, tuple):
        images, labels = data
        pairs: Iterable = zip(images.split(batch_size), labels.split(batch_size))
        count = -(-len(images) // batch_size)
    else:
        pairs = DataLoader(data, batch_size=batch_size)
        count = len(pairs)
    for images, labels in tqdm(pairs, total=count, desc=desc, disable=not progress, leave=False):
        yield model(images if device is None else images.to(device)), labels


@torch.inference_mode()
def top1(model: Callable[[torch.Tensor], torch.Tensor], data: Labelled, batch_size: int = 500,
         progress: bool = False, desc: str = "evaluate", device: torch.device | str | None = None) -> float:
    """Top-1 accuracy in percent of ``model`` (any callable from images to logits) on ``data``."""
    return percent_correct(batch_outputs(model, data, batch_size, device, progress, desc))

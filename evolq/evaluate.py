"""Top-1 accuracy of a model on a dataset, with a progress bar."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm


@torch.inference_mode()
def top1(model: torch.nn.Module, dataset: Dataset, batch_size: int = 500, progress: bool = True,
         desc: str = "evaluate", device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy in percent; batches are moved to ``device``."""
    correct = total = 0
    for images, labels in tqdm(DataLoader(dataset, batch_size=batch_size), desc=desc, disable=not progress, leave=False):
        correct += (model(images.to(device)).argmax(-1).cpu() == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / max(total, 1)

"""``BlockObjective``: a quantized model seen as a black-box function of one block's scale vector.

``f(x)`` is the loss of the quantized model whose block ``k`` has weight scales ``x``, against
the full-precision model's logits on the calibration images. Only what changes is recomputed:
the FP logits are computed once (and can be shared between blocks), the residual stream
entering block ``k`` is cached once per objective, so each evaluation runs blocks ``k..L`` and
the head; only block ``k``'s two layers re-quantize their weights.
"""

from __future__ import annotations

import numpy as np
import torch

from evolq.blocks import Block
from evolq.losses import Loss, get_loss
from evolq.qmodel import QuantizedModel, batches

DEFAULT_BATCH = 100


@torch.no_grad()
def fp_logits(qmodel: QuantizedModel, images: torch.Tensor, batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """The true FP model's logits: the targets every objective compares against.

    Cached tensors are made under ``no_grad`` rather than ``inference_mode`` so that the
    gradient baseline can use them too.
    """
    with qmodel.fp():
        return torch.cat([qmodel(batch) for batch in batches(images, batch_size)])


@torch.inference_mode()
def model_loss(qmodel: QuantizedModel, images: torch.Tensor, targets: torch.Tensor, loss: str | Loss = "infonce",
               batch_size: int = DEFAULT_BATCH) -> float:
    """Mean per-batch loss of the quantized model as it stands (a full forward pass)."""
    loss = get_loss(loss)
    return float(torch.stack([loss(qmodel(x), t) for x, t in zip(batches(images, batch_size),
                                                                   batches(targets, batch_size))]).mean())


class BlockObjective:
    """``f(x) -> float`` over block ``block``'s scale vector; ``f.batch(X)``; ``f.value_and_grad(x)``.

    Build one per block visit: the cached prefix assumes the other blocks' scales stay as they
    were at construction. ``x0`` is the block's vector at construction; calling ``f`` leaves the
    block's scales at the last ``x`` scored.
    """

    def __init__(
        self,
        qmodel: QuantizedModel,
        block: int | Block,
        images: torch.Tensor,
        loss: str | Loss = "infonce",
        batch_size: int = DEFAULT_BATCH,
        targets: torch.Tensor | None = None,
    ) -> None:
        self.qmodel = qmodel
        self.block = block if isinstance(block, Block) else qmodel.block(block)
        self.loss = get_loss(loss)
        self.batch_size = batch_size
        self.targets = fp_logits(qmodel, images, batch_size) if targets is None else targets
        self.x0 = self.block.scales()
        self.dim = self.block.dim
        self.evaluations = 0
        self.images = images
        with torch.no_grad():
            self._inputs = [qmodel.prefix(batch, self.block.index) for batch in self.image_batches()]
        self._targets = self.target_batches()

    def image_batches(self) -> list[torch.Tensor]:
        return list(batches(self.images, self.batch_size))

    def target_batches(self) -> list[torch.Tensor]:
        return list(batches(self.targets, self.batch_size))

    @property
    def cache_bytes(self) -> int:
        """Memory held by the cached block inputs and FP targets."""
        return sum(t.numel() * t.element_size() for t in [*self._inputs, *self._targets])

    def _mean_loss(self) -> torch.Tensor:
        index = self.block.index
        losses = [self.loss(self.qmodel.suffix(h, index), t) for h, t in zip(self._inputs, self._targets)]
        return torch.stack(losses).mean()

    def __call__(self, x: np.ndarray) -> float:
        self.block.set_scales(x)
        self.evaluations += 1
        with torch.inference_mode():
            return float(self._mean_loss())

    def batch(self, candidates: np.ndarray) -> np.ndarray:
        """Scores of several vectors (rows), sharing the cached prefix."""
        return np.array([self(x) for x in np.atleast_2d(candidates)])

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss and its gradient in the scales, through a learnable-scale (straight-through) quantizer.

        Counts as one evaluation; this is what the gradient baseline optimizes with.
        """
        self.block.set_scales(x)
        self.evaluations += 1
        scale = torch.from_numpy(np.asarray(x, dtype=np.float32)).requires_grad_(True)
        layers = self.block.layers
        for layer, piece in zip(layers, self.block.split(scale)):
            layer.scale_override = piece
        try:
            with torch.enable_grad():
                value = self._mean_loss()
                value.backward()
        finally:
            for layer in layers:
                layer.scale_override = None
        return float(value.detach()), scale.grad.double().numpy()

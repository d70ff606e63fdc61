"""Blocks: one attention block's searchable parameters as one flat vector.

As in Evol-Q, a block's vector is the per-output-channel weight scales of its attention's
``qkv`` and ``proj`` linears (DeiT-Tiny: 576 + 192 = 768 values). Zero points stay fixed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from evolq.errors import UsageError
from evolq.quant.attention import QAttention
from evolq.quant.layers import QuantWeightLayer


def check_vector(x: object, dim: int, what: str = "scale vector") -> np.ndarray:
    """``x`` as a float64 vector of length ``dim`` with finite positive values, else a one-line error."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
    try:
        vector = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):
        raise UsageError(f"{what} of type {type(x).__name__} is not numeric; allowed: {dim} positive finite numbers") from None
    if vector.shape != (dim,):
        raise UsageError(f"{what} has shape {vector.shape}; allowed: a flat vector of length {dim}")
    bad = np.flatnonzero(~np.isfinite(vector))
    if bad.size:
        raise UsageError(f"{what} has a non-finite value {vector[bad[0]]} at index {bad[0]}; allowed: finite positive numbers")
    bad = np.flatnonzero(vector <= 0)
    if bad.size:
        raise UsageError(f"{what} has a non-positive value {vector[bad[0]]} at index {bad[0]}; allowed: scales > 0")
    with np.errstate(over="ignore"):
        stored = vector.astype(np.float32)  # scales are kept in float32
    bad = np.flatnonzero(~np.isfinite(stored) | (stored <= 0))
    if bad.size:
        raise UsageError(f"{what} has value {vector[bad[0]]} at index {bad[0]} outside float32's range; "
                         f"allowed: {np.finfo(np.float32).tiny:g} .. {np.finfo(np.float32).max:g}")
    return vector


class Block:
    """An attention block of a quantized model; ``scales()`` / ``set_scales(x)`` read and write its vector."""

    def __init__(self, index: int, name: str, module: nn.Module, layers: list[QuantWeightLayer]) -> None:
        self.index = index
        self.name = name
        self.module = module
        self.layers = layers
        self.sizes = [layer.weight.shape[0] for layer in layers]

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    @property
    def weight_bits(self) -> int:
        return self.layers[0].weight_quant.bit_type.bits

    def scales(self) -> np.ndarray:
        """The block's weight scales, concatenated in layer order (qkv, then proj), as float64."""
        if not all(layer.weight_quant.calibrated for layer in self.layers):
            raise UsageError(f"block {self.index} has no scales yet; calibrate the model first (qmodel.calibrate(images))")
        return torch.cat([layer.weight_quant.scale for layer in self.layers]).double().cpu().numpy()

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """A block vector cut into one piece per layer."""
        return list(torch.split(x, self.sizes))

    def set_scales(self, x: np.ndarray) -> np.ndarray:
        """Write a block vector back (returned as checked, float64); the layers' quantized weights are recomputed."""
        checked = check_vector(x, self.dim, f"block {self.index} scale vector")
        for layer, piece in zip(self.layers, self.split(torch.from_numpy(checked))):
            layer.set_weight_scale(piece.float())
        return checked

    def __repr__(self) -> str:
        return f"Block(index={self.index}, name={self.name!r}, dim={self.dim})"


def discover_blocks(model: nn.Module) -> list[Block]:
    """Every module with a quantized attention ``attn``, in forward order."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "attn", None), QAttention)
    ]
    return [Block(i, name, module, [module.attn.qkv, module.attn.proj]) for i, (name, module) in enumerate(found)]

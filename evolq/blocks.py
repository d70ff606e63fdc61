"""Blocks: one residual block's searchable quantization scales as one flat vector.

Which scales form the vector is the search space:

- ``"paper"`` (Evol-Q's): the per-output-channel weight scales of the attention's ``qkv`` and
  ``proj`` linears (DeiT-Tiny: 576 + 192 = 768 values); for a CNN block, of its convolutions
  (:mod:`evolq.families` says which part of a block each family searches);
- ``"weights"``: the per-output-channel weight scales of every linear or convolution of the
  block (a ViT's qkv, proj, fc1, fc2);
- ``"all"``: those and every activation quantizer's scale inside the block, whatever the
  placement: one value per per-tensor quantizer, and for a PTF quantizer (LayerNorm input) its
  unit scale, the channels keeping their power-of-two factors. Log2 quantizers have no scale.

Zero points stay as calibrated in every space: a new scale stretches the grid about real zero,
which stays exactly representable (GELU's and softmax's zeros, padding), the same kind of move
the paper makes for weights. ``Block.layout`` names the coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from evolq.errors import UsageError
from evolq.families import family_of
from evolq.quant.layers import QuantWeightLayer
from evolq.quant.observers import PTFObserver
from evolq.quant.quantizer import UniformQuantizer

SEARCH_SPACES = ("paper", "weights", "all")


def check_space(space: str) -> str:
    if space not in SEARCH_SPACES:
        raise UsageError(f"search space {space!r} is unknown; allowed: {', '.join(SEARCH_SPACES)}")
    return space


def check_vector(x: object, dim: int, what: str = "scale vector") -> np.ndarray:
    """``x`` as a float64 vector of length ``dim`` with finite positive values, else a one-line error."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
    try:
        vector = np.asarray(x, dtype=np.float64).copy()  # writable also where x is not (arrays Ray passes)
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


@dataclass(frozen=True)
class Segment:
    """Where one quantizer's scales sit in a block vector: ``x[segment.slice]``.

    ``name`` is the quantizer's path inside the block (``attn.qkv.weight_quant``); ``kind`` is
    ``"weight"`` (one scale per output channel), ``"activation"`` (the quantizer's scales as
    they are) or ``"ptf"`` (one unit scale; each channel's scale is it times a power of two).
    """

    name: str
    kind: str
    start: int
    stop: int

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def size(self) -> int:
        return self.stop - self.start


class _Scales:
    """Reads and writes one quantizer's part of a block vector (float32 tensors, as stored)."""

    def __init__(self, name: str, quantizer: UniformQuantizer) -> None:
        self.name, self.quantizer = name, quantizer

    kind = "activation"

    def read(self) -> torch.Tensor:
        return self.quantizer.scale.reshape(-1)

    def write(self, piece: torch.Tensor) -> None:
        # a new tensor (not an in-place change): the cached grids compare identities
        self.quantizer.scale = piece.to(self.quantizer.scale).reshape(self.quantizer.scale.shape).clone()


class _WeightScales(_Scales):
    kind = "weight"

    def __init__(self, name: str, layer: QuantWeightLayer) -> None:
        super().__init__(name, layer.weight_quant)
        self.layer = layer

    def write(self, piece: torch.Tensor) -> None:
        self.layer.set_weight_scale(piece.float())  # also drops the layer's cached quantized weight


class _PowerOfTwoUnit(_Scales):
    """A PTF quantizer's smallest channel scale; every channel keeps its factor (a power of two) over it."""

    kind = "ptf"

    def __init__(self, name: str, quantizer: UniformQuantizer) -> None:
        super().__init__(name, quantizer)
        scale = quantizer.scale.reshape(-1)
        self.factors = torch.round(scale / scale.min())

    def read(self) -> torch.Tensor:
        return self.quantizer.scale.reshape(-1).min().reshape(1)

    def write(self, piece: torch.Tensor) -> None:
        super().write(piece.to(self.quantizer.scale) * self.factors)  # exact: times powers of two


def _weight_layers(module: nn.Module) -> list[tuple[str, QuantWeightLayer]]:
    return [(name, layer) for name, layer in module.named_modules() if isinstance(layer, QuantWeightLayer)]


def _searched(module: nn.Module, part: nn.Module, space: str) -> list[_Scales]:
    """The scales of ``module`` (one block) that ``space`` searches, in forward order; ``part`` is the module
    whose weight layers form the paper's space (a transformer block's attention, a CNN block itself)."""
    prefix = next(name for name, child in module.named_modules() if child is part)
    linears = _weight_layers(module) if space != "paper" else [
        (f"{prefix}.{name}" if prefix else name, layer) for name, layer in _weight_layers(part)]
    found: list[_Scales] = [_WeightScales(f"{name}.weight_quant", layer) for name, layer in linears]
    if space == "all":
        weight_quants = {id(layer.weight_quant) for _, layer in linears}
        for name, quantizer in module.named_modules():
            if isinstance(quantizer, UniformQuantizer) and id(quantizer) not in weight_quants and quantizer.calibrated:
                kind = _PowerOfTwoUnit if isinstance(quantizer.observer, PTFObserver) else _Scales
                found.append(kind(name, quantizer))
    return found


class Block:
    """A residual block of a quantized model; ``scales()`` / ``set_scales(x)`` read and write its vector.

    ``space`` chooses the scales (module docstring); ``layout`` says which coordinate is which.
    """

    def __init__(self, index: int, name: str, module: nn.Module, space: str = "paper",
                 part: nn.Module | None = None) -> None:
        self.index = index
        self.name = name
        self.module = module
        self.part = module.attn if part is None else part  # whose weight layers the paper's space holds
        self.space = check_space(space)
        self._parts: list[_Scales] | None = None
        self._layout: list[Segment] = []

    def _found(self) -> tuple[list[_Scales], list[Segment]]:
        """The searched parts and their layout, found on first use (PTF factors exist once calibrated)."""
        if self._parts is None:
            if not all(layer.weight_quant.calibrated for _, layer in _weight_layers(self.part)):
                raise UsageError(f"block {self.index} has no scales yet; calibrate the model first "
                                 "(qmodel.calibrate(images))")
            parts, start = _searched(self.module, self.part, self.space), 0
            for part in parts:
                size = part.read().numel()
                self._layout.append(Segment(part.name, part.kind, start, start + size))
                start += size
            self._parts = parts
        return self._parts, self._layout

    @property
    def parts(self) -> list[_Scales]:
        return self._found()[0]

    @property
    def layout(self) -> list[Segment]:
        """Every part of the vector: its quantizer's name, its kind and its position."""
        return list(self._found()[1])

    @property
    def layers(self) -> list[QuantWeightLayer]:
        """The linears whose weight scales the vector holds, in vector order."""
        return [part.layer for part in self.parts if isinstance(part, _WeightScales)]

    @property
    def sizes(self) -> list[int]:
        return [segment.size for segment in self.layout]

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    @property
    def weight_bits(self) -> int:
        return self.layers[0].weight_quant.bit_type.bits

    def scales(self) -> np.ndarray:
        """The block's vector (the parts concatenated in layout order), as float64."""
        return torch.cat([part.read() for part in self.parts]).double().cpu().numpy()

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """A block vector cut into one piece per part."""
        return list(torch.split(x, self.sizes))

    def set_scales(self, x: np.ndarray) -> np.ndarray:
        """Write a block vector back (returned as checked, float64); quantized weights are recomputed."""
        checked = check_vector(x, self.dim, f"block {self.index} scale vector")
        for part, piece in zip(self.parts, self.split(torch.from_numpy(checked))):
            part.write(piece)
        return checked

    def __repr__(self) -> str:
        return f"Block(index={self.index}, name={self.name!r}, space={self.space!r})"


def discover_blocks(model: nn.Module, space: str = "paper") -> list[Block]:
    """Every searchable block of a quantized model, in forward order (:mod:`evolq.families`)."""
    family = family_of(model)
    names = {id(module): name for name, module in model.named_modules()}
    searched = [(unit, family.searched(unit)) for unit in family.units(model)]
    blocks = [(unit, part) for unit, part in searched if part is not None]
    return [Block(i, names[id(unit)], unit, space, part) for i, (unit, part) in enumerate(blocks)]

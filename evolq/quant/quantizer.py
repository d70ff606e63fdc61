"""Fake-quantizer modules: observe while calibrating, then quantize-dequantize with fixed parameters."""

from __future__ import annotations

import torch
from torch import nn

from evolq.quant.bits import BitType
from evolq.quant.grid import Grid
from evolq.quant.observers import Observer, fake_quantize, tensor_version
from evolq.quant.onnx import quantize_dequantize


class UniformQuantizer(nn.Module):
    """Uniform affine fake quantization with a scale and zero point learned by an observer.

    ``mode`` is ``"off"`` (identity), ``"observe"`` (identity, statistics recorded) or ``"quant"``.
    Quantization parameters survive switching to ``"off"`` and back.
    """

    def __init__(self, bit_type: BitType, observer: Observer, channel_axis: int | None = None) -> None:
        super().__init__()
        self.bit_type = bit_type
        self.observer = observer
        self.channel_axis = channel_axis
        self.mode = "off"
        self.on_levels = True  # off: every consumer dequantizes (QuantizedModel.dequantized)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))
        self._grid: tuple | None = None  # (scale, zero_point, their versions and the dtype, Grid)

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    def finish_calibration(self) -> None:
        """Fix scale and zero point from what the observer saw."""
        scale, zero_point = self.observer.qparams()
        self.observer.release()
        self.scale = scale.detach().float().reshape(-1 if self.channel_axis is not None else ())
        self.zero_point = zero_point.detach().to(torch.int32).reshape(self.scale.shape)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Fake-quantize ``x`` with the fixed parameters (or a given ``scale``), whatever the mode."""
        if scale is None and self.channel_axis in (None, -1) and not (x.requires_grad and torch.is_grad_enabled()):
            return self.grid(x.dtype).fake_quantize(x)
        scale = self.scale if scale is None else scale
        return fake_quantize(x, scale.to(x.dtype), self.zero_point, self.bit_type, self.channel_axis)

    def grid(self, dtype: torch.dtype) -> Grid:
        """The constants for data of ``dtype`` (per tensor or along the last axis), kept while the parameters stay.

        New ones are made when ``scale`` or ``zero_point`` is replaced or changed in place.
        """
        scale, zero_point = self.scale, self.zero_point
        versions = (tensor_version(scale), tensor_version(zero_point), dtype)
        cached = self._grid
        if cached is None or cached[0] is not scale or cached[1] is not zero_point or cached[2] != versions:
            grid = Grid.of(scale, zero_point, self.bit_type, self.channel_axis, 1, dtype)
            self._grid = cached = (scale, zero_point, versions, grid)
        return cached[3]

    def gives_levels(self, x: torch.Tensor) -> bool:
        """True where :meth:`levels` may stand in for ``forward``: quantizing per tensor, no autograd on ``x``."""
        return (self.on_levels and self.mode == "quant" and self.calibrated and self.channel_axis is None
                and not (x.requires_grad and torch.is_grad_enabled()))

    def levels(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``forward(x) / step`` as whole numbers (:meth:`Grid.levels`); ``inplace`` overwrites ``x``."""
        return self.grid(x.dtype).levels(x, inplace)

    def step(self, dtype: torch.dtype = torch.float32) -> float:
        """The per-tensor scale as a number (in ``dtype``'s precision): the factor from :meth:`levels` to values."""
        return self.grid(dtype).scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observer.update(x)
            return x
        if self.mode == "quant" and self.calibrated:
            if torch.onnx.is_in_onnx_export():
                return quantize_dequantize(x, self.scale, self.zero_point, self.bit_type, self.channel_axis)
            return self.quantize(x)
        return x

    def extra_repr(self) -> str:
        axis = "tensor" if self.channel_axis is None else f"channel(axis={self.channel_axis})"
        return f"{self.bit_type}, {type(self.observer).__name__}, per {axis}, mode={self.mode}"


class Log2Quantizer(nn.Module):
    """Log2 quantization of softmax probabilities in (0, 1]: levels 2^-q, q in 0..2^bits-1, smaller to 0."""

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.bit_type = BitType(bits)
        self.mode = "off"

    calibrated = True

    def finish_calibration(self) -> None:
        """Nothing to fix: the levels are powers of two."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "quant":
            return x
        exponent = torch.round(-torch.log2(x.clamp_min(torch.finfo(x.dtype).tiny)))
        underflow = exponent > self.bit_type.qmax
        restored = torch.exp2(-exponent.clamp(0, self.bit_type.qmax))
        return restored.masked_fill(underflow, 0.0)

    def extra_repr(self) -> str:
        return f"log2, {self.bit_type.bits} bits, mode={self.mode}"

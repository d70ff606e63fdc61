"""``Grid``: a quantizer's constants in the form its elementwise passes use them.

Fake quantization is ``clamp(round(x / s), qmin - z, qmax - z) * s`` (``z`` whole, so this is
exactly ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``). The first three passes give the
grid *levels*; a layer that feeds them into a matmul applies ``s`` to the product instead. A
quantizer keeps its constants (``1 / s`` in the data's dtype, the bounds, ``s``) while its
parameters stay, instead of making them with small tensor operations on every call (1.01x on
DeiT-Tiny, measured by hand: small, but the per-tensor constants are then plain numbers, which
the GEMM's alpha needs anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evolq.quant.bits import BitType

Number = torch.Tensor | float


@dataclass(frozen=True)
class Grid:
    """``1 / s``, the bounds ``qmin - z`` and ``qmax - z``, and ``s``: numbers per tensor, tensors per channel."""

    inverse: Number
    low: Number
    high: Number
    scale: Number

    @classmethod
    def of(cls, scale: torch.Tensor, zero_point: torch.Tensor, bit_type: BitType, channel_axis: int | None,
           ndim: int, dtype: torch.dtype) -> "Grid":
        """The grid for data of ``dtype`` and ``ndim`` dimensions, quantized per tensor or along ``channel_axis``."""
        scale, zero = _along(scale, channel_axis, ndim).to(dtype), _along(zero_point, channel_axis, ndim).to(dtype)
        inverse = torch.reciprocal(scale.to(torch.float32)).to(dtype)
        low, high = bit_type.qmin - zero, bit_type.qmax - zero
        if scale.numel() == 1:
            return cls(float(inverse), float(low), float(high), float(scale))
        if bool((zero == zero.flatten()[0]).all()):  # a shared zero point (PTF): scalar bounds, a faster clamp
            low, high = float(low.flatten()[0]), float(high.flatten()[0])
        return cls(inverse, low, high, scale)

    def levels(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Whole-number levels of ``x`` (three passes); ``inplace`` overwrites ``x``, a temporary nobody else reads.

        Where torch's kernels give +0.0 this can give -0.0; the two compare, add and multiply equal.
        """
        out = x.mul_(self.inverse) if inplace else torch.mul(x, self.inverse)
        return out.round_().clamp_(self.low, self.high)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``levels(x) * s``: equal to torch's fake-quantize kernels (tested), without autograd."""
        return self.levels(x).mul_(self.scale)


def _along(values: torch.Tensor, channel_axis: int | None, ndim: int) -> torch.Tensor:
    """Per-channel ``values`` shaped to broadcast along ``channel_axis`` (per-tensor ones as a 0-dim tensor)."""
    if channel_axis is None:
        return values.reshape(())
    shape = [1] * ndim
    shape[channel_axis] = -1
    return values.reshape(shape)

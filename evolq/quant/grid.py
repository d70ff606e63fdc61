"""``Grid``: a quantizer's constants in the form its elementwise passes use them.

Fake quantization is ``clamp(round(x / s), qmin - z, qmax - z) * s`` (``z`` whole, so this is
exactly ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``). The first three passes give the
grid *levels*; a layer that feeds them into a matmul applies ``s`` to the product instead. A
quantizer keeps its constants (``1 / s`` in the data's dtype, the bounds, ``s``) while its
parameters stay, instead of making them with small tensor operations on every call (1.01x on
DeiT-Tiny, measured by hand: small, but the per-tensor constants are then plain numbers, which
the GEMM's alpha needs anyway). On the CPU the passes run as one (:mod:`evolq.quant.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from evolq.quant import kernels
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
        """Whole-number levels of ``x``; ``inplace`` overwrites ``x``, a temporary nobody else reads.

        Where torch's kernels give +0.0 this can give -0.0; the two compare, add and multiply equal.
        """
        fast = self._in_one_pass(x, x if inplace else None, dequantize=False)
        if fast is not None:
            return fast
        out = x.mul_(self.inverse) if inplace else torch.mul(x, self.inverse)
        return out.round_().clamp_(self.low, self.high)

    def fake_quantize(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``levels(x) * s``: equal to torch's fake-quantize kernels (tested), without autograd; ``inplace``
        overwrites ``x``, a temporary nobody else reads."""
        fast = self._in_one_pass(x, x if inplace else None, dequantize=True)
        return fast if fast is not None else self.levels(x, inplace).mul_(self.scale)

    def _in_one_pass(self, x: torch.Tensor, out: torch.Tensor | None, dequantize: bool) -> torch.Tensor | None:
        """The compiled kernel's result (same numbers as torch's passes), or None where it does not apply."""
        if not kernels.accepts(x):
            return None
        params = self.packed
        if params.dim() == 2 and (x.dim() == 0 or params.shape[1] != x.shape[-1]):
            return None
        return kernels.quantize(x, params, out, dequantize)

    @cached_property
    def packed(self) -> torch.Tensor:
        """inverse, low, high, scale as the kernel takes them: ``(4,)`` per tensor, ``(4, columns)`` per last-axis
        column; an empty tensor where the grid runs along another axis (the kernel then does not apply)."""
        values = (self.inverse, self.low, self.high, self.scale)
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if not tensors:
            return torch.tensor(values, dtype=torch.float32)
        columns = tensors[0].numel()
        if any(t.shape[-1] != columns or t.numel() != columns for t in tensors):
            return torch.empty(0, 0)
        return torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(-1).expand(columns).cpu() for v in values])


def _along(values: torch.Tensor, channel_axis: int | None, ndim: int) -> torch.Tensor:
    """Per-channel ``values`` shaped to broadcast along ``channel_axis`` (per-tensor ones as a 0-dim tensor)."""
    if channel_axis is None:
        return values.reshape(())
    shape = [1] * ndim
    shape[channel_axis] = -1
    return values.reshape(shape)

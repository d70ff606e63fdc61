"""evolq's quantizers as standard ONNX nodes, for :func:`evolq.export.export_onnx` (which explains the choices).

Each function here runs only while ``torch.onnx.export`` traces a model: it returns the nodes'
symbolic results (``torch.onnx.ops.symbolic``), which hold no numbers in eager mode.
"""

from __future__ import annotations

import torch

from evolq.quant.bits import BitType

OPSET = 20  # QuantizeLinear/DequantizeLinear with per-axis scales and uint8/int8 storage: ONNX Runtime >= 1.17


def storage_type(bit_type: BitType) -> torch.dtype:
    """The 8-bit integer type that holds ``bit_type``'s levels plus their zero point."""
    return torch.int8 if bit_type.signed else torch.uint8


def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bit_type: BitType,
                        axis: int | None) -> torch.Tensor:
    """A QuantizeLinear/DequantizeLinear pair for fake quantization of ``x``, per tensor or along ``axis``.

    QuantizeLinear saturates at its storage type's range (0..255); a narrower grid (4-bit activations)
    gets its range from a clamp before it, to ``(qmin - z) * s`` and ``(qmax - z) * s``, whose
    quantized values are the end levels: the same numbers as rounding first and clamping the levels.
    """
    storage = storage_type(bit_type)
    zero = zero_point.to(storage)
    if (bit_type.qmin, bit_type.qmax) != (torch.iinfo(storage).min, torch.iinfo(storage).max):
        low, high = (bit_type.qmin - zero_point) * scale, (bit_type.qmax - zero_point) * scale
        x = torch.clamp(x, low, high)  # per-channel bounds broadcast along the last axis, PTF's only channel axis
    attributes = {} if axis is None else {"axis": axis}
    quantized = torch.onnx.ops.symbolic("QuantizeLinear", (x, scale, zero), attributes, dtype=storage,
                                        shape=x.shape, version=OPSET)
    return torch.onnx.ops.symbolic("DequantizeLinear", (quantized, scale, zero), attributes, dtype=x.dtype,
                                   shape=x.shape, version=OPSET)


def frexp_shifts(size: torch.Tensor, bits: int, most: int) -> torch.Tensor:
    """``(bits - e).clamp(0, most)`` for frexp's exponent ``e`` of ``size`` >= 0, from comparisons (ONNX has no frexp).

    For size > 0, ``e = floor(log2(size)) + 1``, so ``bits - e`` counts the powers of two ``2^k``,
    ``k < bits``, that exceed ``size``; counting only ``k >= bits - most`` is the clamp. frexp gives
    ``e = 0`` for zero.
    """
    powers = torch.exp2(torch.arange(bits - most, bits, dtype=size.dtype, device=size.device))
    count = (size.unsqueeze(-1) < powers).sum(-1)
    return torch.where(size == 0, min(bits, most), count)

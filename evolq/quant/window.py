"""Swin's window attention with its matmul inputs quantized: q, k, v on the qkv output, the softmax output.

timm's ``WindowAttention`` computes the scores explicitly when its fused path is off, and
applies its softmax as a module: so the quantized version is the same module with a quantized
``qkv`` (its output, q, k and v on one grid, as FQ-ViT's fully quantized ViT shares it), the
fused path off and the softmax followed by its quantizer. The relative position bias and the
shifted-window mask are added in float, as in FQ-ViT's Swin. ``proj`` is quantized with the
other linears.
"""

from __future__ import annotations

from torch import nn

from evolq.quant.config import QuantConfig
from evolq.quant.generic import quantized_layer, softmax_quantizer


def quantize_window_attention(attn: nn.Module, config: QuantConfig) -> None:
    """Quantize one timm ``WindowAttention`` in place (module docstring)."""
    attn.fused_attn = False
    attn.qkv = quantized_layer(attn.qkv, config, quantize_output=True)
    attn.softmax = nn.Sequential(attn.softmax, softmax_quantizer(config))

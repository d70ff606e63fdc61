"""LeViT's attention (and attention downsampling) with its matmul inputs quantized.

timm's LeViT applies the softmax as a tensor method, so this module runs the same arithmetic as
``Attention.forward`` / ``AttentionDownsample.forward`` (sequence layout) with the softmax output
quantized. q, k and v are quantized on the output of the layer that makes them (``qkv``, or
``kv`` and ``q`` when downsampling: their linears quantize their outputs), and the projection
quantizes its input (after Hardswish) like every linear. The learned attention biases are added
in float. The wrapped module keeps its parameters and bias cache.
"""

from __future__ import annotations

import torch
from torch import nn

from evolq.quant.config import QuantConfig
from evolq.quant.generic import quantized_layer, softmax_quantizer


class QLevitAttention(nn.Module):
    """timm LeViT's ``Attention`` or ``AttentionDownsample`` (``use_conv=False``) with quantized matmul inputs."""

    def __init__(self, attn: nn.Module, config: QuantConfig) -> None:
        super().__init__()
        self.attn = attn
        for producer in (getattr(attn, "qkv", None), getattr(attn, "kv", None), getattr(attn, "q", None)):
            if producer is not None:
                norm = producer.ln if isinstance(producer, nn.Sequential) else producer  # q: (Downsample, LinearNorm)
                norm.linear = quantized_layer(norm.linear, config, quantize_output=True)
        self.softmax_quant = softmax_quantizer(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        batch, tokens, _ = x.shape
        if hasattr(attn, "qkv"):
            q, k, v = attn.qkv(x).view(batch, tokens, attn.num_heads, -1).split(
                [attn.key_dim, attn.key_dim, attn.val_dim], dim=3)
            q = q.permute(0, 2, 1, 3)
        else:
            k, v = attn.kv(x).view(batch, tokens, attn.num_heads, -1).split([attn.key_dim, attn.val_dim], dim=3)
            q = attn.q(x).view(batch, -1, attn.num_heads, attn.key_dim).permute(0, 2, 1, 3)
        scores = q @ k.permute(0, 2, 3, 1) * attn.scale + attn.get_attention_biases(x.device)
        probabilities = self.softmax_quant(scores.softmax(dim=-1))
        out = (probabilities @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(batch, -1, attn.val_attn_dim)
        return attn.proj(out)

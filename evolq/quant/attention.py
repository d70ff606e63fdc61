"""Attention with its matmul inputs (q, k, v) and softmax output fake-quantized, as in FQ-ViT."""

from __future__ import annotations

import torch
from torch import nn

from evolq.quant.layers import QLinear


class QAttention(nn.Module):
    """Drop-in for timm's ``Attention``: same parameters, explicit (non-fused) attention math."""

    def __init__(self, attn: nn.Module, qkv: QLinear, proj: QLinear, q_quant: nn.Module, k_quant: nn.Module,
                 v_quant: nn.Module, softmax_quant: nn.Module) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.qkv, self.proj = qkv, proj
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self.q_quant, self.k_quant, self.v_quant = q_quant, k_quant, v_quant
        self.softmax_quant = softmax_quant

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("quantized attention supports unmasked (ViT) attention only")
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.softmax_quant(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj(x)

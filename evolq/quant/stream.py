"""The residual stream of a fully quantized ViT: the embedding sum and every block's additions.

In FQ-ViT's placement (``QuantConfig(placement="full")``) the residual stream itself is
quantized after every addition, with power-of-two factors (PTF), and that quantized stream is
both what the skip connection carries on and what the next LayerNorm reads, as an integer
input. The quantizer of the stream after an addition is the input quantizer of the LayerNorm
that reads it next (``norm1`` of the next block, ``norm2`` of the same block, or the model's
final norm), so the stream is rounded where it is read: a block's input is the sum before
that rounding, which keeps ``QuantizedModel.prefix`` / ``suffix`` a clean cut.
"""

from __future__ import annotations

import torch
from torch import nn

from evolq.errors import UsageError
from evolq.quant.layers import QLayerNorm


class QResidualBlock(nn.Module):
    """timm's ViT ``Block`` whose skip connections carry the quantized stream (its own modules, reused)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        if not isinstance(block.norm1, QLayerNorm) or not isinstance(block.norm2, QLayerNorm):
            raise UsageError(f"block type {type(block).__name__} has no LayerNorms to quantize the stream at; "
                             "allowed: timm ViT blocks with norm1 and norm2 LayerNorms (or placement 'inputs')")
        self.norm1, self.attn, self.ls1, self.drop_path1 = block.norm1, block.attn, block.ls1, block.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1.input_quant(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1.normalize(x))))
        x = self.norm2.input_quant(x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2.normalize(x))))


class QPositionEmbedding(nn.Module):
    """timm ViT's token sequence and position embedding, each quantized before their sum (FQ-ViT).

    The prefix tokens (class, then distillation or register tokens) and the patch tokens are
    quantized together on one grid, the position embedding on its own; their sum is left for
    the first block's stream quantizer. Holds only the quantizers: the tokens and the position
    embedding stay the model's parameters, handed in by :meth:`forward`.
    """

    def __init__(self, tokens_quant: nn.Module, position_quant: nn.Module) -> None:
        super().__init__()
        self.tokens_quant = tokens_quant
        self.position_quant = position_quant

    @staticmethod
    def check(vit: nn.Module) -> None:
        """A one-line error for the position-embedding variants this does not cover."""
        unsupported = [name for name, present in (
            ("no position embedding", getattr(vit, "pos_embed", None) is None),
            ("position embedding without the class token (no_embed_class)", getattr(vit, "no_embed_class", False)),
            ("dynamic image size", getattr(vit, "dynamic_img_size", False)),
        ) if present]
        if unsupported:
            raise UsageError(f"placement 'full' does not support a ViT with {unsupported[0]}; "
                             "allowed: placement 'inputs' for this model")

    def forward(self, vit: nn.Module, patches: torch.Tensor) -> torch.Tensor:
        prefix = [token.expand(patches.shape[0], -1, -1) for token in prefix_tokens(vit)]
        tokens = self.tokens_quant(torch.cat([*prefix, patches], dim=1) if prefix else patches)
        return vit.pos_drop(tokens + self.position_quant(vit.pos_embed))


def prefix_tokens(vit: nn.Module) -> list[torch.Tensor]:
    """The learned tokens placed before the patches, in timm's order: class, then distillation or register tokens."""
    names = ("cls_token", "dist_token", "reg_token")
    return [token for token in (getattr(vit, name, None) for name in names) if token is not None]

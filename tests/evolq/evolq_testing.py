"""Constants and builders shared by the evolq tests (a uniquely named module, importable from any test)."""

from __future__ import annotations

import math

import torch
from torch import nn

from evolq.zoo import DEFAULT_ARCH, default_architecture

DEPTH = DEFAULT_ARCH["depth"]  # 6
EMBED = DEFAULT_ARCH["embed_dim"]  # 64
CLASSES = DEFAULT_ARCH["num_classes"]  # 10
TOKENS = (DEFAULT_ARCH["img_size"] // DEFAULT_ARCH["patch_size"]) ** 2 + 1  # 49 patches + class token
CALIB_SIZE = 200
CALIB_BATCH = 40  # OMSE chooses on the last batch: smaller batches calibrate faster
# The quantized model on grid levels against its dequantized form (or autograd's pass): another order
# of float operations rounds a few activations onto the neighbouring grid level, which moves a loss
# by up to ~2e-5 relative (measured: benchmarks/objective.py on DeiT-Tiny, and in the tests).
LEVELS_RTOL = 1e-4


def random_vit(seed: int = 0) -> nn.Module:
    """The default architecture with random weights whose logits depend on the input.

    timm's own init (std 0.02 linears) leaves every image with nearly the same logits, which makes
    the infoNCE loss almost flat; 1/sqrt(fan_in) linears make the quantization error visible. Its
    class token (std 1e-6) is also ~30x smaller than the patch tokens, so 8-bit quantization of the
    residual stream before block 0's LayerNorm wipes it out (w8a8 logits 21% off); a class token and
    position embedding of a trained model's size keep w8a8 near 2%.
    """
    torch.manual_seed(seed)
    return spread_random_weights(default_architecture())


def spread_random_weights(model: nn.Module) -> nn.Module:
    """``model`` (a timm ViT) with 1/sqrt(fan_in) linears and a trained model's size of class token and
    position embedding, drawn from torch's current seed (see :func:`random_vit` for why)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 1.0 / math.sqrt(module.in_features))
                module.bias.normal_(0.0, 0.02)
        model.cls_token.normal_(0.0, 1.0)
        model.pos_embed.normal_(0.0, 0.5)
    return model.eval()

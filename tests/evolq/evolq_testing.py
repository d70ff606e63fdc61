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
# of float operations rounds a few activations onto the neighbouring grid level, which moves logits by
# whole output steps and the loss with them. One row of 100 moved by one step (0.021 on logits of norm
# ~2) moves the infoNCE loss (~23) by at most 8/100 * 0.021/2 = 8e-4, 3.6e-5 relative
# (infonce_shift_bound): 1e-4 allows about three such rows. Measured: up to 1.9e-5 (levels) and
# 4.6e-6 (autograd) with torch, MKL and the kernels on their AVX-512, AVX2 and SSE paths, 1 or 2 threads.
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


U = 2.0**-24  # float32's unit roundoff: a correctly rounded operation is within U relative of exact


def infonce_shift_bound(logits: torch.Tensor, other: torch.Tensor, loss: float, batch: int) -> float:
    """The most the infoNCE loss (the mean over batches of ``batch`` rows, as ``model_loss`` computes it) can
    change when the quantized logits change from ``other`` to ``logits``, the FP targets fixed.

    Row i enters only its own cross-entropy, through q_i = z_i / |z_i|, which moves by at most
    2 |dz_i| / |z_i|; its logits q_i . k_j / T (|k_j| = 1) move by that over T, and the cross-entropy
    (a logsumexp minus one of its entries) by at most twice the largest of those. The loss is 2T times
    the mean over the N rows: at most (8 / N) sum_i |dz_i| / |z_i|. Both evaluations round on their own:
    sums of ``batch`` exponentials, a 10-term product, the normalizations, the means: within
    (batch + 32) U of |loss| each.
    """
    change = (logits - other).double().norm(dim=-1) / other.double().norm(dim=-1)
    return float(8 / len(other) * change.sum()) + 2 * (batch + 32) * U * abs(loss)


def assert_only_neighbouring_levels(logits: torch.Tensor, plain: torch.Tensor, step: float) -> None:
    """The whole model's logits (on the head's output grid) agree but where float rounding moved a value
    onto a neighbouring level upstream: each off by whole grid steps, all together by little.

    Both are on the grid, so every difference is a whole number of steps (up to the rounding of
    level * step). How many move is no float bound: it depends on how the machine's GEMMs and kernels
    round (torch, MKL and the kernels on their AVX-512, AVX2 and SSE paths, one thread or two: up to
    2.5 % of the logits, 3 steps, 0.09 % of their mean size in the attention tests here; 21 %, 5 steps,
    0.6 % with one-image chunks on the AVX2 paths). A mistake in the arithmetic (a wrong scale, grid or
    layout) moves the logits by a fair part of the quantization error, ~20 % of their size: allowed 2 %.
    """
    steps = (logits - plain).abs() / step
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)
    assert (logits - plain).abs().mean() <= 0.02 * plain.abs().mean(), f"{int((steps > 0.5).sum())} logits moved"


# Small random-weight instances of every non-ViT family (timm names, their kwargs, the input side):
# a few blocks each, so that calibration and a forward take well under a second on one thread.
SMALL_FAMILY_MODELS = {
    "resnet": ("resnet18", {}, 32),
    "efficientnet": ("mobilenetv2_050", {}, 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=24, depths=(2, 2), num_heads=(2, 4)), 56),
    "levit": ("levit_128s", dict(img_size=64), 64),
}


def small_family_model(family: str, seed: int = 0) -> tuple[nn.Module, int]:
    """A small random-weight timm model of ``family`` (10 classes) in eval mode, and its input side.

    BatchNorm statistics are drawn too (timm's fresh ones are mean 0, variance 1, which would make
    folding a no-op that a test could not tell from a wrong fold).
    """
    import timm

    name, kwargs, side = SMALL_FAMILY_MODELS[family]
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **kwargs)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, side, side))  # timm's says 224
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model.eval(), side

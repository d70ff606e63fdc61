"""Fold BatchNorm into the convolution or linear layer before it, as a CNN deployment does.

A timm module registers a layer's BatchNorm right after the layer (``conv1``/``bn1``,
``Sequential(conv, bn)``, LeViT's ``LinearNorm``), so a BatchNorm that directly follows a
``Conv2d`` or ``Linear`` of as many outputs among its parent's children is folded into it: the
layer's weight and bias take the normalization (eval statistics), and the BatchNorm is replaced
by what it applied besides (timm's ``BatchNormAct2d`` keeps its dropout and activation). The
folded model computes the same function up to float rounding (tested per family); its weights
are what per-channel weight quantization then sees. A BatchNorm before a layer (LeViT's head)
stays as it is.
"""

from __future__ import annotations

import torch
from torch import nn
from timm.layers import BatchNormAct2d

FOLDABLE = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _outputs(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


@torch.no_grad()
def fold_into(layer: nn.Module, norm: nn.modules.batchnorm._BatchNorm) -> None:
    """``layer`` then ``norm`` (eval mode) as one ``layer``: weight and bias rescaled per output channel."""
    gain = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        gain = gain * norm.weight
    shift = -norm.running_mean * gain + (norm.bias if norm.bias is not None else 0)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(norm.running_mean)
    layer.weight.mul_(gain.reshape(-1, *([1] * (layer.weight.dim() - 1))))
    layer.bias = nn.Parameter(bias * gain + shift)


def _rest_of(norm: nn.Module) -> nn.Module:
    """What ``norm`` applies besides the normalization."""
    if isinstance(norm, BatchNormAct2d):
        return nn.Sequential(norm.drop, norm.act)
    return nn.Identity()


def fold_batch_norms(model: nn.Module) -> int:
    """Fold every BatchNorm that follows a ``Conv2d``/``Linear`` (module docstring), in place; returns how many."""
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, layer), (name, norm) in zip(children, children[1:]):
            if (isinstance(layer, FOLDABLE) and isinstance(norm, NORMS) and norm.track_running_stats
                    and norm.num_features == _outputs(layer)):
                fold_into(layer, norm)
                setattr(parent, name, _rest_of(norm))
                folded += 1
    return folded

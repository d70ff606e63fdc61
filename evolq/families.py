"""Model families: how evolq quantizes a kind of timm model and where its forward pass splits into blocks.

Every family reads its model as one sequence: ``embed(model, x)`` gives the tensor entering the
first unit, the ``units`` (residual blocks, and the downsampling or patch-merging layers between
stages) run one after another, ``head(model, h)`` gives the logits. A unit is a searchable
*block* where ``searched(unit)`` names the part whose weight scales form the paper's vector: the
attention of a transformer block (its qkv- and projection-like linears), or the whole residual
block of a CNN (every convolution). Cutting the sequence at a block gives
:meth:`evolq.QuantizedModel.prefix` and ``suffix`` for every family alike.

| family | timm names | blocks | quantization |
|---|---|---|---|
| ``vit`` | ``vit_*``, ``deit_*`` | every ``Block`` | FQ-ViT's (:mod:`evolq.quant.convert`) |
| ``resnet`` | ``resnet*``, ``resnext*``, ``wide_resnet*``, ``seresnet*`` | every residual block | :mod:`evolq.quant.generic`, BatchNorm folded |
| ``efficientnet`` | ``mobilenetv2_*``, ``efficientnet_*``, ``tf_efficientnet_*`` | every (inverted) residual block | likewise |
| ``swin`` | ``swin_*`` (v1) | every ``SwinTransformerBlock`` | likewise, softmax output quantized |
| ``levit`` | ``levit_*`` (not ``levit_conv_*``) | every ``LevitBlock`` and attention downsample | likewise, BatchNorm folded, softmax quantized |
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from timm.models.efficientnet import EfficientNet
from timm.models.levit import Levit, LevitBlock, LevitDownsample
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import VisionTransformer

from evolq.errors import UsageError
from evolq.quant.config import QuantConfig
from evolq.quant.convert import convert_vit
from evolq.quant.attention import QAttention
from evolq.quant.fold import fold_batch_norms
from evolq.quant.generic import quantize_layers, quantize_outputs
from evolq.quant.levit import QLevitAttention
from evolq.quant.window import quantize_window_attention


@dataclass(frozen=True)
class Family:
    """One kind of timm model as evolq reads it (module docstring)."""

    name: str
    patterns: tuple[str, ...]  # timm model names, fnmatch patterns
    model_types: tuple[type, ...]
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    units: Callable[[nn.Module], list[nn.Module]]
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    searched: Callable[[nn.Module], nn.Module | None]  # the paper space's part of a unit; None: not a block
    quantize: Callable[[nn.Module, QuantConfig], nn.Module]  # in place, returns the model
    chunked: bool = False  # blocks may run a few images at a time (QuantizedModel.CHUNK_ELEMENTS)

    def takes(self, name: str) -> bool:
        return any(fnmatch.fnmatch(name.split(".")[0], pattern) for pattern in self.patterns)


def _quantize_with(prepare: Callable[[nn.Module, QuantConfig], None]):
    """The quantization of a non-ViT family: fold BatchNorms, the family's own ``prepare`` (its attention),
    every other layer (the classifier's output too), and under ``placement="full"`` every unit's output."""

    def quantize(model: nn.Module, config: QuantConfig) -> nn.Module:
        family = family_of(model)
        fold_batch_norms(model)
        prepare(model, config)
        quantize_layers(model, config, outputs=_classifiers(model))
        if config.placement == "full":
            quantize_outputs(family.units(model), config)
        return model

    return quantize


def _classifiers(model: nn.Module) -> list[str]:
    """Paths of the linears that give the logits (their outputs are quantized, as ViT's head is)."""
    found = model.get_classifier()  # LeViT's distilled models give (head, head_dist)
    heads = [module for module in (found if isinstance(found, tuple) else (found,)) if isinstance(module, nn.Module)]
    ids = {id(layer) for head in heads for layer in head.modules() if isinstance(layer, nn.Linear)}
    return [path for path, module in model.named_modules() if id(module) in ids]


def _nothing(model: nn.Module, config: QuantConfig) -> None:
    """CNNs have no attention to prepare."""


def _swin_attention(model: nn.Module, config: QuantConfig) -> None:
    for block in _swin_units(model):
        if isinstance(block, SwinTransformerBlock):
            quantize_window_attention(block.attn, config)


def _levit_attention(model: nn.Module, config: QuantConfig) -> None:
    if model.use_conv:
        raise UsageError("LeViT's convolutional variant (levit_conv_*) is not supported; allowed: a levit_* name "
                         "without 'conv' (its tokens are a sequence)")
    for unit in _levit_units(model):
        name = "attn" if isinstance(unit, LevitBlock) else "attn_downsample"
        setattr(unit, name, QLevitAttention(getattr(unit, name), config))


def _not_identity(modules) -> list[nn.Module]:
    return [module for module in modules if not isinstance(module, nn.Identity)]


def _vit_embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The residual stream entering the first block (with the quantized position embedding of "full")."""
    patches = model.patch_embed(x)
    embedding = getattr(model, "quant_embedding", None)
    tokens = model._pos_embed(patches) if embedding is None else embedding(model, patches)
    return model.norm_pre(model.patch_drop(tokens))


def _resnet_units(model: ResNet) -> list[nn.Module]:
    return [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]


def _efficientnet_units(model: EfficientNet) -> list[nn.Module]:
    return [block for stage in model.blocks for block in stage]


def _swin_units(model: SwinTransformer) -> list[nn.Module]:
    return [unit for stage in model.layers for unit in _not_identity([stage.downsample, *stage.blocks])]


def _levit_units(model: Levit) -> list[nn.Module]:
    return [unit for stage in model.stages for unit in _not_identity([stage.downsample, *stage.blocks])]


def _levit_attention_of(unit: nn.Module) -> nn.Module | None:
    if isinstance(unit, LevitBlock):
        return unit.attn
    return unit.attn_downsample if isinstance(unit, LevitDownsample) else None


FAMILIES: tuple[Family, ...] = (
    Family(
        "vit", ("vit_*", "deit_*"), (VisionTransformer,),
        embed=_vit_embed,
        units=lambda model: list(model.blocks),
        head=lambda model, h: model.forward_head(model.norm(h)),
        searched=lambda unit: unit.attn if isinstance(getattr(unit, "attn", None), QAttention) else None,
        quantize=convert_vit,
        chunked=True,
    ),
    Family(
        "resnet", ("resnet*", "resnext*", "wide_resnet*", "seresnet*"), (ResNet,),
        embed=lambda model, x: model.maxpool(model.act1(model.bn1(model.conv1(x)))),
        units=_resnet_units,
        head=lambda model, h: model.forward_head(h),
        searched=lambda unit: unit,
        quantize=_quantize_with(_nothing),
    ),
    Family(
        "efficientnet", ("mobilenetv2_*", "efficientnet_*", "tf_efficientnet_*"), (EfficientNet,),
        embed=lambda model, x: model.bn1(model.conv_stem(x)),
        units=_efficientnet_units,
        head=lambda model, h: model.forward_head(model.bn2(model.conv_head(h))),
        searched=lambda unit: unit,
        quantize=_quantize_with(_nothing),
    ),
    Family(
        "swin", ("swin_*",), (SwinTransformer,),
        embed=lambda model, x: model.patch_embed(x),
        units=_swin_units,
        head=lambda model, h: model.forward_head(model.norm(h)),
        searched=lambda unit: unit.attn if isinstance(unit, SwinTransformerBlock) else None,
        quantize=_quantize_with(_swin_attention),
    ),
    Family(
        "levit", ("levit_*",), (Levit,),
        embed=lambda model, x: model.stem(x).flatten(2).transpose(1, 2),
        units=_levit_units,
        head=lambda model, h: model.forward_head(h),
        searched=_levit_attention_of,
        quantize=_quantize_with(_levit_attention),
    ),
)

SUPPORTED_PATTERNS = tuple(pattern for family in FAMILIES for pattern in family.patterns)


def family_of(model: nn.Module) -> Family:
    """The family of a timm model object, else a one-line error naming the supported ones."""
    for family in FAMILIES:
        if isinstance(model, family.model_types):
            return family
    allowed = ", ".join(t.__name__ for family in FAMILIES for t in family.model_types)
    raise UsageError(f"model type {type(model).__name__} is not supported; allowed: timm {allowed} models "
                     f"({', '.join(SUPPORTED_PATTERNS)})")


def family_named(name: str) -> Family | None:
    """The family whose name patterns take the timm model name ``name``, or None."""
    return next((family for family in FAMILIES if family.takes(name)), None)

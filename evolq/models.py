"""Models by name: ``"default"`` (the embedded Fashion-MNIST ViT) or a timm name of a supported family."""

from __future__ import annotations

import difflib

import timm
import torch

from evolq.errors import RunError, UsageError
from evolq.families import SUPPORTED_PATTERNS, family_named, family_of
from evolq.files import load_weights
from evolq.zoo import ZOO


def _check_name(name: str) -> None:
    allowed = ", ".join(SUPPORTED_PATTERNS)
    if family_named(name) is None:
        raise UsageError(f"model {name!r} is not supported; allowed: {', '.join(ZOO)} or a timm name matching {allowed} "
                         "(e.g. deit_tiny_patch16_224, resnet18, swin_tiny_patch4_window7_224, levit_128s)")
    if not timm.is_model(name):
        known = timm.list_models(list(SUPPORTED_PATTERNS))
        close = difflib.get_close_matches(name.split(".")[0], known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"model {name!r} is unknown to timm{hint}; allowed: {', '.join(ZOO)} or a timm name matching {allowed}")


def create_model(name: str = "default", checkpoint: str | None = None, pretrained: bool = False,
                 **kwargs) -> torch.nn.Module:
    """An FP model in eval mode; ``checkpoint`` (safetensors or weights-only torch file) overrides the weights."""
    if name in ZOO:
        return ZOO[name].load(checkpoint)
    _check_name(name)
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except (RuntimeError, OSError) as error:
        raise RunError(f"timm could not build {name!r} (pretrained weights need a hub download): "
                       f"{str(error).splitlines()[0][:200]}") from None
    family_of(model)  # a name the patterns take may still build another class (resnetv2_50: ResNetV2)
    if checkpoint is not None:
        load_weights(model, checkpoint, name)
    return model.eval()

"""Models by name: ``"default"`` (the embedded Fashion-MNIST ViT) or any timm ViT / DeiT name."""

from __future__ import annotations

import difflib

import timm
import torch

from evolq.errors import RunError, UsageError
from evolq.files import load_weights
from evolq.zoo import load_default

SUPPORTED_FAMILIES = ("vit_", "deit_")


def _check_name(name: str) -> None:
    if not name.startswith(SUPPORTED_FAMILIES):
        raise UsageError(f"model {name!r} is not supported; allowed: 'default' or a timm name starting with "
                         f"{' or '.join(SUPPORTED_FAMILIES)} (e.g. deit_tiny_patch16_224)")
    if not timm.is_model(name):
        known = timm.list_models(["vit_*", "deit_*"])
        close = difflib.get_close_matches(name.split(".")[0], known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"model {name!r} is unknown to timm{hint}; allowed: 'default' or a timm vit_*/deit_* name")


def create_model(name: str = "default", checkpoint: str | None = None, pretrained: bool = False,
                 **kwargs) -> torch.nn.Module:
    """An FP model in eval mode; ``checkpoint`` (safetensors or weights-only torch file) overrides the weights."""
    if name == "default":
        return load_default(checkpoint)
    _check_name(name)
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except (RuntimeError, OSError) as error:
        raise RunError(f"timm could not build {name!r} (pretrained weights need a hub download): "
                       f"{str(error).splitlines()[0][:200]}") from None
    if checkpoint is not None:
        load_weights(model, checkpoint, name)
    return model.eval()

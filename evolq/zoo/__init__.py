"""The embedded models: small timm models trained by ``evolq train-default`` on Fashion-MNIST.

``default`` is the ViT every measurement in the README uses; ``default-cnn``, ``default-swin``
and ``default-levit`` are one small model of each other family (``evolq.families``). Each ships
as ``<file>.safetensors`` with its model card ``<file>.json`` (architecture, recipe, seed, test
top-1, sha256) and loads offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn
from timm.models.levit import Levit
from timm.models.resnet import BasicBlock, ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from evolq.errors import UsageError
from evolq.files import load_weights

ZOO_DIR = Path(__file__).parent
FMNIST_CONFIG = dict(mean=(0.2860,), std=(0.3530,), interpolation="bilinear", crop_pct=1.0)  # evolq.data's

# Architecture of the default model: a timm VisionTransformer for 28x28x1 images.
DEFAULT_ARCH = dict(
    img_size=28,
    patch_size=4,
    in_chans=1,
    num_classes=10,
    embed_dim=64,
    depth=6,
    num_heads=4,
    mlp_ratio=4.0,
    qkv_bias=True,
)


@dataclass(frozen=True)
class ZooModel:
    """One embedded model: its ``--model`` name, files, timm class and arguments, and input size."""

    name: str
    file: str
    family: type[nn.Module]
    arch: dict
    input_size: tuple[int, int, int] = (1, 28, 28)
    epochs: int = 20  # the recipe's default for this model
    extra: dict = field(default_factory=dict)  # constructor arguments that are not plain JSON (classes)

    @property
    def checkpoint(self) -> Path:
        return ZOO_DIR / f"{self.file}.safetensors"

    @property
    def card(self) -> Path:
        return ZOO_DIR / f"{self.file}.json"

    def architecture(self) -> nn.Module:
        """The architecture with freshly initialised weights (from torch's current seed), and the data config
        that makes evolq feed it Fashion-MNIST at its input size."""
        model = self.family(**self.arch, **self.extra)
        model.pretrained_cfg = dict(input_size=self.input_size, **FMNIST_CONFIG)
        return model

    def architecture_record(self) -> dict:
        """The architecture as its model card records it: the timm class's path and the arguments (classes by name)."""
        family = self.family
        return dict(family=f"{family.__module__}.{family.__name__}", **self.arch,
                    **{key: value.__name__ for key, value in self.extra.items()})

    def load(self, checkpoint: str | Path | None = None) -> nn.Module:
        """The trained model in eval mode, from the shipped file (or ``checkpoint``), offline."""
        if checkpoint is None and not self.checkpoint.is_file():
            raise UsageError(f"embedded model {self.name!r} is not shipped yet; allowed: train it with "
                             f"'evolq train-default --model {self.name}' and pass --checkpoint with its file")
        return load_weights(self.architecture(), checkpoint or self.checkpoint, self.name).eval()


ZOO: dict[str, ZooModel] = {entry.name: entry for entry in (
    ZooModel("default", "fmnist_vit", VisionTransformer, DEFAULT_ARCH),
    ZooModel("default-cnn", "fmnist_resnet", ResNet,
             dict(layers=(1, 1, 1, 1), in_chans=1, num_classes=10, stem_width=32, channels=(32, 64, 128, 256)),
             epochs=8, extra=dict(block=BasicBlock)),
    ZooModel("default-swin", "fmnist_swin", SwinTransformer,
             dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depths=(2, 2),
                  num_heads=(2, 4), window_size=7), epochs=10),
    ZooModel("default-levit", "fmnist_levit", Levit,
             dict(img_size=56, in_chans=1, num_classes=10, embed_dim=(64, 128), key_dim=16, depth=(2, 2),
                  num_heads=(2, 4), stem_type="s8"), input_size=(1, 56, 56), epochs=12),
)}


def zoo_model(name: str) -> ZooModel:
    """The embedded model called ``name``, else a one-line error naming them."""
    if name not in ZOO:
        raise UsageError(f"embedded model {name!r} is unknown; allowed: {', '.join(ZOO)}")
    return ZOO[name]


DEFAULT_CHECKPOINT = ZOO["default"].checkpoint
DEFAULT_CARD = ZOO["default"].card


def default_architecture() -> VisionTransformer:
    """The default model's architecture with freshly initialised weights."""
    return ZOO["default"].architecture()


def load_default(checkpoint: str | Path | None = None) -> VisionTransformer:
    """The trained default model in eval mode, loaded offline from the shipped safetensors file."""
    return ZOO["default"].load(checkpoint)


def model_card(name: str = "default") -> dict:
    """The shipped model card of an embedded model: architecture, recipe, seed, measured test top-1, sha256."""
    return json.loads(zoo_model(name).card.read_text())

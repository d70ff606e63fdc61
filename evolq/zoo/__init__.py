"""The embedded default model: a small timm ViT trained by ``evolq train-default`` on Fashion-MNIST."""

from __future__ import annotations

import json
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

from evolq.files import load_weights

ZOO_DIR = Path(__file__).parent
DEFAULT_CHECKPOINT = ZOO_DIR / "fmnist_vit.safetensors"
DEFAULT_CARD = ZOO_DIR / "fmnist_vit.json"

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


def default_architecture() -> VisionTransformer:
    """The default model's architecture with freshly initialised weights."""
    return VisionTransformer(**DEFAULT_ARCH)


def load_default(checkpoint: str | Path | None = None) -> VisionTransformer:
    """The trained default model in eval mode, loaded offline from the shipped safetensors file."""
    return load_weights(default_architecture(), checkpoint or DEFAULT_CHECKPOINT, "default").eval()


def model_card() -> dict:
    """The shipped model card: architecture, recipe, seed, measured test top-1, sha256."""
    return json.loads(DEFAULT_CARD.read_text())

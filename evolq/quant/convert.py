"""Swap a timm VisionTransformer's modules for their fake-quantized versions (in place).

``QuantConfig.placement`` chooses where quantizers go: ``"full"`` is FQ-ViT's fully quantized
ViT, as the released Evol-Q code builds it; ``"inputs"`` quantizes the inputs of the matmuls
and LayerNorms only (docs/evolq.md lists both, tensor by tensor).
"""

from __future__ import annotations

from torch import nn
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer

from evolq.errors import UsageError
from evolq.quant.attention import QAttention
from evolq.quant.bits import BitType
from evolq.quant.config import QuantConfig
from evolq.quant.layers import QConv2d, QLayerNorm, QLinear, QMlp
from evolq.quant.generic import activation_quantizer, softmax_quantizer, weight_quantizer
from evolq.quant.observers import make_observer
from evolq.quant.quantizer import UniformQuantizer
from evolq.quant.stream import QPositionEmbedding, QResidualBlock


def _layer_norm(norm: nn.Module, config: QuantConfig) -> nn.Module:
    if not isinstance(norm, nn.LayerNorm):
        return norm
    if not config.ptf:
        return QLayerNorm(norm, activation_quantizer(config))
    bit_type = BitType(config.abits)
    return QLayerNorm(norm, UniformQuantizer(bit_type, make_observer("ptf", bit_type), channel_axis=-1))


def _linear(linear: nn.Linear, config: QuantConfig, quantize_output: bool = False, owns_input: bool = False) -> QLinear:
    output = activation_quantizer(config) if quantize_output else None
    return QLinear(linear, activation_quantizer(config), weight_quantizer(config), output, config.bias_correction, owns_input=owns_input)


def _makes_new_tensors(module: nn.Module) -> bool:
    """Whether ``module``'s output is a temporary of its own (a norm or activation), not its input passed on."""
    return not isinstance(module, nn.Identity)


def _attention(attn: nn.Module, config: QuantConfig, owns_input: bool) -> QAttention:
    """"full": one quantizer on the qkv output, one on the scores, one on proj's output; "inputs": q, k, v each."""
    full = config.placement == "full"
    parts = [nn.Identity() for _ in range(3)] if full else [activation_quantizer(config) for _ in range(3)]
    return QAttention(
        attn,
        qkv=_linear(attn.qkv, config, owns_input=owns_input),
        proj=_linear(attn.proj, config, quantize_output=full, owns_input=True),  # attention's own output
        q_quant=parts[0],
        k_quant=parts[1],
        v_quant=parts[2],
        softmax_quant=softmax_quantizer(config),
        qkv_quant=activation_quantizer(config) if full else None,
        score_quant=activation_quantizer(config) if full else None,
    )


def _integer_final_norm(model: VisionTransformer) -> None:
    """The LayerNorm right before the head runs in integers onto the head's input grid, as the blocks' norms do."""
    head = getattr(model, "head", None)
    if not isinstance(head, QLinear):
        return
    final = model.fc_norm if isinstance(model.fc_norm, QLayerNorm) else model.norm
    if isinstance(final, QLayerNorm) and (final is model.fc_norm or isinstance(model.fc_norm, nn.Identity)):
        final.integer_output(head.input_quant)


def convert_vit(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Quantize every Linear (head included), the patch embedding, attention inputs, softmax and LayerNorm inputs;
    under ``placement="full"`` also every op's output and the residual stream, with integer LayerNorms."""
    if not isinstance(model, VisionTransformer):
        raise UsageError(
            f"model type {type(model).__name__} is not supported; allowed: timm VisionTransformer models (vit_*, deit_*)"
        )
    full = config.placement == "full"
    if full:
        QPositionEmbedding.check(model)
        model.quant_embedding = QPositionEmbedding(activation_quantizer(config), activation_quantizer(config))
    embed = model.patch_embed.proj
    model.patch_embed.proj = QConv2d(embed, activation_quantizer(config), weight_quantizer(config), activation_quantizer(config) if full else None,
                                     config.bias_correction)
    for index, block in enumerate(model.blocks):
        if not hasattr(block, "attn") or not hasattr(block.attn, "qkv") or not hasattr(block, "mlp"):
            raise UsageError(f"block type {type(block).__name__} is not supported; allowed: timm ViT blocks with attn.qkv and mlp")
        block.norm1 = _layer_norm(block.norm1, config)
        block.attn = _attention(block.attn, config, owns_input=_makes_new_tensors(block.norm1))
        block.norm2 = _layer_norm(block.norm2, config)
        # a linear layer fed by a norm or activation may round that temporary in place
        block.mlp.fc1 = _linear(block.mlp.fc1, config, owns_input=_makes_new_tensors(block.norm2))
        block.mlp.fc2 = _linear(block.mlp.fc2, config, quantize_output=full,
                                owns_input=_makes_new_tensors(block.mlp.act))
        if type(block.mlp) is Mlp:
            block.mlp = QMlp(block.mlp)
        if full:
            model.blocks[index] = QResidualBlock(block)
            block.norm1.integer_output(block.attn.qkv.input_quant)
            block.norm2.integer_output(block.mlp.fc1.input_quant)
    model.norm = _layer_norm(model.norm, config)
    model.fc_norm = _layer_norm(model.fc_norm, config)
    for name in ("head", "head_dist"):
        if isinstance(getattr(model, name, None), nn.Linear):
            setattr(model, name, _linear(getattr(model, name), config, quantize_output=True))
    if full:
        _integer_final_norm(model)
    return model

"""Quantize any timm model layer by layer: the CNN, Swin and LeViT families (ViT has its own FQ-ViT placement).

Under both placements every ``Conv2d`` and ``Linear`` gets a fake-quantized input (per tensor,
the activation observer) and weight (per output channel, min-max, after BatchNorm folding), as
the ViT layers do; the classifier's logits and the outputs named by the family (the attention's
q/k/v producers, one quantizer for the three) are quantized too. ``placement="full"`` also
quantizes the output of every unit of the model's sequence (each residual block, downsampling
or patch-merging layer), so no float tensor crosses a block boundary: the skip connections
carry the quantized stream. ``"inputs"`` leaves those outputs in float. The quantizer helpers
here serve the ViT's conversion too, and :func:`quantize_image_apart` every family.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from evolq.quant.bits import BitType
from evolq.quant.config import QuantConfig
from evolq.quant.layers import QConv2d, QLinear, QuantWeightLayer
from evolq.quant.observers import MinMaxObserver, make_observer
from evolq.quant.quantizer import Log2Quantizer, UniformQuantizer


def activation_quantizer(config: QuantConfig, bits: int | None = None) -> UniformQuantizer:
    """A per-tensor activation quantizer of ``config``'s observer and bits (or ``bits``)."""
    bit_type = BitType(config.abits if bits is None else bits)
    return UniformQuantizer(bit_type, make_observer(config.act_observer, bit_type))


def quantize_image_apart(model: nn.Module, config: QuantConfig) -> None:
    """The image's quantizer at ``config.input_bits`` where that is set: the input quantizer of the model's
    first weight layer (timm builds every model's stem or patch embedding first)."""
    if config.input_bits is not None:
        first = next(module for module in model.modules() if isinstance(module, QuantWeightLayer))
        first.input_quant = activation_quantizer(config, config.input_bits)


def weight_quantizer(config: QuantConfig) -> UniformQuantizer:
    """A per-output-channel min-max weight quantizer of ``config``'s bits."""
    bit_type = BitType(config.wbits)
    return UniformQuantizer(bit_type, MinMaxObserver(bit_type, channel_axis=0), channel_axis=0)


def softmax_quantizer(config: QuantConfig) -> nn.Module:
    """The softmax output's quantizer: log2, or uniform, observed like the other activations ("full") or
    min-max ("inputs")."""
    if config.softmax == "log2":
        return Log2Quantizer(config.softmax_bits)
    bit_type = BitType(config.softmax_bits)
    observer = make_observer(config.act_observer, bit_type) if config.placement == "full" else MinMaxObserver(bit_type)
    return UniformQuantizer(bit_type, observer)


def quantized_layer(layer: nn.Module, config: QuantConfig, quantize_output: bool = False) -> QuantWeightLayer:
    """``layer`` (a ``Linear`` or ``Conv2d``) with quantized input and weight, and output if asked."""
    kind = QLinear if isinstance(layer, nn.Linear) else QConv2d
    output = activation_quantizer(config) if quantize_output else None
    return kind(layer, activation_quantizer(config), weight_quantizer(config), output, config.bias_correction)


def quantize_layers(model: nn.Module, config: QuantConfig, outputs: Iterable[str] = ()) -> None:
    """Swap every ``Linear``/``Conv2d`` of ``model`` not yet quantized; those at the paths ``outputs`` also
    quantize their output."""
    outputs = set(outputs)
    for path, layer in list(model.named_modules()):
        if type(layer) in (nn.Linear, nn.Conv2d):
            parent, _, name = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, name, quantized_layer(layer, config, quantize_output=path in outputs))


def _quantize_output(unit: nn.Module, inputs: tuple, output):
    return unit.output_quant(output)


def quantize_outputs(units: Iterable[nn.Module], config: QuantConfig) -> None:
    """Every unit's output quantized (``placement="full"``): an ``output_quant`` submodule applied by a hook."""
    for unit in units:
        unit.output_quant = activation_quantizer(config)
        unit.register_forward_hook(_quantize_output)

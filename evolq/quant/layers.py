"""Quantized layers that replace a timm ViT's modules: weights per output channel, inputs per tensor.

Each layer keeps its full-precision parameters, so switching quantization off gives back the
FP model exactly. The fake-quantized weight is cached and recomputed only when the weight
scale changes (the search changes one block's scales at a time).

Without autograd a linear layer does not dequantize its input: it multiplies the input's grid
levels by its weight and applies the input scale to the product, inside the GEMM
(``s * (levels @ W.T) + b``, the same value as ``(s * levels) @ W.T + b`` up to float rounding).
That saves two passes over every input; a layer whose input is a temporary that nothing else
reads (``owns_input``, set by :func:`evolq.quant.convert.convert_vit`) also rounds it in place.
The MLP's hidden layer and the LayerNorms' quantized inputs run in compiled one-pass kernels
where those apply (:class:`QMlp`, :class:`QLayerNorm`, :mod:`evolq.quant.kernels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evolq.quant import kernels
from evolq.quant.grid import Grid
from evolq.quant.onnx import frexp_shifts
from evolq.quant.quantizer import UniformQuantizer


def correct_weight_bias(quantized: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Match each output channel's mean and std of the quantized weight to the FP weight."""
    q_mean, ratio, w_mean = bias_correction(quantized, weight)
    return (quantized - q_mean) * ratio + w_mean


def bias_correction(quantized: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The terms of :func:`correct_weight_bias` per output channel: the quantized weight's mean, the ratio
    of the standard deviations (FP over quantized) and the FP weight's mean."""
    dims = tuple(range(1, weight.dim()))
    q_mean, q_std = quantized.mean(dims, keepdim=True), quantized.std(dims, keepdim=True)
    w_mean, w_std = weight.mean(dims, keepdim=True), weight.std(dims, keepdim=True)
    ratio = torch.where(q_std > 0, w_std / q_std.clamp_min(1e-12), torch.ones_like(q_std))
    return q_mean, ratio, w_mean


class QuantWeightLayer(nn.Module):
    """Shared part of :class:`QLinear` and :class:`QConv2d`: quantized input, weight and optional output."""

    def __init__(self, layer: nn.Module, input_quant: nn.Module, weight_quant: UniformQuantizer,
                 output_quant: nn.Module | None = None, bias_correction: bool = False) -> None:
        super().__init__()
        self.weight = layer.weight
        self.bias = layer.bias
        self.input_quant = input_quant
        self.weight_quant = weight_quant
        self.output_quant = output_quant if output_quant is not None else nn.Identity()
        self.bias_correction = bias_correction
        self._cached_weight: torch.Tensor | None = None
        self.scale_override: torch.Tensor | None = None  # a differentiable scale, for gradient methods
        self.stored_weight: nn.Module | None = None  # the weight as ONNX export writes it (evolq.export)

    @property
    def quantizing(self) -> bool:
        return self.weight_quant.mode == "quant" and self.weight_quant.calibrated

    def calibrate_weight(self) -> None:
        """Weight quantization parameters from the weight itself (min-max per output channel)."""
        self.weight_quant.observer.update(self.weight)
        self.weight_quant.finish_calibration()
        self.invalidate()

    def invalidate(self) -> None:
        self._cached_weight = None

    def set_weight_scale(self, scale: torch.Tensor) -> None:
        self.weight_quant.scale = scale.to(self.weight_quant.scale)
        self.invalidate()

    def quantized_weight(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as the quantized model sees it; differentiable in ``scale`` when one is given."""
        if scale is not None:
            return self._finish(ste_fake_quantize(self.weight.detach(), scale, self.weight_quant))
        if self._cached_weight is None:
            # A plain tensor, not an inference tensor: the cache also serves gradient passes.
            with torch.inference_mode(False), torch.no_grad():
                self._cached_weight = self._finish(self.weight_quant.quantize(self.weight.detach()))
        return self._cached_weight

    def _finish(self, quantized: torch.Tensor) -> torch.Tensor:
        return correct_weight_bias(quantized, self.weight.detach()) if self.bias_correction else quantized

    def tracked(self) -> bool:
        """True where this layer's output would carry gradients through its weight or bias (grad mode on)."""
        bias_tracked = self.bias is not None and self.bias.requires_grad
        return torch.is_grad_enabled() and (self.effective_weight().requires_grad or bias_tracked)

    def effective_weight(self) -> torch.Tensor:
        if not self.quantizing:
            return self.weight
        if self.stored_weight is not None and torch.onnx.is_in_onnx_export():
            return self.stored_weight()
        return self.quantized_weight(self.scale_override)

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quant(self.compute(self.input_quant(x), self.effective_weight()))


class QLinear(QuantWeightLayer):
    """``nn.Linear`` with fake-quantized input and weight; ``owns_input`` lets it overwrite its input."""

    def __init__(self, *args, owns_input: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.owns_input = owns_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_quant(self._linear(x, self.bias))

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)`` before its bias and any output quantizer: for a consumer that adds the bias in its own pass."""
        return self._linear(x, None)

    def from_levels(self, levels: torch.Tensor) -> torch.Tensor:
        """``forward`` of an input already rounded onto this layer's input grid (whole-number levels)."""
        step = self.input_quant.step(levels.dtype)
        return self.output_quant(linear_on_levels(levels, self.effective_weight(), self.bias, step))

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight, quant = self.effective_weight(), self.input_quant
        if isinstance(quant, UniformQuantizer) and quant.gives_levels(x) and not weight.requires_grad:
            return linear_on_levels(quant.levels(x, inplace=self.owns_input), weight, bias, quant.step(x.dtype))
        return F.linear(quant(x), weight, bias)


def linear_on_levels(levels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     step: float) -> torch.Tensor:
    """``F.linear(step * levels, weight, bias)`` with ``step`` applied as the GEMM's alpha: one pass, not two."""
    flat = levels.reshape(-1, levels.shape[-1])
    out = torch.addmm(flat.new_empty(1, 1) if bias is None else bias, flat, weight.t(), beta=0 if bias is None else 1,
                      alpha=step)
    return out.reshape(*levels.shape[:-1], weight.shape[0])


class QMlp(nn.Module):
    """timm's ``Mlp`` with quantized ``fc1`` and ``fc2``; without autograd its hidden layer is made in one pass.

    Where it applies (exact GELU, no hidden norm, no active dropout, the compiled kernels here)
    fc1's product gets its bias, GELU and fc2's input rounding in one pass
    (:func:`evolq.quant.kernels.bias_gelu_levels_`); otherwise the modules run in timm's order.
    """

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.drop1, self.norm, self.fc2, self.drop2 = (
            mlp.fc1, mlp.act, mlp.drop1, mlp.norm, mlp.fc2, mlp.drop2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._in_one_pass(x):
            return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))
        hidden = self.fc1.product(x)
        kernels.bias_gelu_levels_(hidden, self.fc1.bias, self.fc2.input_quant.grid(hidden.dtype).packed)
        return self.drop2(self.fc2.from_levels(hidden))

    def _in_one_pass(self, x: torch.Tensor) -> bool:
        quant, dropout = self.fc2.input_quant, getattr(self.drop1, "p", 0.0)
        return (isinstance(self.act, nn.GELU) and self.act.approximate == "none" and isinstance(self.norm, nn.Identity)
                and not (self.training and dropout) and isinstance(self.fc1.output_quant, nn.Identity)
                and isinstance(quant, UniformQuantizer) and quant.gives_levels(x)
                and not self.fc1.tracked() and not self.fc2.tracked()
                and kernels.accepts(x) and (self.fc1.bias is None or kernels.accepts(self.fc1.bias)))


class QConv2d(QuantWeightLayer):
    """``nn.Conv2d`` (the patch embedding) with fake-quantized input and weight."""

    def __init__(self, layer: nn.Conv2d, *args, **kwargs) -> None:
        super().__init__(layer, *args, **kwargs)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups

    def compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def ste_fake_quantize(weight: torch.Tensor, scale: torch.Tensor, quantizer: UniformQuantizer) -> torch.Tensor:
    """Fake quantization with a learnable per-channel scale (LSQ-style straight-through gradient)."""
    bits = quantizer.bit_type
    return torch._fake_quantize_learnable_per_channel_affine(
        weight, scale, quantizer.zero_point.float(), 0, bits.qmin, bits.qmax, 1.0
    )


class QLayerNorm(nn.Module):
    """LayerNorm whose input (the residual stream) is fake-quantized with power-of-two factors.

    Without autograd, per-channel (PTF) quantization and LayerNorm run in one compiled pass
    (:func:`evolq.quant.kernels.ptf_layer_norm`) where it applies. With an output quantizer
    (``integer_output``, the fully quantized placement) it is FQ-ViT's integer LayerNorm instead:
    :func:`integer_layer_norm` on the quantized input, its output on that quantizer's grid.
    """

    def __init__(self, norm: nn.LayerNorm, input_quant: UniformQuantizer) -> None:
        super().__init__()
        self.norm = norm
        self.input_quant = input_quant
        self._output: tuple[UniformQuantizer, ...] = ()  # the consumer's quantizer, not a submodule of ours

    def integer_output(self, quant: UniformQuantizer) -> None:
        """Run as an integer LayerNorm whose output lands on ``quant``'s grid (the next layer's input quantizer).

        The quantizer stays the consumer's (its state is saved there); this norm only reads its scale.
        """
        self._output = (quant,)

    @property
    def integer(self) -> bool:
        """True while this norm computes in integers: an output grid is set and both quantizers quantize."""
        quants = (self.input_quant, *self._output)
        return bool(self._output) and all(q.mode == "quant" and q.calibrated for q in quants)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.integer:
            return self.normalize(self.input_quant(x))
        grid = self._one_pass_grid(x)
        if grid is not None:
            norm = self.norm
            return kernels.ptf_layer_norm(x, grid.packed, norm.weight, norm.bias, norm.eps)
        return self.norm(self.input_quant(x))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm of an input already on ``input_quant``'s grid (integer where :attr:`integer`, else float)."""
        if not self.integer:
            return self.norm(x)
        return integer_layer_norm(x, self.input_quant, self._output[0], self.norm.weight, self.norm.bias)

    def _one_pass_grid(self, x: torch.Tensor) -> Grid | None:
        """The input's grid where the compiled kernel applies (per channel, on levels, a plain LayerNorm, no
        autograd), else None."""
        quant, norm = self.input_quant, self.norm
        if not (isinstance(quant, UniformQuantizer) and quant.mode == "quant" and quant.calibrated and quant.on_levels
                and quant.channel_axis == -1 and kernels.accepts(x)):
            return None
        affine = [t for t in (norm.weight, norm.bias) if t is not None]
        tracked = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in affine))
        grid = quant.grid(x.dtype)
        fits = (tuple(norm.normalized_shape) == (x.shape[-1],) and len(affine) in (0, 2)
                and all(kernels.accepts(t) for t in affine) and grid.packed.shape == (4, x.shape[-1]))
        return grid if fits and not tracked else None


MULTIPLIER_BITS = 8  # FQ-ViT's integer LayerNorm: each multiplier as an 8-bit integer over a power of two


def integer_layer_norm(x: torch.Tensor, input_quant: UniformQuantizer, output_quant: UniformQuantizer,
                       weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """FQ-ViT's integer LayerNorm of ``x`` (on ``input_quant``'s grid), on ``output_quant``'s grid.

    The input's levels, counted in units of its smallest channel scale (PTF factors are powers of
    two), are whole numbers: their mean and standard deviation are exact (float64 sums of
    integers). Each output channel's multiplier ``weight / std / output scale`` becomes an 8-bit
    integer ``M`` over ``2^N`` and the offset an integer over the same ``2^N``, so the output level
    is ``round((M * level + B) / 2^N)``, as the integer LayerNorm of FQ-ViT and the released
    Evol-Q code compute it. Under autograd the roundings pass gradients straight through. Where
    the compiled kernels take the tensors, one pass per row does the same operations
    (:func:`evolq.quant.kernels.integer_layer_norm`, bit for bit).
    """
    channels = x.shape[-1]
    scale = input_quant.scale.to(x.dtype).expand(channels).contiguous()  # PTF: one per channel; else one for all
    unit = scale.min()
    factor = torch.round(scale / unit)  # the powers of two
    step = output_quant.scale.to(x.dtype)
    gain = weight if weight is not None else torch.ones(channels, dtype=x.dtype, device=x.device)
    shift = bias if bias is not None else torch.zeros(channels, dtype=x.dtype, device=x.device)
    gain_step, shift_step = gain / step, shift / step
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (x, gain_step, shift_step))
    if not tracked and all(kernels.accepts(t) for t in (x, scale, gain_step, shift_step)):
        return kernels.integer_layer_norm(x, scale, factor, float(unit), gain_step, shift_step, float(step))
    levels = _round(x / scale) * factor  # whole numbers, in units of the smallest scale
    total = levels.sum(-1, keepdim=True, dtype=torch.float64)
    squares = levels.pow(2).sum(-1, keepdim=True, dtype=torch.float64)
    mean = (total / channels).to(x.dtype) * unit
    std = (unit / channels) * torch.sqrt(channels * squares - total.pow(2)).to(x.dtype)
    std = std.clamp_min(torch.finfo(x.dtype).tiny)
    multiplier = unit / std * gain_step  # per row and channel: output levels per input level
    size = multiplier.detach().abs()
    if torch.onnx.is_in_onnx_export():
        shifts = frexp_shifts(size, MULTIPLIER_BITS, 31)
    else:
        _, exponent = torch.frexp(size)  # |multiplier| = mantissa * 2^exponent, mantissa in [0.5, 1)
        shifts = (MULTIPLIER_BITS - exponent).clamp(0, 31)  # N: 2^(bits-1) <= M < 2^bits where it fits
    power, inverse = torch.exp2(shifts.to(x.dtype)), torch.exp2(-shifts.to(x.dtype))
    integer_multiplier = (_floor(multiplier.abs() * power)).clamp(0, 2**MULTIPLIER_BITS - 1) * multiplier.sign()
    offset = _round((shift_step - mean / std * gain_step) * power)
    return _round((integer_multiplier * levels + offset) * inverse) * step


def _round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)``, passing gradients straight through where autograd tracks ``x``."""
    return x + (torch.round(x) - x).detach() if x.requires_grad else torch.round(x)


def _floor(x: torch.Tensor) -> torch.Tensor:
    """``floor(x)``, passing gradients straight through where autograd tracks ``x``."""
    return x + (torch.floor(x) - x).detach() if x.requires_grad else torch.floor(x)

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
from evolq.quant.quantizer import UniformQuantizer


def correct_weight_bias(quantized: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Match each output channel's mean and std of the quantized weight to the FP weight."""
    dims = tuple(range(1, weight.dim()))
    q_mean, q_std = quantized.mean(dims, keepdim=True), quantized.std(dims, keepdim=True)
    w_mean, w_std = weight.mean(dims, keepdim=True), weight.std(dims, keepdim=True)
    ratio = torch.where(q_std > 0, w_std / q_std.clamp_min(1e-12), torch.ones_like(q_std))
    return (quantized - q_mean) * ratio + w_mean


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
    (:func:`evolq.quant.kernels.ptf_layer_norm`) where it applies.
    """

    def __init__(self, norm: nn.LayerNorm, input_quant: UniformQuantizer) -> None:
        super().__init__()
        self.norm = norm
        self.input_quant = input_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self._one_pass_grid(x)
        if grid is not None:
            norm = self.norm
            return kernels.ptf_layer_norm(x, grid.packed, norm.weight, norm.bias, norm.eps)
        return self.norm(self.input_quant(x))

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

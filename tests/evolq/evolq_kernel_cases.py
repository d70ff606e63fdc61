"""Every compiled kernel on the same random data, for comparing builds bit for bit (imports torch only).

``outputs(kernels)`` takes the kernels module (``evolq.quant.kernels``, or kernels.py loaded from its
file in a subprocess that sets ``EVOLQ_KERNELS``) and returns one tensor per case. The sizes run
threaded where torch allows more than one thread (above the kernels' 16,384 elements), rows are
no multiple of the 16 partial sums (and some shorter), the data holds exact halves, signed zeros,
infinities and NaN, and the softmax and GELU are read on grids of step 2^-100, fine enough that
the levels are their float32 values themselves (``x * 2^100`` is exact and rounds to itself).
"""

from __future__ import annotations

import torch

FINE = 2.0**100  # 1 / step of the grids that keep every float32 value of a softmax or GELU (above 2^-77)


def grid(inverse: float, low: float, high: float) -> torch.Tensor:
    return torch.tensor([inverse, low, high, 1.0 / inverse])


def per_column(columns: int, generator: torch.Generator) -> torch.Tensor:
    scale = torch.rand(columns, generator=generator) * 0.5 + 0.05
    low = -torch.randint(0, 128, (columns,), generator=generator).float()
    return torch.stack([torch.reciprocal(scale), low, low + 255.0, scale]).contiguous()


def awkward(shape: tuple[int, ...], generator: torch.Generator, spread: float = 4.0) -> torch.Tensor:
    x = torch.randn(shape, generator=generator) * spread
    x.view(-1)[:8] = torch.tensor([0.25, 0.75, -0.25, -0.75, 0.0, -0.0, float("inf"), float("nan")])
    return x


def outputs(kernels) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2024)
    out: dict[str, torch.Tensor] = {}
    for shape in [(37,), (129, 300), (64, 1024)]:
        x = awkward(shape, g)
        for dequantize in (False, True):
            out[f"quantize {shape} tensor {dequantize}"] = kernels.quantize(x, grid(2.0, -8.0, 7.0), None, dequantize)
            out[f"quantize {shape} column {dequantize}"] = kernels.quantize(x, per_column(shape[-1], g), None,
                                                                            dequantize)
    for batch, tokens in [(3, 7), (4, 197)]:
        product = awkward((batch, tokens, 3 * 3 * 16), g)
        params = per_column(3 * 3 * 16, g)
        out[f"split_heads {batch}x{tokens}"] = kernels.split_heads(product, torch.randn(144, generator=g), params, 3)
        out[f"split_heads {batch}x{tokens} no bias"] = kernels.split_heads(product, None, params, 3)
    for rows, cols in [(300, 197), (2000, 7), (40, 64)]:
        scores = torch.randn(rows, cols, generator=g) * 6
        scores[1, 3], scores[2, :] = float("nan"), float("-inf")
        scores[3, 5], scores[4, :3] = float("inf"), torch.tensor([-0.0, 0.0, -0.0])
        out[f"softmax {rows}x{cols} fine"] = kernels.softmax_levels_(scores.clone(), grid(FINE, 0.0, 2 * FINE))
        out[f"softmax {rows}x{cols} uint8"] = kernels.softmax_levels_(scores.clone(), grid(255.0, 0.0, 255.0))
    for rows, cols in [(512, 768), (3, 10)]:
        x = torch.randn(rows, cols, generator=g) * 3
        x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])
        bias = torch.randn(cols, generator=g) * 0.1
        out[f"gelu {rows}x{cols} fine"] = kernels.bias_gelu_levels_(x.clone(), bias, grid(FINE, -2 * FINE, 64 * FINE))
        out[f"gelu {rows}x{cols} no bias"] = kernels.bias_gelu_levels_(x.clone(), None, grid(20.0, -4.0, 251.0))
    for rows, channels in [(300, 192), (200, 100), (9, 5)]:
        x = torch.randn(rows, channels, generator=g) * torch.linspace(0.5, 8, channels)
        params = per_column(channels, g)
        weight, bias = torch.randn(channels, generator=g), torch.randn(channels, generator=g)
        out[f"layer_norm {rows}x{channels}"] = kernels.ptf_layer_norm(x, params, weight, bias, 1e-6)
        out[f"layer_norm {rows}x{channels} plain"] = kernels.ptf_layer_norm(x, params, None, None, 1e-5)
    for rows, channels in [(300, 192), (9, 5)]:
        x = torch.randn(rows, channels, generator=g) * torch.linspace(0.5, 8, channels)
        factor = 2.0 ** torch.randint(0, 4, (channels,), generator=g).float()  # PTF: powers of two
        unit, step = 0.05, 0.03
        gain_step = torch.randn(channels, generator=g) / step
        gain_step[:4] = torch.tensor([0.0, -0.0, 1e8, 1e-9])[: min(4, channels)]  # multipliers: zero, clamped, tiny
        shift_step = torch.randn(channels, generator=g) / step
        out[f"integer_layer_norm {rows}x{channels}"] = kernels.integer_layer_norm(
            x, (unit * factor).contiguous(), factor, unit, gain_step, shift_step, step)
    for rows, cols in [(100_003, 1), (300, 192), (9, 5)]:
        x = torch.randn(rows, cols, generator=g) * 3
        tails = (torch.full((cols,), -2.5), torch.full((cols,), 4.0))
        params = torch.stack([per_column(cols, g) for _ in range(3)]) if cols > 1 else torch.stack(
            [grid(float(inverse), -128.0, 127.0) for inverse in (10.0, 20.0, 40.0)])
        out[f"squared_errors {rows}x{cols}"] = kernels.squared_errors(x, params)[0]
        sums, counts = kernels.squared_errors(x, params, tails)
        out[f"squared_errors {rows}x{cols} tails"], out[f"squared_errors {rows}x{cols} counts"] = sums, counts
    return out

"""Quantizer placement: "full" (FQ-ViT's fully quantized ViT, the default) and "inputs" (matmul and norm inputs)."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from evolq_testing import CALIB_BATCH
from torch import nn

from evolq.errors import UsageError
from evolq.objective import BlockObjective, model_loss
from evolq.qmodel import QuantizedModel
from evolq.quant.config import QuantConfig
from evolq.quant.layers import QLayerNorm, integer_layer_norm
from evolq.quant.observers import OMSEObserver
from evolq.quant.quantizer import UniformQuantizer
from evolq.quant.stream import QResidualBlock

PLACEMENTS = ("full", "inputs")


@pytest.fixture(scope="module", params=PLACEMENTS)
def calibrated(request, fp_model, calib_images) -> QuantizedModel:
    config = QuantConfig.preset("w4a4", placement=request.param)
    return QuantizedModel(fp_model, config).calibrate(calib_images, batch_size=CALIB_BATCH, progress=False)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(24, 1, 28, 28, generator=torch.Generator().manual_seed(7))


def on_grid(x: torch.Tensor, quant: UniformQuantizer) -> bool:
    """Whether every value of ``x`` is a level of ``quant``'s grid (up to float rounding of level * scale)."""
    levels = x / quant.scale
    return bool(torch.allclose(levels, levels.round(), atol=1e-3))


def test_full_is_the_default_and_a_bad_placement_names_the_choices():
    assert QuantConfig().placement == "full"
    with pytest.raises(UsageError, match="placement 'partial' is unknown; allowed: full, inputs"):
        QuantConfig(placement="partial")


def test_full_quantizes_every_tensor_that_flows_on(fp_model, calib_images):
    full = QuantizedModel(fp_model, QuantConfig.preset("w4a8")).calibrate(calib_images, CALIB_BATCH, progress=False)
    inputs = QuantizedModel(fp_model, QuantConfig.preset("w4a8", placement="inputs")).calibrate(
        calib_images, CALIB_BATCH, progress=False)
    model = full.model
    block = model.blocks[0]
    assert isinstance(block, QResidualBlock)
    attn = block.attn
    # one quantizer on the qkv output, one on the scores, OMSE on the softmax output, proj and fc2 outputs
    assert isinstance(attn.qkv_quant, UniformQuantizer) and all(isinstance(q, nn.Identity) for q in (
        attn.q_quant, attn.k_quant, attn.v_quant))
    assert isinstance(attn.score_quant, UniformQuantizer) and attn.score_quant.bit_type.bits == 8
    assert isinstance(attn.softmax_quant.observer, OMSEObserver)
    assert isinstance(attn.proj.output_quant, UniformQuantizer)
    assert isinstance(block.mlp.fc2.output_quant, UniformQuantizer)
    assert isinstance(model.patch_embed.proj.output_quant, UniformQuantizer)
    assert all(q.calibrated for q in (model.quant_embedding.tokens_quant, model.quant_embedding.position_quant))
    # every LayerNorm is integer, onto the grid of the layer it feeds
    assert all(norm.integer for b in model.blocks for norm in (b.norm1, b.norm2)) and model.norm.integer
    # inputs: none of that
    attn = inputs.model.blocks[0].attn
    assert isinstance(attn.score_quant, nn.Identity) and isinstance(attn.qkv_quant, nn.Identity)
    assert isinstance(attn.proj.output_quant, nn.Identity) and not hasattr(inputs.model, "quant_embedding")
    assert not inputs.model.norm.integer
    # per block: + qkv output, scores, proj output, fc2 output, - q, k, v; model: + embedding output, tokens, position
    assert len(full.quantizers()) == len(inputs.quantizers()) + len(model.blocks) * (4 - 3) + 3


def test_the_residual_stream_is_read_on_its_grid(calibrated, images):
    """Under "full" each block's skip connection carries the stream rounded onto the PTF grid; "inputs" keeps it float."""
    block = calibrated.model.blocks[2]
    with torch.inference_mode():
        h = calibrated.prefix(images, 2)
        out = calibrated._blocks(h, 2, 3)
        if calibrated.config.placement == "full":
            stream = block.norm1.input_quant(h)
            assert on_grid(stream, block.norm1.input_quant) and not on_grid(h, block.norm1.input_quant)
            after_attention = block.norm2.input_quant(stream + block.attn(block.norm1.normalize(stream)))
            expected = after_attention + block.mlp(block.norm2.normalize(after_attention))
            float_skip = h + block.attn(block.norm1.normalize(stream))
            assert not torch.equal(out[:, :1], (float_skip + block.mlp(block.norm2(float_skip)))[:, :1])
        else:
            expected = h + block.attn(block.norm1(h))
            expected = expected + block.mlp(block.norm2(expected))
    assert torch.equal(out, expected)


def test_fp_mode_is_the_same_true_fp_model_under_both_placements(fp_model, calib_images, images):
    outputs = []
    for placement in PLACEMENTS:
        qmodel = QuantizedModel(fp_model, QuantConfig.preset("w4a4", placement=placement))
        qmodel.calibrate(calib_images, CALIB_BATCH, progress=False)
        with torch.inference_mode(), qmodel.fp():
            outputs.append(qmodel(images))
    assert torch.equal(outputs[0], outputs[1])
    with torch.inference_mode():
        assert torch.allclose(outputs[0], fp_model(images), rtol=1e-5, atol=1e-5)


def test_full_quantization_moves_the_logits_more_than_inputs(fp_model, calib_images, images):
    errors = {}
    for placement in PLACEMENTS:
        qmodel = QuantizedModel(fp_model, QuantConfig.preset("w8a4", placement=placement))
        qmodel.calibrate(calib_images, CALIB_BATCH, progress=False)
        with torch.inference_mode():
            quantized = qmodel(images)
            with qmodel.fp():
                reference = qmodel(images)
        errors[placement] = float((quantized - reference).norm() / reference.norm())
    assert errors["full"] > errors["inputs"] > 0


@pytest.mark.parametrize("mode", ["quant", "fp"])
def test_prefix_then_suffix_is_exactly_the_full_forward_under_both(calibrated, images, mode):
    with torch.inference_mode():
        if mode == "fp":
            with calibrated.fp():
                whole, parts = calibrated(images), calibrated.suffix(calibrated.prefix(images, 3), 3)
        else:
            whole, parts = calibrated(images), calibrated.suffix(calibrated.prefix(images, 3), 3)
    assert torch.equal(whole, parts)


def test_block_objective_equals_a_full_forward_under_both(calibrated, images):
    qmodel = copy.deepcopy(calibrated)
    objective = BlockObjective(qmodel, 4, images, batch_size=12)
    x = objective.x0 * np.random.default_rng(0).uniform(0.8, 1.2, objective.dim)
    value = objective(x)
    assert value == model_loss(qmodel, images, objective.targets, batch_size=12)


def test_levels_equal_the_dequantized_model_under_full(calibrated, images):
    with torch.inference_mode():
        fast = calibrated(images)
        with calibrated.dequantized():
            plain = calibrated(images)
    step = float(calibrated.model.head.output_quant.scale)
    steps = (fast - plain).abs() / step
    # Both are on the head's output grid: they differ by whole steps (up to the rounding of level * step)
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    # and only where another order of float operations moved a value near a rounding boundary upstream
    # to the neighbouring level, which moves logits downstream: rare, and a few steps at most. How many
    # depends on the machine's GEMMs (a statistical bound, not a float one): with torch, MKL and the
    # kernels on their AVX-512, AVX2 and SSE paths, one thread or two, 0-2.9 % of these 240 logits moved,
    # by at most 2 steps. Allowed: 10 %, 4 steps.
    assert float((steps > 0.5).float().mean()) <= 0.1 and float(steps.max()) <= 4


def test_quant_state_round_trip_under_full(calibrated, fp_model, images):
    restored = QuantizedModel(fp_model, calibrated.config).load_quant_state(calibrated.quant_state())
    with torch.inference_mode():
        assert torch.equal(restored(images), calibrated(images))


def test_full_refuses_position_embeddings_it_does_not_cover(fp_model):
    model = copy.deepcopy(fp_model)
    model.no_embed_class = True
    with pytest.raises(UsageError, match="no_embed_class.*placement 'inputs'"):
        QuantizedModel(model, QuantConfig.preset("w8a8"))
    QuantizedModel(model, QuantConfig.preset("w8a8", placement="inputs"))  # the milder placement takes it


# -- integer LayerNorm ----------------------------------------------------------------------

def _fixed_quantizer(scale: torch.Tensor, zero_point: int, bits: int = 8) -> UniformQuantizer:
    from evolq.quant.bits import BitType
    from evolq.quant.observers import MinMaxObserver

    quant = UniformQuantizer(BitType(bits), MinMaxObserver(BitType(bits)), channel_axis=-1 if scale.dim() else None)
    quant.scale = scale.float()
    quant.zero_point = torch.full(scale.shape, zero_point, dtype=torch.int32)
    quant.mode = "quant"
    return quant


def _integer_layer_norm_by_hand(levels: list[int], factors: list[int], unit: float, gain: list[float],
                                shift: list[float], step: float) -> list[int]:
    """FQ-ViT's integer LayerNorm written out with exact rationals for the statistics (one row)."""
    units = [level * factor for level, factor in zip(levels, factors)]
    count = len(units)
    total, squares = sum(units), sum(u * u for u in units)
    mean = Fraction(total, count) * Fraction(unit)
    std = Fraction(unit) / count * Fraction(math.sqrt(count * squares - total * total))
    out = []
    for u, g, b in zip(units, gain, shift):
        multiplier = Fraction(unit) / std * Fraction(g) / Fraction(step)
        mantissa, exponent = math.frexp(float(abs(multiplier)))
        shifts = min(max(8 - exponent, 0), 31)
        integer = min(math.floor(abs(multiplier) * 2**shifts), 255) * (1 if multiplier >= 0 else -1)
        offset = round((Fraction(b) - mean / std * Fraction(g)) / Fraction(step) * 2**shifts)
        out.append(round(Fraction(integer * u + offset, 2**shifts)))
    return out


def test_integer_layer_norm_is_fq_vits_formula():
    generator = torch.Generator().manual_seed(3)
    channels, unit, zero = 16, 0.05, 100
    factors = torch.tensor([1, 2, 4, 8] * 4)
    input_quant = _fixed_quantizer(unit * factors, zero)
    output_quant = _fixed_quantizer(torch.tensor(0.02), 128)
    levels = torch.randint(-100, 155, (5, channels), generator=generator)
    x = levels.float() * unit * factors
    gain = torch.rand(channels, generator=generator) * 2 - 0.5
    shift = torch.randn(channels, generator=generator) * 0.1
    got = integer_layer_norm(x, input_quant, output_quant, gain, shift) / 0.02
    for row in range(5):
        expected = _integer_layer_norm_by_hand(levels[row].tolist(), factors.tolist(), unit, gain.tolist(),
                                               shift.tolist(), 0.02)
        # float32 statistics against exact rationals: a multiplier on a 2^-8 boundary may floor one lower
        assert np.abs(got[row].round().numpy() - np.array(expected)).max() <= 1
        assert (got[row].round().numpy() == np.array(expected)).mean() >= 0.9


def test_integer_layer_norm_is_within_its_8_bit_multiplier_of_the_float_one():
    generator = torch.Generator().manual_seed(4)
    norm = nn.LayerNorm(32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=generator)
        norm.bias.normal_(0, 0.1, generator=generator)
    input_quant = _fixed_quantizer(torch.full((32,), 0.03), 128)
    output_quant = _fixed_quantizer(torch.tensor(0.05), 128)
    x = (torch.randint(-128, 127, (64, 32), generator=generator).float()) * 0.03
    layer = QLayerNorm(norm, input_quant)
    layer.integer_output(output_quant)
    assert layer.integer
    with torch.no_grad():
        integer = layer.normalize(x) / 0.05
        exact = norm(x) / 0.05
    # the multiplier keeps 8 significant bits (relative error < 2^-7) and the output is rounded once
    assert torch.all((integer - exact).abs() <= exact.abs() * 2**-7 + 1.0)
    assert float((integer - exact.round()).abs().mean()) < 0.25


@pytest.mark.parametrize("threads", [1, 2])
def test_integer_layer_norm_kernel_is_its_torch_operations_bit_for_bit(threads):
    from evolq.quant import kernels

    generator = torch.Generator().manual_seed(5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for channels, per_channel, affine in ((64, True, True), (192, True, False), (7, False, True)):
            factors = 2 ** torch.randint(0, 4, (channels,), generator=generator) if per_channel else torch.ones(())
            input_quant = _fixed_quantizer(0.01 * factors, 128)
            output_quant = _fixed_quantizer(torch.tensor(0.05), 100)
            x = torch.randint(-128, 127, (100, 50, channels), generator=generator).float() * input_quant.scale
            weight = torch.randn(channels, generator=generator) if affine else None
            if affine:  # the multipliers' edge cases: zero (either sign), too large for 8 bits (clamped), tiny
                weight[:5] = torch.tensor([0.0, -0.0, 1e6, -1e6, 1e-9])
            bias = torch.randn(channels, generator=generator) * 0.1 if affine else None
            compiled = integer_layer_norm(x, input_quant, output_quant, weight, bias)
            with kernels.disabled():
                plain = integer_layer_norm(x, input_quant, output_quant, weight, bias)
            assert torch.equal(compiled, plain) and torch.equal(compiled.signbit(), plain.signbit())
    finally:
        torch.set_num_threads(before)

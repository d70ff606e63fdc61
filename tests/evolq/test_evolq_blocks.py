"""Blocks: discovery, the flat scale vector, what set_scales touches, and bad vectors."""

import numpy as np
import pytest
import torch
from evolq_testing import DEPTH, EMBED

from evolq.blocks import Block, check_vector, discover_blocks
from evolq.errors import UsageError

DIM = 3 * EMBED + EMBED  # qkv (3 x embed output channels) + proj (embed)


def test_discover_blocks_finds_every_attention_block_in_order(calibrated_w4a8):
    blocks = discover_blocks(calibrated_w4a8.model)
    assert len(blocks) == DEPTH == len(calibrated_w4a8.blocks)
    assert [b.name for b in blocks] == [f"blocks.{i}" for i in range(DEPTH)]
    assert [b.index for b in blocks] == list(range(DEPTH))
    for block, module in zip(blocks, calibrated_w4a8.model.blocks):
        assert block.module is module
        assert block.layers == [module.attn.qkv, module.attn.proj]
        assert block.sizes == [3 * EMBED, EMBED] and block.dim == DIM
        assert block.weight_bits == 4
    assert repr(blocks[2]) == "Block(index=2, name='blocks.2', space='paper')"


def test_scales_are_the_two_layers_weight_scales_as_float64(calibrated_w4a8):
    block = calibrated_w4a8.block(1)
    scales = block.scales()
    assert scales.dtype == np.float64 and scales.shape == (DIM,)
    qkv, proj = block.layers
    np.testing.assert_array_equal(scales[: 3 * EMBED], qkv.weight_quant.scale.double().numpy())
    np.testing.assert_array_equal(scales[3 * EMBED :], proj.weight_quant.scale.double().numpy())
    assert (scales > 0).all()


def test_set_scales_round_trip_is_exact(qmodel):
    block = qmodel.block(3)
    x0 = block.scales()
    block.set_scales(x0)
    np.testing.assert_array_equal(block.scales(), x0)
    x = x0 * np.linspace(0.5, 1.7, DIM)
    block.set_scales(x)
    np.testing.assert_array_equal(block.scales(), x.astype(np.float32).astype(np.float64))
    block.set_scales(list(x0))  # any sequence of numbers
    np.testing.assert_array_equal(block.scales(), x0)


def test_set_scales_requantizes_exactly_its_two_layers(qmodel, calib_images):
    images = calib_images[:8]
    with torch.inference_mode():
        before = qmodel(images)
    layers = qmodel.weight_layers()
    cached = {id(layer): layer._cached_weight for layer in layers}
    assert all(w is not None for w in cached.values())
    values = {id(layer): w.clone() for layer, w in zip(layers, cached.values())}
    block = qmodel.block(4)
    block.set_scales(block.scales() * 1.5)
    assert all(layer._cached_weight is None for layer in block.layers)  # invalidated
    with torch.inference_mode():
        after = qmodel(images)
    assert not torch.equal(after, before)
    for layer in layers:
        if any(layer is target for target in block.layers):
            assert not torch.equal(layer._cached_weight, values[id(layer)])
        else:
            assert layer._cached_weight is cached[id(layer)]  # not even recomputed
            assert torch.equal(layer._cached_weight, values[id(layer)])
    block.set_scales(block.scales() / 1.5)
    with torch.inference_mode():
        assert torch.equal(qmodel(images), before)


def test_scales_change_the_quantized_weight_as_fake_quantization_says(qmodel):
    block = qmodel.block(0)
    proj = block.layers[1]
    proj.bias_correction = False  # compare the bare fake quantization
    proj.invalidate()
    x = block.scales()
    x[3 * EMBED :] *= 2
    block.set_scales(x)
    w, scale, zero = proj.weight.detach(), proj.weight_quant.scale, proj.weight_quant.zero_point
    np.testing.assert_array_equal(scale.double().numpy(), x[3 * EMBED :].astype(np.float32))
    step, zero = scale[:, None], zero[:, None].float()
    expected = ((torch.round(w * torch.reciprocal(step)) + zero).clamp(0, 15) - zero) * step
    assert torch.equal(proj.quantized_weight(), expected)


BAD_VECTORS = {
    "too short": (lambda x: x[:-1], [f"shape ({DIM - 1},)", f"length {DIM}"]),
    "too long": (lambda x: np.append(x, 1.0), [f"shape ({DIM + 1},)", f"length {DIM}"]),
    "2-d": (lambda x: x[None, :], [f"shape (1, {DIM})", f"length {DIM}"]),
    "empty": (lambda x: [], ["shape (0,)", f"length {DIM}"]),
    "nan": (lambda x: np.where(np.arange(DIM) == 7, np.nan, x), ["non-finite value nan at index 7", "finite positive"]),
    "inf": (lambda x: np.where(np.arange(DIM) == 3, np.inf, x), ["non-finite value inf at index 3", "finite positive"]),
    "-inf": (lambda x: np.where(np.arange(DIM) == 0, -np.inf, x), ["value -inf at index 0", "finite positive"]),
    "zero": (lambda x: np.where(np.arange(DIM) == 5, 0.0, x), ["non-positive value 0.0 at index 5", "scales > 0"]),
    "negative": (lambda x: np.where(np.arange(DIM) == 200, -0.5, x),
                 ["non-positive value -0.5 at index 200", "scales > 0"]),
    "text": (lambda x: "0.1 0.2", ["of type str is not numeric", f"{DIM} positive finite numbers"]),
    "strings": (lambda x: ["a"] * DIM, ["of type list is not numeric"]),
}


@pytest.mark.parametrize("case", list(BAD_VECTORS))
def test_bad_scale_vectors_are_usage_errors_naming_the_value(qmodel, case):
    make, phrases = BAD_VECTORS[case]
    block = qmodel.block(2)
    x0 = block.scales()
    with pytest.raises(UsageError) as error:
        block.set_scales(make(x0.copy()))
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert message.startswith("block 2 scale vector ") and "allowed" in message and "\n" not in message
    for phrase in phrases:
        assert phrase in message
    np.testing.assert_array_equal(block.scales(), x0)  # nothing written


def test_check_vector_returns_float64():
    out = check_vector([1, 2, 3], 3)
    assert out.dtype == np.float64 and out.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("value", [1e39, 1e-46])
def test_scales_outside_float32_are_rejected(qmodel, value):
    block = qmodel.block(1)
    x = block.scales()
    x[10] = value
    with pytest.raises(UsageError, match="index 10"):
        block.set_scales(x)


def test_block_class_is_exported():
    import evolq

    assert evolq.Block is Block

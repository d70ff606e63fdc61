"""Search spaces: which scales each holds, where each coordinate goes, and the objective over them."""

import numpy as np
import pytest
import torch
from evolq_testing import CALIB_BATCH, DEPTH, EMBED

from evolq.errors import UsageError
from evolq.objective import BlockObjective, fp_logits, model_loss
from evolq.qmodel import QuantizedModel
from evolq.quant.config import QuantConfig
from evolq.quant.quantizer import UniformQuantizer

HIDDEN = 4 * EMBED  # the MLP's width in the test architecture
WEIGHTS = [("attn.qkv.weight_quant", 3 * EMBED), ("attn.proj.weight_quant", EMBED), ("mlp.fc1.weight_quant", HIDDEN),
           ("mlp.fc2.weight_quant", EMBED)]


def activation_quantizers(module) -> list[tuple[str, UniformQuantizer]]:
    """Every calibrated uniform quantizer of a block that is not a weight quantizer, in module order."""
    return [(name, q) for name, q in module.named_modules()
            if isinstance(q, UniformQuantizer) and not name.endswith("weight_quant") and q.calibrated]


@pytest.fixture(scope="module")
def inputs_model(fp_model, calib_images) -> QuantizedModel:
    config = QuantConfig.preset("w4a8").with_(placement="inputs")
    return QuantizedModel(fp_model, config).calibrate(calib_images, batch_size=CALIB_BATCH, progress=False)


def test_the_paper_space_is_the_models_own_blocks(calibrated_w4a8):
    assert calibrated_w4a8.block(2) is calibrated_w4a8.blocks[2] is calibrated_w4a8.block(2, "paper")
    layout = calibrated_w4a8.block(2).layout
    assert [(s.name, s.kind, s.start, s.stop) for s in layout] == [
        ("attn.qkv.weight_quant", "weight", 0, 3 * EMBED), ("attn.proj.weight_quant", "weight", 3 * EMBED, 4 * EMBED)]


@pytest.mark.parametrize("placement", ["full", "inputs"])
def test_layouts_name_every_coordinate_once_in_order(calibrated_w4a8, inputs_model, placement):
    qmodel = calibrated_w4a8 if placement == "full" else inputs_model
    weights = qmodel.block(1, "weights")
    assert [(s.name, s.kind, s.size) for s in weights.layout] == [(name, "weight", size) for name, size in WEIGHTS]
    every = qmodel.block(1, "all")
    activations = activation_quantizers(every.module)
    expected = [(name, "weight", size) for name, size in WEIGHTS] + [
        (name, "ptf" if q.channel_axis is not None else "activation", 1) for name, q in activations]
    assert [(s.name, s.kind, s.size) for s in every.layout] == expected
    stops = [s.stop for s in every.layout]
    assert [s.start for s in every.layout] == [0, *stops[:-1]] and stops[-1] == every.dim == len(every.scales())
    kinds = {s.kind for s in every.layout}
    # the fully quantized placement has PTF LayerNorm inputs, scores and softmax on a uniform grid
    if placement == "full":
        assert kinds == {"weight", "activation", "ptf"}
        assert {"attn.score_quant", "attn.softmax_quant", "mlp.fc2.output_quant"} <= {n for n, _ in activations}
    assert len(activations) >= 4


def test_each_coordinate_of_all_writes_its_own_quantizer_and_keeps_zero_points(qmodel):
    block = qmodel.block(3, "all")
    x0 = block.scales()
    quantizers = dict(block.module.named_modules())
    before = {name: (q.scale.clone(), q.zero_point.clone()) for name, q in activation_quantizers(block.module)}
    for segment in block.layout:
        if segment.kind == "weight":
            continue
        x = x0.copy()
        x[segment.slice] *= 2.0
        block.set_scales(x)
        for name, (scale, zero_point) in before.items():
            quantizer = quantizers[name]
            assert torch.equal(quantizer.zero_point, zero_point)
            # a PTF unit doubles every channel's scale (the power-of-two factors stay); others move alone
            assert torch.equal(quantizer.scale, scale * 2.0 if name == segment.name else scale), name
        block.set_scales(x0)
    assert np.array_equal(block.scales(), x0)


def test_the_ptf_coordinate_is_the_smallest_channel_scale(qmodel):
    block = qmodel.block(0, "all")
    (segment,) = [s for s in block.layout if s.name == "norm1.input_quant"]
    scale = block.module.norm1.input_quant.scale
    assert segment.kind == "ptf" and block.scales()[segment.start] == scale.min().item()
    factors = scale / scale.min()
    assert torch.equal(factors, factors.round()) and set(factors.tolist()) <= {1.0, 2.0, 4.0, 8.0}


@pytest.mark.parametrize("space", ["weights", "all"])
@pytest.mark.parametrize("block", [0, DEPTH - 1])
def test_the_objective_in_every_space_is_a_full_forward(fresh_qmodel, calib_images, space, block):
    qmodel, images = fresh_qmodel(), calib_images[:100]
    f = BlockObjective(qmodel, block, images, batch_size=50, space=space)
    assert f.space == space and f.layout == qmodel.block(block, space).layout and f.dim == len(f.x0)
    x = f.x0 * np.random.default_rng(block).uniform(0.9, 1.1, f.dim)
    value = f(x)
    # the cached prefix holds: changing block k's scales of any kind leaves blocks before k alone
    assert value == model_loss(qmodel, images, f.targets, batch_size=50)
    assert value != f(f.x0)
    assert f(f.x0) == model_loss(qmodel, images, f.targets, batch_size=50)  # and back, exactly


def test_a_block_and_a_different_space_are_refused(qmodel, calib_images):
    with pytest.raises(UsageError, match="search space 'all' differs from the given block's 'paper'"):
        BlockObjective(qmodel, qmodel.block(1), calib_images[:10], space="all")
    with pytest.raises(UsageError, match="search space 'everything' is unknown; allowed: paper, weights, all"):
        qmodel.block(1, "everything")


def test_gradients_exist_for_weight_spaces_only(qmodel, calib_images):
    images = calib_images[:20]
    targets = fp_logits(qmodel, images, batch_size=20)
    weights = BlockObjective(qmodel, 2, images, batch_size=20, targets=targets, space="weights")
    value, grad = weights.value_and_grad(weights.x0)
    assert grad.shape == (weights.dim,) and np.isfinite(grad).all() and np.abs(grad[-EMBED:]).sum() > 0  # fc2 too
    every = BlockObjective(qmodel, 2, images, batch_size=20, targets=targets, space="all")
    with pytest.raises(UsageError, match="weight scales only; search space 'all'"):
        every.value_and_grad(every.x0)


def test_scales_in_a_space_round_trip_through_the_model(qmodel):
    saved = qmodel.scales("all")
    assert list(saved) == [f"block{i}" for i in range(DEPTH)]
    block = qmodel.block(4, "all")
    block.set_scales(block.scales() * 1.25)
    qmodel.load_scales(saved, "all")
    assert all(torch.equal(saved[k], v) for k, v in qmodel.scales("all").items())


def test_a_bad_activation_coordinate_is_refused_and_nothing_is_written(qmodel):
    block = qmodel.block(2, "all")
    x0 = block.scales()
    (score,) = [s for s in block.layout if s.name == "attn.score_quant"]
    x = x0 * 1.1
    x[score.start] = -0.5
    with pytest.raises(UsageError, match=f"non-positive value -0.5 at index {score.start}; allowed: scales > 0"):
        block.set_scales(x)
    assert np.array_equal(block.scales(), x0)

"""Every model family (CNNs, Swin, LeViT) as block objectives: folding, blocks, prefix/suffix, the objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from evolq_testing import SMALL_FAMILY_MODELS, small_family_model
from torch import nn

from evolq.errors import UsageError
from evolq.families import family_of
from evolq.models import create_model
from evolq.objective import BlockObjective, fp_logits, model_loss
from evolq.qmodel import QuantizedModel
from evolq.quant.config import QuantConfig
from evolq.quant.fold import fold_batch_norms
from evolq.quant.layers import QuantWeightLayer
from evolq.quant.quantizer import UniformQuantizer

FAMILIES = list(SMALL_FAMILY_MODELS)
IMAGES = 24


def _images(side: int, count: int = IMAGES, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=FAMILIES)
def family_case(request):
    """(family name, FP model, images, w4a8 model calibrated on them) for each family."""
    model, side = small_family_model(request.param)
    images = _images(side)
    qmodel = QuantizedModel(model, "w4a8").calibrate(images, batch_size=12, progress=False)
    return request.param, model, images, qmodel


def test_folding_keeps_the_function_of_the_model(family_case):
    # Folding rescales each weight once (one rounding), so the FP logits move by float rounding carried
    # through the layers: measured below 1e-5 of their size. Folding a BatchNorm into the wrong layer, or
    # dropping one, moves them by a fair part of their size: allowed 1e-3.
    _, model, images, qmodel = family_case
    with torch.inference_mode(), qmodel.fp():
        reference, folded = model(images), qmodel(images)
    assert (folded - reference).abs().max() <= 1e-3 * reference.abs().max()


def test_fold_batch_norms_folds_what_follows_a_layer_and_keeps_the_rest():
    layer, norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2)
    model = nn.Sequential(layer, norm, nn.ReLU(), nn.BatchNorm2d(4))  # the last follows no layer
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
        assert fold_batch_norms(model) == 1
        assert isinstance(model[1], nn.Identity) and isinstance(model[3], nn.BatchNorm2d)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_every_layer_is_quantized_and_no_batch_norm_is_left_after_a_layer(family_case):
    name, _, _, qmodel = family_case
    plain = [m for m in qmodel.model.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    assert plain == []
    norms = [path for path, m in qmodel.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms == (["head.bn", "head_dist.bn"] if name == "levit" else [])  # LeViT's head norm precedes its linear
    assert all(layer.weight_quant.calibrated for layer in qmodel.weight_layers())


def test_quantization_changes_the_logits(family_case):
    _, _, images, qmodel = family_case
    with torch.inference_mode():
        quantized = qmodel(images)
        with qmodel.fp():
            fp = qmodel(images)
    assert not torch.equal(quantized, fp)


PAPER_LAYERS = {  # block 0's paper-space layers, by path inside the block
    "resnet": ["conv1", "conv2"],
    "efficientnet": ["conv_dw", "conv_pw"],
    "swin": ["attn.qkv", "attn.proj"],
    "levit": ["attn.attn.qkv.linear", "attn.attn.proj.ln.linear"],
}


def test_blocks_are_the_familys_residual_blocks_and_the_paper_space_its_searched_part(family_case):
    name, _, _, qmodel = family_case
    blocks = qmodel.blocks
    assert [b.index for b in blocks] == list(range(len(blocks))) and len(blocks) >= 4
    assert [segment.name for segment in blocks[0].layout] == [f"{p}.weight_quant" for p in PAPER_LAYERS[name]]
    for block in blocks:
        part = block.part
        assert block.layers == [m for m in part.modules() if isinstance(m, QuantWeightLayer)]
        assert block.dim == sum(layer.weight.shape[0] for layer in block.layers)
        assert block.weight_bits == 4
        np.testing.assert_array_equal(block.scales(), torch.cat([l.weight_quant.scale for l in block.layers]).double())


def test_cached_prefix_and_suffix_give_the_full_forward_bit_for_bit(family_case):
    _, _, images, qmodel = family_case
    with torch.inference_mode():
        full = qmodel(images)
        inputs = qmodel.block_inputs(images)
        for index in range(len(qmodel.blocks)):
            prefix = qmodel.prefix(images, index)
            assert torch.equal(inputs[index], prefix)
            assert torch.equal(qmodel.suffix(prefix, index), full)


def test_block_objective_is_the_full_models_loss_and_moves_with_the_scales(family_case):
    _, _, images, qmodel = family_case
    targets = fp_logits(qmodel, images)
    last = len(qmodel.blocks) - 1
    f = BlockObjective(qmodel, last, images, targets=targets)
    assert f(f.x0) == model_loss(qmodel, images, targets)
    moved = f(f.x0 * np.linspace(0.6, 1.4, f.dim))
    assert moved != f(f.x0)
    assert f.value_at(f.x0) is not None
    f(f.x0)  # leave the model as calibrated for the other tests


@pytest.mark.parametrize("placement", ["full", "inputs"])
def test_full_placement_quantizes_every_units_output_and_the_all_space_holds_it(placement):
    model, side = small_family_model("resnet")
    qmodel = QuantizedModel(model, QuantConfig.preset("w4a8", placement=placement)).calibrate(_images(side, 8), progress=False)
    outputs = [getattr(unit, "output_quant", None) for unit in qmodel.units]
    if placement == "full":
        assert all(isinstance(q, UniformQuantizer) and q.calibrated for q in outputs)
        assert "output_quant" in [s.name for s in qmodel.block(0, "all").layout]
    else:
        assert outputs == [None] * len(outputs)


def test_weights_and_all_spaces_hold_every_layer_of_the_block():
    model, side = small_family_model("swin")
    qmodel = QuantizedModel(model, "w4a8").calibrate(_images(side, 8), progress=False)
    weights = [s.name for s in qmodel.block(0, "weights").layout]
    assert weights == [f"{p}.weight_quant" for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    activations = [s for s in qmodel.block(0, "all").layout if s.kind == "activation"]
    assert "attn.softmax.1" in [s.name for s in activations]  # the softmax output's quantizer


@pytest.mark.parametrize("name, needle", [
    ("convnext_tiny", "model 'convnext_tiny' is not supported; allowed: default, default-cnn, default-swin, default-levit or a timm name matching vit_*"),
    ("resnetv2_50", "model type ResNetV2 is not supported; allowed: timm VisionTransformer, ResNet"),
    ("resnet_18", "is unknown to timm (did you mean resnet18"),
])
def test_unsupported_models_are_one_line_naming_what_is_supported(name, needle):
    with pytest.raises(UsageError) as raised:
        create_model(name)
    assert needle in str(raised.value) and "\n" not in str(raised.value)


def test_levit_convolutional_variant_is_refused_with_one_line():
    import timm

    model = timm.create_model("levit_conv_128s", num_classes=10, img_size=64).eval()
    with pytest.raises(UsageError, match=r"levit_conv_\*\) is not supported"):
        QuantizedModel(model, "w4a8")


def test_family_of_names_the_family():
    assert [family_of(small_family_model(name)[0]).name for name in FAMILIES] == FAMILIES

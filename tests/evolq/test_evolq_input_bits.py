"""``input_bits``: the image's quantizer apart from the other activations, in every family and through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from evolq_testing import SMALL_FAMILY_MODELS, small_family_model, spread_random_weights
from timm.models.vision_transformer import VisionTransformer

import evolq
from evolq.cli import main
from evolq.errors import UsageError
from evolq.qmodel import QuantizedModel
from evolq.quant.config import QuantConfig
from evolq.quant.quantizer import UniformQuantizer


def small_model(family: str) -> tuple[torch.nn.Module, int]:
    if family == "vit":
        torch.manual_seed(0)
        return spread_random_weights(VisionTransformer(img_size=28, patch_size=7, in_chans=3, num_classes=10,
                                                       embed_dim=32, depth=2, num_heads=2)).eval(), 28
    return small_family_model(family)


def quantizer_calls(qmodel: QuantizedModel, images: torch.Tensor) -> list[tuple[UniformQuantizer, torch.Tensor]]:
    """Every activation quantizer in the order a forward pass calls it, with the tensor it was given."""
    calls = []
    hooks = [quant.register_forward_hook(lambda module, inputs, output: calls.append((module, inputs[0])))
             for quant in qmodel.quantizers() if isinstance(quant, UniformQuantizer)]
    try:
        with torch.inference_mode():
            qmodel(images)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


@pytest.mark.parametrize("family", ["vit", *SMALL_FAMILY_MODELS])
def test_input_bits_set_the_quantizer_that_reads_the_image_and_no_other(family):
    model, side = small_model(family)
    images = torch.randn(8, 3, side, side, generator=torch.Generator().manual_seed(3))
    plain = QuantizedModel(model, "w4a4").calibrate(images, batch_size=8, progress=False)
    apart = QuantizedModel(model, QuantConfig.preset("w4a4", input_bits=8)).calibrate(images, batch_size=8,
                                                                                       progress=False)
    (first, given), *rest = quantizer_calls(apart, images)
    assert torch.equal(given, images)  # the first quantizer called reads the image itself
    assert first.bit_type.bits == 8 and first.calibrated
    assert {quant.bit_type.bits for quant, _ in rest} <= {4, 8}  # 8: softmax outputs (softmax_bits)
    assert [quant.bit_type.bits for quant, _ in rest] == [quant.bit_type.bits for quant, _ in quantizer_calls(plain, images)[1:]]
    with torch.inference_mode():
        assert not torch.equal(apart(images), plain(images))  # 256 levels of the image instead of 16


def test_input_bits_are_checked_and_named():
    assert QuantConfig().input_bits is None  # the paper's setting: the image at the activation bits
    config = QuantConfig.preset("w4a4", input_bits=8)
    assert config.name == "w4a4i8" and QuantConfig(**config.to_dict()) == config
    for bad in (1, 9, 8.0, True):
        with pytest.raises(UsageError, match=rf"^input_bits {bad!r} is not allowed; allowed: integers 2\.\.8$"):
            QuantConfig(input_bits=bad)


def test_evolq_quantize_takes_input_bits_and_a_rebuilt_run_keeps_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["quantize", "--preset", "w4a4", "--input-bits", "8", "--optimizer", "none", "--calib-size", "16",
                 "--eval-size", "16", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["quant_config"]["input_bits"] == 8 and result["config"]["input_bits"] == 8
    rebuilt = evolq.load_quantized(out)
    assert rebuilt.model.patch_embed.proj.input_quant.bit_type.bits == 8
    assert rebuilt.model.blocks[0].attn.qkv.input_quant.bit_type.bits == 4
    capsys.readouterr()
    assert main(["quantize", "--input-bits", "9", "--optimizer", "none", "--out", str(tmp_path / "bad")]) == 2
    assert "input_bits 9 is not allowed; allowed: integers 2..8" in capsys.readouterr().err

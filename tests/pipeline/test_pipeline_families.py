"""`evolq quantize` and `landscape` end to end on every family: random-weight timm models and the trained zoo models.

The timm models are timm's own names at their own input size (224 px, Fashion-MNIST adapted), so
the settings are tiny: a handful of images, one pass, two evaluations per block. The zoo models
(28-56 px) are cheap enough to run on 500 test images and check that they are trained.
"""

from __future__ import annotations

import json

import pytest
import torch

import evolq
from evolq.cli import main
from evolq.files import save_tensors
from evolq.models import create_model
from evolq.pipeline import prepare
from evolq.zoo import ZOO

TINY = ["--calib-size", "4", "--selection-size", "4", "--eval-size", "4", "--passes", "1",
        "--evaluations-per-block", "2", "--seed", "3"]
NAMES = {"resnet": "resnet18", "efficientnet": "mobilenetv2_050", "swin": "swin_tiny_patch4_window7_224",
         "levit": "levit_128s"}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(NAMES))
def test_quantize_searches_a_random_weight_model_of_every_family(family, tmp_path):
    out = tmp_path / family
    assert main(["quantize", "--model", NAMES[family], "--out", str(out), *TINY]) == 0
    result = json.loads((out / "result.json").read_text())
    blocks = len(evolq.load_quantized(out).blocks)
    assert result["complete"] and result["config"]["model"] == NAMES[family]
    assert result["evaluations"] == 2 * blocks
    assert result["calib_loss_final"] <= result["calib_loss_ptq"]  # a visit keeps its start unless it finds better


def test_a_family_run_rebuilt_from_its_folder_gives_the_runs_logits(tmp_path):
    config = evolq.RunConfig(model="levit_128s", optimizer="none", calib_size=4, selection_size=1, eval_size=2,
                             seed=5, threads=1)
    evolq.run_quantize(config, out=tmp_path, progress=False)
    rebuilt = evolq.load_quantized(tmp_path)
    prepared = prepare(config, progress=False)
    with torch.inference_mode():
        assert torch.equal(rebuilt(prepared.calib_images), prepared.qmodel(prepared.calib_images))


def test_checkpoint_gives_a_family_model_its_weights(tmp_path):
    torch.manual_seed(11)
    trained = create_model("mobilenetv2_050")
    path = tmp_path / "weights.safetensors"
    save_tensors(path, trained.state_dict())
    torch.manual_seed(12)
    loaded = create_model("mobilenetv2_050", checkpoint=str(path))
    state = loaded.state_dict()
    assert all(torch.equal(state[name], value) for name, value in trained.state_dict().items())


def test_landscape_slices_a_cnn_block(tmp_path):
    out = tmp_path / "land"
    assert main(["landscape", "--model", "mobilenetv2_050", "--dims", "1", "--points", "5", "--block", "-1",
                 "--reference", "--calib-size", "4", "--selection-size", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "roughness.json").read_text())
    assert summary["block"] == 16 and set(summary) >= {"quantized", "reference"}
    assert (out / "landscape.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", [name for name, entry in ZOO.items() if name != "default" and entry.checkpoint.is_file()])
def test_quantize_searches_the_trained_model_of_a_family(name, tmp_path):
    out = tmp_path / name
    assert main(["quantize", "--model", name, "--preset", "w4a4", "--out", str(out), "--calib-size", "64",
                 "--selection-size", "64", "--eval-size", "500", "--passes", "1", "--evaluations-per-block", "2"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["fp_top1"] > 80.0  # trained weights (chance is 10 %)
    assert result["calib_loss_final"] <= result["calib_loss_ptq"]

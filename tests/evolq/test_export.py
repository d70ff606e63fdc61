"""ONNX export: QDQ pairs where evolq quantizes, and ONNX Runtime computing evolq's numbers.

Each quantizer's nodes are checked exactly, on inputs away from rounding ties (QuantizeLinear
divides by the scale where evolq multiplies by its reciprocal: at a tie the two may round apart).
The whole model is checked with the criterion the levels tests use for two float orders of one
quantized model (:func:`evolq_testing.assert_only_neighbouring_levels`).
"""

from __future__ import annotations

import json

import pytest
import torch
from evolq_testing import SMALL_FAMILY_MODELS, assert_only_neighbouring_levels, small_family_model, spread_random_weights
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import evolq
from evolq.cli import main
from evolq.export import StoredWeight, compare_with_onnxruntime, count_nodes, expected_qdq, export_onnx, logit_step
from evolq.quant.bits import BitType
from evolq.quant.layers import correct_weight_bias
from evolq.quant.observers import MinMaxObserver
from evolq.quant.quantizer import Log2Quantizer, UniformQuantizer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def small_vit(seed: int = 0) -> VisionTransformer:
    """The default model's input (28x28, 1 channel) at toy size: 2 blocks, 17 tokens: an export takes seconds."""
    torch.manual_seed(seed)
    return spread_random_weights(VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10,
                                                   embed_dim=32, depth=DEPTH, num_heads=2))


DEPTH = 2
IMAGES = torch.randn(120, 1, 28, 28, generator=torch.Generator().manual_seed(5))


def run_onnx(module: nn.Module, x: torch.Tensor, path, fusions: bool = True) -> torch.Tensor:
    """``module`` exported to ``path`` and run by ONNX Runtime on ``x``."""
    torch.onnx.export(module.eval(), (x,), str(path), dynamo=True, opset_version=20, verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=[] if fusions else ["QDQSelectorActionTransformer"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def quantizer(bits: int, scale: torch.Tensor, zero_point: torch.Tensor, channel_axis: int | None) -> UniformQuantizer:
    quant = UniformQuantizer(BitType(bits), MinMaxObserver(BitType(bits)), channel_axis)
    quant.scale, quant.zero_point, quant.mode = scale, zero_point.to(torch.int32), "quant"
    return quant


@pytest.mark.parametrize("bits, per_channel", [(8, False), (4, False), (3, False), (4, True), (8, True)])
def test_a_qdq_pair_gives_evolq_fake_quantization_exactly(bits, per_channel, tmp_path):
    channels = 6
    generator = torch.Generator().manual_seed(bits)
    if per_channel:  # PTF: power-of-two factors of one unit, one zero point
        scale = 0.03 * 2.0 ** torch.randint(0, 4, (channels,), generator=generator).float()
        zero = torch.full((channels,), 2 ** (bits - 1))
    else:
        scale, zero = torch.tensor(0.037), torch.tensor(3)
    quant = quantizer(bits, scale, zero, -1 if per_channel else None)
    # levels from 4 below the grid to 4 above it, each value at most 0.4 steps off its level: no ties
    levels = torch.randint(-4, 2**bits + 4, (50, channels), generator=generator) - zero
    x = (levels + 0.8 * torch.rand(50, channels, generator=generator) - 0.4) * scale
    assert torch.equal(run_onnx(quant, x, tmp_path / "q.onnx"), quant.quantize(x))
    nodes = count_nodes(tmp_path / "q.onnx")
    assert nodes["QuantizeLinear"] == nodes["DequantizeLinear"] == 1
    assert (nodes.get("Clip", 0) + nodes.get("Max", 0) > 0) == (bits < 8)  # a narrower grid than uint8 is clamped


def test_the_log2_softmax_quantizer_gives_evolq_levels(tmp_path):
    quant = Log2Quantizer(4)
    quant.mode = "quant"
    exponents = torch.rand(40, 30, generator=torch.Generator().manual_seed(0)) * 20  # 2^-20 .. 1
    exponents = exponents.round() + (exponents - exponents.round()).clamp(-0.45, 0.45)  # no ties at half exponents
    p = torch.exp2(-exponents)
    assert torch.equal(run_onnx(quant, p, tmp_path / "log2.onnx"), quant(p))


@pytest.fixture(scope="module")
def models() -> dict[str, evolq.QuantizedModel]:
    """The small model calibrated under both placements (and with 4-bit activations)."""
    configs = {"full": evolq.QuantConfig.preset("w4a8"), "inputs": evolq.QuantConfig.preset("w4a8", placement="inputs"),
               "full-w3a4": evolq.QuantConfig.preset("w3a4")}
    return {name: evolq.QuantizedModel(small_vit(), config).calibrate(IMAGES[:80], batch_size=40, progress=False)
            for name, config in configs.items()}


def test_the_integer_layer_norm_exports_to_the_same_numbers(models, tmp_path):
    qmodel = models["full"]
    norm = qmodel.model.blocks[1].norm1
    assert norm.integer
    with torch.inference_mode():
        stream = norm.input_quant(qmodel.prefix(IMAGES[:40], 1))  # on the input grid: the QDQ pair keeps it
        expected = norm(stream)
    assert torch.equal(run_onnx(norm, stream.clone(), tmp_path / "norm.onnx"), expected)


def test_stored_weights_are_evolq_weights_bit_for_bit(models):
    for qmodel in models.values():
        for layer in qmodel.weight_layers():
            stored = StoredWeight(layer)
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            weight = (stored.levels.float() - stored.zero_point.float().reshape(shape)) * stored.scale.reshape(shape)
            assert stored.levels.dtype == torch.uint8 and stored.levels.max() <= layer.weight_quant.bit_type.qmax
            if layer.bias_correction:
                weight = (weight - stored.q_mean) * stored.ratio + stored.w_mean
                assert torch.equal(weight, correct_weight_bias(layer.weight_quant.quantize(layer.weight), layer.weight))
            assert torch.equal(weight, layer.effective_weight())


@pytest.mark.parametrize("name", ["full", "inputs", "full-w3a4"])
def test_the_exported_model_runs_in_onnx_runtime_as_evolq_computes_it(name, models, tmp_path):
    qmodel = models[name]
    path = export_onnx(qmodel, tmp_path / "model.onnx", IMAGES[:1])
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # any batch size
    nodes = count_nodes(path)
    expected = expected_qdq(qmodel)
    assert {op: nodes[op] for op in expected} == expected
    # One pair per activation quantizer call. "full": the conv's input and output, the tokens and the position
    # embedding; per block the two norms' inputs (the stream), the inputs of qkv, proj, fc1 and fc2, the qkv
    # output, the scores, the softmax, proj's and fc2's outputs; the final norm's input, the head's input and
    # output. "inputs": the conv's input; per block the norms' and linears' inputs, q, k, v and the softmax;
    # the final norm's input, the head's input and output.
    calls = 2 + 2 + 11 * DEPTH + 3 if name.startswith("full") else 1 + 10 * DEPTH + 3
    assert expected["QuantizeLinear"] == calls
    assert expected["DequantizeLinear"] == calls + 4 * DEPTH + 2  # and one per weight: 4 per block, conv, head
    step = qmodel.model.head.output_quant.step()
    with torch.inference_mode():
        ours = qmodel(IMAGES)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["QDQSelectorActionTransformer"])
    theirs = torch.from_numpy(session.run(["logits"], {"images": IMAGES.numpy()})[0])
    assert_only_neighbouring_levels(theirs, ours, step)
    summary = compare_with_onnxruntime(path, qmodel, (IMAGES, ours.argmax(-1)), batch_size=50, qdq_fusions=False)
    assert summary["images"] == len(IMAGES) and summary["evolq_top1"] == 100.0
    assert summary["max_logit_difference"] == float((theirs - ours).abs().max()) and summary["logit_step"] == step


@pytest.mark.parametrize("family", list(SMALL_FAMILY_MODELS))
def test_every_family_exports_and_runs_in_onnx_runtime_as_evolq_computes_it(family, tmp_path):
    model, side = small_family_model(family)
    images = torch.randn(24, 3, side, side, generator=torch.Generator().manual_seed(7))
    qmodel = evolq.QuantizedModel(model, "w4a8").calibrate(images[:16], batch_size=8, progress=False)
    path = export_onnx(qmodel, tmp_path / "model.onnx", images[:1])
    # One pair per quantizer call, but torch's graph optimizer merges two equal pairs on one tensor (a ResNet
    # unit's output quantizer and its successor's downsample input quantizer calibrate alike): at most that.
    nodes, expected = count_nodes(path), expected_qdq(qmodel)
    assert 0 < nodes["QuantizeLinear"] <= expected["QuantizeLinear"]
    with torch.inference_mode():
        ours = qmodel(images)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["QDQSelectorActionTransformer"])
    theirs = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    step = logit_step(qmodel)  # None for LeViT: its logits average two heads, each on its own grid
    if step is None:
        assert (theirs - ours).abs().mean() <= 0.02 * ours.abs().mean()  # assert_only_neighbouring_levels' 2 %
    else:
        assert_only_neighbouring_levels(theirs, ours, step)


def test_export_leaves_the_model_as_it_was(models, tmp_path):
    qmodel = models["full"]
    with torch.inference_mode():
        before = qmodel(IMAGES[:20])
    export_onnx(qmodel, tmp_path / "model.onnx", IMAGES[:1])
    with torch.inference_mode():
        assert torch.equal(qmodel(IMAGES[:20]), before)
    assert all(layer.stored_weight is None for layer in qmodel.weight_layers())
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # written atomically: no temporary left


@pytest.mark.parametrize("checks_failing", [1, 2])
def test_an_invalid_optimized_graph_is_exported_again_unoptimized(checks_failing, models, tmp_path, monkeypatch):
    check, calls = onnx.checker.check_model, []

    def failing_check(model, full_check=False):
        calls.append(model)
        if len(calls) <= checks_failing:  # as the optimizer's dangling constant fails it on a ResNet
            raise onnx.checker.ValidationError("Nodes in a graph must be topologically sorted")
        return check(model, full_check=full_check)

    export, optimized = torch.onnx.export, []

    def recording_export(*args, **kwargs):
        optimized.append(kwargs["optimize"])
        return export(*args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", failing_check)
    monkeypatch.setattr(torch.onnx, "export", recording_export)
    path = tmp_path / "model.onnx"
    if checks_failing == 2:
        with pytest.raises(evolq.RunError, match="invalid graph for model VisionTransformer "
                                                 r"\(Nodes in a graph must be topologically sorted\)"):
            export_onnx(models["full"], path, IMAGES[:1])
        assert not path.exists() and optimized == [True, False]
        return
    export_onnx(models["full"], path, IMAGES[:1])
    assert optimized == [True, False]
    nodes, expected = count_nodes(path), expected_qdq(models["full"])
    assert {op: nodes[op] for op in expected} == expected  # unoptimized: every pair as evolq calls it


def test_an_uncalibrated_model_is_refused_in_one_line(tmp_path):
    with pytest.raises(evolq.UsageError, match="not calibrated"):
        export_onnx(evolq.QuantizedModel(small_vit(), "w4a8"), tmp_path / "model.onnx", IMAGES[:1])


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A finished PTQ-only run of the default model, small: seconds."""
    folder = tmp_path_factory.mktemp("run")
    evolq.run_quantize(evolq.RunConfig(calib_size=50, selection_size=10, eval_size=30, optimizer="none", threads=1),
                       out=folder, progress=False)
    return folder


def test_evolq_export_writes_and_checks_a_run(run_folder, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(run_folder), "--out", str(out), "--check", "--eval-size", "30"]) == 0
    printed = capsys.readouterr().out
    onnx.checker.check_model(str(out), full_check=True)
    assert f"wrote {out}" in printed and "ONNX Runtime top-1" in printed and "no QDQ fusions top-1" in printed
    recorded = json.loads((run_folder / "result.json").read_text())["final_top1"]
    assert f"{recorded:8.2f}" in printed  # the run's own top-1 on the same 30 images, next to the runtime's


def test_evolq_export_writes_into_the_run_folder_by_default(run_folder):
    assert main(["export", str(run_folder)]) == 0
    assert (run_folder / "model.onnx").is_file()


@pytest.mark.parametrize("case, named", [("missing", "does not exist"), ("empty", "no finished run"),
                                         ("unfinished", "no finished run"), ("eval", "eval size 0")])
def test_evolq_export_refuses_bad_input_in_one_line(case, named, run_folder, tmp_path, capsys):
    folder = tmp_path / "run"
    args = []
    if case == "eval":
        folder, args = run_folder, ["--check", "--eval-size", "0"]
    elif case != "missing":
        folder.mkdir()
    if case == "unfinished":
        recorded = json.loads((run_folder / "result.json").read_text())
        (folder / "result.json").write_text(json.dumps(dict(recorded, complete=False)))
    assert main(["export", str(folder), "--out", str(tmp_path / "m.onnx"), *args]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and named in error and "allowed" in error
    assert not (tmp_path / "m.onnx").exists()

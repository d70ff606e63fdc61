"""ONNX export of a quantized model, with QuantizeLinear/DequantizeLinear (QDQ) pairs where evolq quantizes.

Each quantizer becomes standard ONNX (opset 20; :mod:`evolq.quant.onnx` writes the nodes):

- Activations, per tensor (unsigned, scale ``s``, zero point ``z``): QuantizeLinear then
  DequantizeLinear on uint8. QuantizeLinear saturates at 0..255, so a narrower grid (``b`` < 8
  bits, e.g. 4-bit activations) gets a Clip to ``[(0 - z) s, (2^b - 1 - z) s]`` before it: the
  bounds quantize to the end levels, so this is the same as evolq's clamp of the levels.
- PTF, the per-channel power-of-two factors of LayerNorm inputs (and of the residual stream
  under placement "full"): folded into a per-channel scale ``unit * 2^k``; the QDQ pair runs
  along the channel axis (-1), the clamp as Max/Min with per-channel bounds.
- Weights, per output channel: the integer levels plus zero point as a uint8 initializer and a
  DequantizeLinear along axis 0. The weight is a constant, so this is exact at any width (3 or 4
  bits included). Bias correction (on by default) follows as the Sub/Mul/Add evolq computes,
  ``(w - q_mean) * ratio + w_mean`` per output channel: float operations after the
  DequantizeLinear. Quantize with ``bias_correction=False`` for weights that are pure QDQ.
- Integer LayerNorm (placement "full"): evolq's operations in evolq's order (Div and Round to the
  input's levels, float64 ReduceSum, Sqrt, Floor, Round, Pow of 2); the exponent of ``frexp``,
  which ONNX lacks, becomes a count of comparisons with powers of two. Given the same input,
  the same numbers.
- The log2 softmax quantizer: Log, Div, Round, Clip, Pow and Where, as torch's exporter writes
  evolq's ``log2``, ``round``, ``exp2`` and ``masked_fill``.

Where ONNX Runtime can differ from evolq's own forward is float rounding: QuantizeLinear
divides by the scale where evolq multiplies by its reciprocal, matmuls sum in another order,
Softmax, Erf (GELU) and Log are other implementations. A value within float rounding of a
rounding boundary then lands on the neighbouring level, and that moves the logits by whole
steps of their own grid. Both sides round half to even (``torch.round``, ONNX Round and
QuantizeLinear). :func:`compare_with_onnxruntime` measures the outcome.

The exporter is ``torch.onnx.export(dynamo=True)``, torch's torch.export-based one: the
TorchScript one is deprecated since torch 2.9 and writes its own QDQ only for 8-bit grids,
while ``torch.onnx.ops.symbolic`` here writes exactly the nodes above, and its graph optimizer
keeps a DequantizeLinear of a constant (it does not fold the weights back to float). The batch
size of the exported graph is free.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from evolq.data import model_input
from evolq.errors import RunError, UsageError
from evolq.evaluate import Labelled, batch_outputs
from evolq.files import atomic_path, read_json
from evolq.pipeline import RunConfig, evaluation_set, load_quantized
from evolq.qmodel import QuantizedModel
from evolq.quant.grid import Grid
from evolq.quant.layers import QLinear, QuantWeightLayer, bias_correction
from evolq.quant.onnx import OPSET, storage_type
from evolq.quant.quantizer import UniformQuantizer

INPUT, OUTPUT = "images", "logits"
INSTALL_HINT = "pip install 'evolq[export]'"
QDQ_FUSIONS = "QDQSelectorActionTransformer"  # ONNX Runtime's graph optimizer that fuses QDQ pairs into integer ops


class StoredWeight(nn.Module):
    """A weight layer's quantized weight as a deployed model stores it: integer levels, scale and zero point.

    Its forward (only while exporting) is a DequantizeLinear of the levels along the output
    channels, then the layer's bias correction with its terms fixed.
    """

    def __init__(self, layer: QuantWeightLayer) -> None:
        super().__init__()
        quant, weight = layer.weight_quant, layer.weight.detach()
        storage = storage_type(quant.bit_type)
        grid = Grid.of(quant.scale, quant.zero_point, quant.bit_type, 0, weight.dim(), weight.dtype)
        zero = quant.zero_point.reshape(-1, *(1,) * (weight.dim() - 1))
        self.register_buffer("levels", (grid.levels(weight) + zero).to(storage))  # those quant.quantize scales
        self.register_buffer("scale", quant.scale.float())
        self.register_buffer("zero_point", quant.zero_point.to(storage))
        self.corrected = layer.bias_correction
        terms = bias_correction(quant.quantize(weight), weight) if self.corrected else ()
        for name, term in zip(("q_mean", "ratio", "w_mean"), terms):
            self.register_buffer(name, term)

    def forward(self) -> torch.Tensor:
        weight = torch.onnx.ops.symbolic("DequantizeLinear", (self.levels, self.scale, self.zero_point), {"axis": 0},
                                         dtype=torch.float32, shape=self.levels.shape, version=OPSET)
        # correct_weight_bias's formula, its terms fixed: the same elementwise operations
        return (weight - self.q_mean) * self.ratio + self.w_mean if self.corrected else weight


class _Traced(nn.Module):
    """What the exporter traces: a copy of the quantized model whose weight layers write their stored
    weights, run on whole batches."""

    def __init__(self, qmodel: QuantizedModel) -> None:
        super().__init__()
        self.qmodel = copy.deepcopy(qmodel)
        for layer in self.qmodel.weight_layers():
            if layer.quantizing:
                layer.stored_weight = StoredWeight(layer)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.qmodel.whole_batch_forward(images)


def export_onnx(qmodel: QuantizedModel, path: str | Path, example: torch.Tensor) -> Path:
    """Write the calibrated ``qmodel`` to ``path`` as ONNX with QDQ pairs (written atomically; checked by
    ``onnx.checker``); ``example``: images of the model's input shape, any batch size. Returns the path.

    The graph's input is ``images`` (any batch size), its output ``logits``.
    """
    onnx = _require("onnx")
    _require("onnxscript")
    if not qmodel.calibrated:
        raise UsageError("quantized model is not calibrated; allowed: a calibrated QuantizedModel "
                         "(QuantizedModel.calibrate or evolq.load_quantized)")
    path = Path(path)
    traced = _Traced(qmodel).cpu().eval()
    example = torch.cat([example[:1].detach().cpu().float()] * 2)  # torch.export would fix a batch size of 1
    with atomic_path(path) as tmp, traced.qmodel.dequantized():
        invalid = _export(traced, example, tmp, optimize=True)
        if invalid:  # torch's graph optimizer can keep a name of a constant it merged away (seen on ResNet)
            invalid = _export(traced, example, tmp, optimize=False)
        if invalid:
            raise RunError(f"torch's ONNX exporter wrote an invalid graph for model {type(qmodel.model).__name__} "
                           f"({invalid}); allowed: the families whose export is tested (docs/export.md)")
        if not onnx.load(str(tmp)).graph.input[0].type.tensor_type.shape.dim[0].dim_param:
            raise RunError(f"torch's ONNX exporter fixed the batch size of model {type(qmodel.model).__name__}; "
                           "allowed: models whose forward keeps the batch size symbolic (docs/export.md)")
    return path


def _export(traced: _Traced, example: torch.Tensor, path: Path, optimize: bool) -> str | None:
    """Export ``traced`` to ``path`` (with or without torch's ONNX graph optimizer); the checker's complaint, or None."""
    onnx = _require("onnx")
    try:
        torch.onnx.export(traced, (example,), str(path), dynamo=True, opset_version=OPSET, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                          external_data=False, optimize=optimize, verbose=False)
    except Exception as error:  # noqa: BLE001 - the exporter's failures are deep; the user gets one line
        raise RunError(f"torch's ONNX exporter cannot export model {type(traced.qmodel.model).__name__} "
                       f"({_first_line(error)}); allowed: the families whose export is tested (docs/export.md)") from None
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        return _first_line(error)
    return None


def count_nodes(path: str | Path) -> dict[str, int]:
    """How many nodes of each operator type the ONNX file at ``path`` holds."""
    onnx = _require("onnx")
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def expected_qdq(qmodel: QuantizedModel) -> dict[str, int]:
    """The QuantizeLinear and DequantizeLinear nodes an export of ``qmodel`` holds: one pair per activation
    quantizer call in a forward pass, one DequantizeLinear per quantized weight."""
    calls = []
    hooks = [quant.register_forward_hook(lambda module, inputs, output: calls.append(module))
             for quant in qmodel.quantizers() if isinstance(quant, UniformQuantizer)]
    try:
        with torch.inference_mode(), qmodel.dequantized():
            qmodel.whole_batch_forward(torch.zeros(1, *model_input(qmodel.model)[0]))
    finally:
        for hook in hooks:
            hook.remove()
    quantized = [c for c in calls if c.mode == "quant" and c.calibrated]
    weights = sum(layer.quantizing for layer in qmodel.weight_layers())
    return {"QuantizeLinear": len(quantized), "DequantizeLinear": len(quantized) + weights}


def compare_with_onnxruntime(path: str | Path, qmodel: QuantizedModel, data: Labelled, batch_size: int = 500,
                             qdq_fusions: bool = True, progress: bool = False) -> dict:
    """ONNX Runtime (CPU) on the file at ``path`` against ``qmodel``'s own quantized forward, on ``data``.

    ``qdq_fusions=False`` turns off ONNX Runtime's QDQ fusions (its ``QDQSelectorActionTransformer``,
    on by default): they replace DequantizeLinear-Softmax-QuantizeLinear by its QLinearSoftmax, whose
    table-based arithmetic puts about 2% of the probabilities one level off, and matmuls of two
    dequantized tensors by integer ones. Without them ONNX Runtime computes evolq's operations.
    Returns the number of images, each side's top-1 (%), how often their predictions agree (%),
    the largest logit difference and the logits' quantization step (None if they are not quantized).
    """
    return _compare(path, qmodel, data, (qdq_fusions,), batch_size, progress)[0]


def _compare(path: str | Path, qmodel: QuantizedModel, data: Labelled, fusions: tuple[bool, ...],
             batch_size: int = 500, progress: bool = False) -> list[dict]:
    """:func:`compare_with_onnxruntime` for one ONNX Runtime session per entry of ``fusions``, all against
    one forward of ``qmodel`` per batch."""
    sessions = [_session(path, qdq_fusions) for qdq_fusions in fusions]
    correct, agree = torch.zeros(1 + len(sessions)), torch.zeros(len(sessions))
    largest, total = torch.zeros(len(sessions)), 0

    def outputs(images: torch.Tensor) -> torch.Tensor:
        inputs = {INPUT: images.cpu().float().numpy()}
        theirs = [torch.from_numpy(session.run([OUTPUT], inputs)[0]) for session in sessions]
        return torch.stack([qmodel(images).cpu(), *theirs])

    with torch.inference_mode():
        for logits, labels in batch_outputs(outputs, data, batch_size, progress=progress, desc="ONNX Runtime"):
            predicted = logits.argmax(-1)
            correct += (predicted == labels).sum(-1)
            agree += (predicted[1:] == predicted[0]).sum(-1)
            largest = torch.maximum(largest, (logits[1:] - logits[0]).abs().flatten(1).max(-1).values)
            total += len(labels)
    evolq_top1, *onnx_top1 = (100.0 * correct / max(total, 1)).tolist()
    return [dict(images=total, evolq_top1=evolq_top1, onnxruntime_top1=theirs,
                 agreement=100.0 * float(agreed) / max(total, 1), max_logit_difference=float(most),
                 logit_step=logit_step(qmodel))
            for theirs, agreed, most in zip(onnx_top1, agree, largest)]


def logit_step(qmodel: QuantizedModel) -> float | None:
    """The step of the grid the logits are quantized on (the head's output quantizer), or None."""
    head = qmodel.model.get_classifier()  # a tuple for LeViT's two averaged heads: no one grid
    quant = head.output_quant if isinstance(head, QLinear) else None
    return float(quant.scale) if isinstance(quant, UniformQuantizer) and quant.calibrated else None


def export_run(folder: str | Path, out: str | Path | None = None, check: bool = False,
               eval_size: int | None = None, progress: bool = True) -> dict:
    """Export a finished ``evolq quantize`` run folder to ``out`` (default ``folder/model.onnx``); with ``check``,
    compare ONNX Runtime with evolq on the run's evaluation images (the first ``eval_size`` if given).

    Returns the path, the QDQ node counts and, with ``check``, :func:`compare_with_onnxruntime`'s numbers
    and the run's recorded searched top-1.
    """
    folder = Path(folder)
    result_file = folder / "result.json"
    if not folder.is_dir():
        raise UsageError(f"run folder {str(folder)!r} does not exist; allowed: a folder written by evolq quantize")
    recorded = read_json(result_file) if result_file.is_file() else {}
    if recorded.get("complete") is not True:
        raise UsageError(f"run folder {str(folder)!r} holds no finished run (its result.json is missing or not "
                         "complete); allowed: a folder of a finished evolq quantize run")
    if eval_size is not None and (isinstance(eval_size, bool) or not isinstance(eval_size, int) or eval_size < 1):
        raise UsageError(f"eval size {eval_size!r} is not allowed; allowed: an integer >= 1")
    if check:
        _require("onnxruntime")
    qmodel = load_quantized(folder)
    path = export_onnx(qmodel, folder / "model.onnx" if out is None else out, torch.zeros(1, *model_input(qmodel.model)[0]))
    counts = count_nodes(path)
    summary = dict(path=str(path), quantize_linear=counts.get("QuantizeLinear", 0),
                   dequantize_linear=counts.get("DequantizeLinear", 0))
    if check:
        config = RunConfig.from_result(result_file)
        data = evaluation_set(config, qmodel.model, eval_size)  # its timm config gives the data config
        with_fusions, without_fusions = _compare(path, qmodel, data, (True, False), progress=progress)
        summary.update(searched_top1=recorded.get("final_top1"), onnxruntime=with_fusions,
                       without_qdq_fusions=without_fusions)
    return summary




def _session(path: str | Path, qdq_fusions: bool = True):
    """An ONNX Runtime CPU session on the file, with torch's thread count (and without QDQ fusions if asked)."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    disabled = [] if qdq_fusions else [QDQ_FUSIONS]
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def _require(package: str):
    """The optional ``package`` (the ``export`` extra), or a one-line error saying how to install it."""
    try:
        return __import__(package)
    except ImportError:
        raise RunError(f"ONNX export needs the package {package!r}, which is not installed; {INSTALL_HINT}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]

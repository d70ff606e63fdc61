"""Fidelity of evolq's fully quantized placement against the released Evol-Q code (issue 16, item 2).

    python benchmarks/fidelity.py --released /tmp/evolq-released --out runs/fidelity/fidelity.json
    python benchmarks/fidelity.py --released /tmp/evolq-released --model default \\
        --presets w8a8,w4a8,w3a4 --search auto --out runs/fidelity/default.json

The released code (github:enyac-group/evol-q, commit 9a39a35) is imported from the checkout given
by ``--released``; nothing of it is copied into the project. Make the checkout outside the project:

    git --git-dir=/work/.mirror/enyac-group+evol-q/repo worktree add /tmp/evolq-released 9a39a35

It needs three CPU patches, all made here at run time so the checkout stays untouched: a
``torch._six`` module with ``inf`` (``misc.py`` imports it), ``Tensor.cuda`` returning the tensor
on its own device (``joint_evol_opt.py`` moves every batch with ``.cuda()``), and no
``torch.load`` at all (the search below keeps the model in memory instead of saving it).

Both implementations get the same FP weights and the same images, batched alike, and are
calibrated the way the released ``main.py`` does in its ``e2e`` mode (``config_fq.Config`` with
``--ptf --bias-corr --quant-method omse``, uint weights and activations): observers watch the FP
model on every batch, OMSE and PTF choose on the last. Activation calibration does not depend on
the weight bits, so each implementation is calibrated once per activation width and only its
weight quantizers are redone per weight width (both implementations alike).

``--model deit_tiny`` (item 2): timm's ``deit_tiny_patch16_224`` with random weights on synthetic
images. timm's init gives nearly the same logits for every image, so linears are redrawn
N(0, 1/fan_in), biases N(0, 0.02^2), and the class token and position embedding get a trained
model's size (std 1 and 0.5), as ``tests/evolq/evolq_testing.py``'s ``random_vit`` does.

``--model default`` (item 4): evolq's shipped Fashion-MNIST ViT in the released
``VisionTransformer``, calibrated on evolq's calibration split (1,000 training images, batches of
100), PTQ top-1 on the whole test split; ``--search`` then runs the released block-wise
evolutionary search (``JointQuantization.evolutionary_algorithm``, ``--passes``, 10 by default, 3 cycles) without
its per-block validation on the test set: the model after the last pass is the result.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import types
from argparse import Namespace
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

from evolq.files import write_json
from evolq.qmodel import QuantizedModel
from evolq.quant.layers import QuantWeightLayer
from evolq.quant.quantizer import UniformQuantizer
from evolq.zoo import DEFAULT_ARCH, load_default

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "evolq"))
from evolq_testing import spread_random_weights  # noqa: E402 - the tests' random ViT weights, shared

KINDS = ("weights", "activations", "ptf", "softmax", "scores")


# -- the released code ------------------------------------------------------------------------
def import_released(path: str) -> types.ModuleType:
    """The released ``models`` package, with the CPU patches made in memory (see the module docstring)."""
    if not (Path(path) / "models" / "vit_quant.py").is_file():
        sys.exit(f"--released {path!r} is not a checkout of the released Evol-Q code (no models/vit_quant.py)")
    six = types.ModuleType("torch._six")
    six.inf = math.inf
    sys.modules.setdefault("torch._six", six)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # stay on the CPU
    sys.path.insert(0, str(Path(path).resolve()))
    import models  # noqa: E402  (the released package)

    return models


def released_config(wbits: int, abits: int) -> object:
    """``config_fq.Config`` for ``--ptf --bias-corr --quant-method omse`` and uint bit types (main.py's e2e mode)."""
    from config_fq import Config

    return Config(Namespace(w_bit_type=f"uint{wbits}", a_bit_type=f"uint{abits}", quant_method="omse",
                            bias_corr=True, lis=False, ptf=True))


def build_released(released: types.ModuleType, name: str, cfg: object, state: dict) -> nn.Module:
    """The released quantized ViT (flags off, as main.py builds it) with ``state``'s FP weights."""
    if name == "deit_tiny":
        model = released.deit_tiny_patch16_224(pretrained=False, cfg=cfg)
    else:
        arch = {k: v for k, v in DEFAULT_ARCH.items()}
        model = released.vit_quant.VisionTransformer(
            **arch, norm_layer=partial(released.QIntLayerNorm, eps=1e-6), input_quant=True, cfg=cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the released model: missing {missing}, unexpected {unexpected}")
    for module in model.modules():  # a debugging hook that sums attention outputs; it fails on a new batch size
        if type(module) is released.vit_quant.Attention_ViT:
            module.handle.remove()
    return model.eval()


@torch.no_grad()
def calibrate_released(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """main.py's calibration: observe every batch, OMSE/PTF/weights fixed on the last, then quantize."""
    model.model_open_calibrate()
    for index, batch in enumerate(batches):
        if index == len(batches) - 1:
            model.model_open_last_calibrate()
        model(batch)
    model.model_close_calibrate()
    model.model_quant()


def released_weight_bits(released: types.ModuleType, model: nn.Module, wbits: int) -> None:
    """Redo every weight quantizer at ``wbits`` from its min-max observer (activations kept)."""
    bit_type = released.BIT_TYPE_DICT[f"uint{wbits}"]
    for module in model.modules():
        if type(module) in (released.QLinear, released.QConv2d):
            module.bit_type = module.quantizer.bit_type = module.observer.bit_type = bit_type
            del module.quantizer.scale  # a registered Parameter since calibration: it takes no plain tensor
            module.quantizer.update_quantization_params(module.weight)


def released_quantizers(released: types.ModuleType, model: nn.Module, x: torch.Tensor) -> list[tuple]:
    """``(name, kind, scale, zero_point)`` of every quantizer, activations in the order the forward calls them,
    then the weights in the order their layers run."""
    acts, weights, hooks = [], [], []
    for name, module in model.named_modules():
        if type(module) in (released.QAct, released.QIntSoftmax):
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: acts.append((n, m))))
        elif type(module) in (released.QLinear, released.QConv2d):
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: weights.append((n, m))))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    rows = []
    for name, module in _first_calls(acts):
        q = module.quantizer
        kind = ("softmax" if type(module) is released.QIntSoftmax else "scores" if name.endswith("qact_attn1")
                else "ptf" if module.calibration_mode == "channel_wise" else "activations")
        rows.append((name, kind, q.scale.detach().flatten(), q.zero_point.detach().flatten()))
    for name, module in _first_calls(weights):
        rows.append((name, "weights", module.quantizer.scale.detach().flatten(),
                     module.quantizer.zero_point.detach().flatten()))
    return rows


def _first_calls(calls: list[tuple]) -> list[tuple]:
    seen, order = set(), []
    for name, module in calls:
        if name not in seen:
            seen.add(name)
            order.append((name, module))
    return order


# -- evolq ------------------------------------------------------------------------------------
def calibrate_evolq(model: nn.Module, preset: str, batches: list[torch.Tensor]) -> QuantizedModel:
    """evolq's "full" placement (the default config of ``preset``) calibrated on the same batches."""
    images = torch.cat(batches)
    return QuantizedModel(model, preset).calibrate(images, batch_size=len(batches[0]), progress=False)


def evolq_weight_bits(model: nn.Module, calibrated: QuantizedModel, preset: str) -> QuantizedModel:
    """A ``preset`` model with ``calibrated``'s activation parameters and its own weight quantizers."""
    qmodel = QuantizedModel(model, preset).load_quant_state(calibrated.quant_state())
    for layer in qmodel.weight_layers():
        layer.calibrate_weight()
    return qmodel


def evolq_quantizers(qmodel: QuantizedModel, x: torch.Tensor) -> list[tuple]:
    """As :func:`released_quantizers`, from an FP forward (every quantizer is called there, in forward order)."""
    acts, weights, hooks = [], [], []
    for name, module in qmodel.named_modules():
        if isinstance(module, UniformQuantizer) and not name.endswith("weight_quant"):
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: acts.append((n, m))))
        elif isinstance(module, QuantWeightLayer):
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: weights.append((n, m))))
    with torch.no_grad(), qmodel.fp():
        qmodel(x)
    for hook in hooks:
        hook.remove()
    rows = []
    for name, module in _first_calls(acts):
        kind = ("softmax" if name.endswith("softmax_quant") else "scores" if name.endswith("score_quant")
                else "ptf" if module.channel_axis == -1 else "activations")
        rows.append((name, kind, module.scale.flatten(), module.zero_point.flatten()))
    for name, module in _first_calls(weights):
        rows.append((name, "weights", module.weight_quant.scale.flatten(), module.weight_quant.zero_point.flatten()))
    return rows


# -- comparison -------------------------------------------------------------------------------
def compare_quantizers(ours: list[tuple], theirs: list[tuple]) -> dict:
    """Per kind: count, max relative scale difference, zero-point mismatches; and the worst pairs."""
    if [r[1] for r in ours] != [r[1] for r in theirs]:
        raise RuntimeError("the quantizers do not pair up by position: "
                           f"evolq {[(r[0], r[1]) for r in ours]} vs released {[(r[0], r[1]) for r in theirs]}")
    kinds: dict = {k: dict(count=0, values=0, max_rel_scale=0.0, zero_point_mismatches=0, worst=None) for k in KINDS}
    pairs = []
    for (name, kind, scale, zero), (r_name, _, r_scale, r_zero) in zip(ours, theirs):
        scale, r_scale = torch.broadcast_tensors(scale.double(), r_scale.double())
        zero, r_zero = torch.broadcast_tensors(zero.double(), r_zero.double())  # PTF: one zero point or one each
        rel = float(((scale - r_scale).abs() / r_scale.abs()).max())
        mismatches = int((zero != r_zero).sum())
        entry = kinds[kind]
        entry["count"] += 1
        entry["values"] += r_scale.numel()
        entry["zero_point_mismatches"] += mismatches
        if rel >= entry["max_rel_scale"]:
            entry["max_rel_scale"], entry["worst"] = rel, f"{name} ~ {r_name}"
        pairs.append(dict(evolq=name, released=r_name, kind=kind, max_rel_scale=rel, zero_point_mismatches=mismatches))
    return dict(kinds=kinds, pairs=pairs)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def run_all(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def logit_figures(ours: torch.Tensor, theirs: torch.Tensor, ours_fp: torch.Tensor, theirs_fp: torch.Tensor) -> dict:
    return dict(
        top1_agreement=100.0 * float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
        rel_error_evolq_vs_released=relative(ours, theirs),
        rel_error_evolq_vs_its_fp=relative(ours, ours_fp),
        rel_error_released_vs_its_fp=relative(theirs, theirs_fp),
        rel_error_fp_evolq_vs_fp_released=relative(ours_fp, theirs_fp),
        fp_top1_agreement=100.0 * float((ours_fp.argmax(-1) == theirs_fp.argmax(-1)).float().mean()),
        top1_agreement_evolq_vs_its_fp=100.0 * float((ours.argmax(-1) == ours_fp.argmax(-1)).float().mean()),
        top1_agreement_released_vs_its_fp=100.0 * float((theirs.argmax(-1) == theirs_fp.argmax(-1)).float().mean()),
    )


# -- models and data --------------------------------------------------------------------------
def random_deit_tiny(seed: int) -> nn.Module:
    """timm deit_tiny_patch16_224 with weights whose logits differ between images (see the module docstring)."""
    torch.manual_seed(seed)
    return spread_random_weights(timm.create_model("deit_tiny_patch16_224", pretrained=False))


def table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def print_quantizers(preset: str, compared: dict) -> None:
    rows = [(kind, e["count"], e["values"], f"{e['max_rel_scale']:.2e}", e["zero_point_mismatches"], e["worst"])
            for kind, e in compared["kinds"].items()]
    print(f"\n{preset}: quantization parameters, evolq vs released")
    print(table(rows, ("kind", "quantizers", "values", "max rel. scale diff", "zero-point mismatches", "worst pair")))


# -- item 2: random deit_tiny on synthetic images ---------------------------------------------
def fidelity_deit(args: argparse.Namespace, released: types.ModuleType) -> dict:
    model = random_deit_tiny(args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(args.images, 3, 224, 224, generator=generator)
    held_out = torch.randn(args.held_out, 3, 224, 224, generator=generator)
    batches = list(images.split(args.batch_size))
    presets = args.presets.split(",")
    result: dict = dict(model="deit_tiny_patch16_224 (random, rescaled)", images=args.images,
                        batch_sizes=[len(b) for b in batches], held_out=args.held_out, presets={})
    timings = result["seconds"] = {}
    evaluate = torch.cat([images, held_out])
    fp_evolq = run_all(model, evaluate)
    first = presets[0]
    wbits, abits = (int(v) for v in first[1:].split("a"))

    started = time.time()
    theirs = build_released(released, "deit_tiny", released_config(wbits, abits), model.state_dict())
    fp_released = run_all(theirs, evaluate)  # flags off, float LayerNorm: the true FP model
    calibrate_released(theirs, batches)
    timings["calibrate_released"] = round(time.time() - started, 1)
    print(f"released calibration {timings['calibrate_released']} s", flush=True)
    started = time.time()
    calibrated = calibrate_evolq(model, first, batches)
    timings["calibrate_evolq"] = round(time.time() - started, 1)
    print(f"evolq calibration {timings['calibrate_evolq']} s", flush=True)

    for preset in presets:
        w, a = (int(v) for v in preset[1:].split("a"))
        if a != abits:
            raise SystemExit(f"presets must share one activation width ({abits}); got {preset}")
        released_weight_bits(released, theirs, w)
        ours = evolq_weight_bits(model, calibrated, preset)
        started = time.time()
        logits_ours, logits_theirs = run_all(ours, evaluate), run_all(theirs, evaluate)
        theirs.model_dequant()  # the released "FP" teacher: quantizers off, LayerNorm still integer
        teacher = run_all(theirs, evaluate)
        theirs.model_quant()
        timings[f"forward_{preset}"] = round(time.time() - started, 1)
        compared = compare_quantizers(evolq_quantizers(ours, images[:1]), released_quantizers(released, theirs, images[:1]))
        n = args.images
        entry = dict(
            calibration_images=logit_figures(logits_ours[:n], logits_theirs[:n], fp_evolq[:n], fp_released[:n]),
            held_out_images=logit_figures(logits_ours[n:], logits_theirs[n:], fp_evolq[n:], fp_released[n:])
            if args.held_out else None,
            released_teacher_vs_fp=relative(teacher, fp_released),
            quantizers=compared,
        )
        result["presets"][preset] = entry
        print_quantizers(preset, compared)
        rows = [(split, f"{f['top1_agreement']:.1f}", f"{f['rel_error_evolq_vs_released']:.4f}",
                 f"{f['rel_error_evolq_vs_its_fp']:.4f}", f"{f['rel_error_released_vs_its_fp']:.4f}",
                 f"{f['rel_error_fp_evolq_vs_fp_released']:.1e}")
                for split, f in (("calibration", entry["calibration_images"]), ("held out", entry["held_out_images"]))
                if f is not None]
        print(f"\n{preset}: logits (released 'FP' teacher vs true FP: {entry['released_teacher_vs_fp']:.4f})")
        print(table(rows, ("images", "top-1 agreement %", "evolq vs released", "evolq vs FP", "released vs FP",
                           "FP vs FP")), flush=True)
    return result


# -- item 4: the default model on Fashion-MNIST -----------------------------------------------
@torch.no_grad()
def top1_of(model: nn.Module, dataset, batch_size: int = 500) -> float:
    correct = total = 0
    for images, labels in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        correct += int((model(images).argmax(-1) == labels).sum())
        total += len(labels)
    return 100.0 * correct / total


def fidelity_default(args: argparse.Namespace, released: types.ModuleType) -> dict:
    from evolq.pipeline import RunConfig, prepare

    fp_model = load_default()
    result: dict = dict(model="evolq default (Fashion-MNIST ViT)", presets={})
    released_models = {}
    for preset in args.presets.split(","):
        started = time.time()
        prepared = prepare(RunConfig(preset=preset, seed=args.seed, optimizer="none"), progress=False)
        batches = list(prepared.calib_images.split(100))
        entry = dict(evolq_ptq_top1=prepared.top1(progress=False))
        if not result.get("fp_top1"):
            with prepared.qmodel.fp():
                result["fp_top1"] = prepared.top1(progress=False)
        entry["evolq_seconds"] = round(time.time() - started, 1)
        started = time.time()
        w, a = (int(v) for v in preset[1:].split("a"))
        theirs = build_released(released, "default", released_config(w, a), fp_model.state_dict())
        calibrate_released(theirs, batches)
        entry["released_ptq_top1"] = top1_of(theirs, prepared.evaluation)
        entry["released_seconds"] = round(time.time() - started, 1)
        entry["difference"] = entry["evolq_ptq_top1"] - entry["released_ptq_top1"]
        compared = compare_quantizers(evolq_quantizers(prepared.qmodel, batches[0][:1]),
                                      released_quantizers(released, theirs, batches[0][:1]))
        entry["quantizers"] = compared["kinds"]
        print_quantizers(preset, compared)
        print(f"{preset}: PTQ top-1 evolq {entry['evolq_ptq_top1']:.2f}, released {entry['released_ptq_top1']:.2f} "
              f"(FP {result['fp_top1']:.2f})", flush=True)
        result["presets"][preset] = entry
        released_models[preset] = (theirs, batches, prepared.evaluation)
    write_json(args.out, result)  # the PTQ figures, before the (long) search
    if args.search:
        preset = args.search if args.search != "auto" else min(
            result["presets"], key=lambda p: result["presets"][p]["released_ptq_top1"])
        theirs, batches, evaluation = released_models[preset]
        result["search"] = released_search(theirs, batches, evaluation, args.seed, args.passes)
        result["search"]["preset"] = preset
        result["search"]["gain"] = result["search"]["top1"] - result["presets"][preset]["released_ptq_top1"]
        print(f"released search at {preset}: top-1 {result['search']['top1']:.2f} "
              f"(gain {result['search']['gain']:+.2f}) in {result['search']['seconds']} s", flush=True)
    return result


def released_search(model: nn.Module, batches: list[torch.Tensor], evaluation, seed: int, passes: int = 10,
                    cycles: int = 3) -> dict:
    """``JointQuantization.opt`` without its per-block validation on the test set (and without torch.save)."""
    from joint_evol_opt import Attention_ViT, JointQuantization

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    loader = [(batch, None) for batch in batches]
    args = Namespace(loss="contrastive", temp=3.0, num_passes=passes, num_cycles=cycles)
    optim = JointQuantization(model, loader, torch.device("cpu"), args)
    blocks = [m for m in model.modules() if type(m) is Attention_ViT]
    for block in blocks:
        block.inputs, block.outputs = [], []
    model.model_dequant()  # the released teacher: quantizers off, LayerNorm still integer
    with torch.no_grad():
        optim.o_fps = [model(x) for x, _ in loader]
    model.model_quant()
    started, losses = time.time(), []
    for _ in range(passes):
        for block in reversed(blocks):
            optim.m = block
            optim.bits = block.proj.quantizer.bit_type.bits
            loss, scales = optim.evolutionary_algorithm(optim.get_scales(), cycles)
            optim.set_scales(scales)
        losses.append(loss)
        print(f"  pass {len(losses)}: loss {loss:.4f}", flush=True)
    model.model_quant()
    seconds = round(time.time() - started, 1)
    return dict(passes=passes, cycles=cycles, pass_losses=losses, top1=top1_of(model, evaluation), seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--released", required=True, help="checkout of github:enyac-group/evol-q at 9a39a35")
    parser.add_argument("--model", default="deit_tiny", choices=("deit_tiny", "default"))
    parser.add_argument("--presets", default="w8a8,w4a8", help="comma-separated wXaY presets")
    parser.add_argument("--images", type=int, default=256, help="deit_tiny: synthetic calibration images")
    parser.add_argument("--batch-size", type=int, default=128, help="deit_tiny: calibration batch size")
    parser.add_argument("--held-out", type=int, default=0, help="deit_tiny: further synthetic images to compare on")
    parser.add_argument("--search", default=None, help="default model: preset to run the released search at, or auto")
    parser.add_argument("--passes", type=int, default=10, help="passes of the released search (default 10, the paper's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/fidelity/fidelity.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    released = import_released(args.released)
    started = time.time()
    result = fidelity_deit(args, released) if args.model == "deit_tiny" else fidelity_default(args, released)
    result.update(released_commit="9a39a35", wall_s=round(time.time() - started, 1), torch=torch.__version__,
                  timm=timm.__version__, threads=torch.get_num_threads())
    write_json(args.out, result)
    print(f"\nwrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()

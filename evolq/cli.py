"""The ``evolq`` command: ``quantize``, ``landscape``, ``compare``, ``train-default``, ``export``.

Exit codes: 0 done, 2 usage error (``UsageError``, ``optimizers.InputError``, argparse's own),
1 runtime failure or internal error, 130 / 143 interrupted (SIGINT / SIGTERM). Errors are one
line on stderr; ``--debug`` (before or after the command) shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import fields, replace
from typing import Callable, Sequence

import torch

import evolq
from evolq.errors import RunError, UsageError
from evolq.pipeline import DEMO_PRESET, RunConfig
from optimizers import InputError

EXIT_USAGE, EXIT_RUNTIME = 2, 1
USAGE_ERRORS = (UsageError, InputError)
RUNTIME_ERRORS = (RunError, OSError, ImportError, MemoryError, torch.OutOfMemoryError)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise Terminated()


def _add_debug(parser: argparse.ArgumentParser, default: object = False) -> None:
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks")


def _add_common(parser: argparse.ArgumentParser, out: str) -> None:
    """Model, data and quantization options; ``out`` says where the outputs go by default."""
    parser.add_argument("--model", default="default", help="'default' (default: the embedded Fashion-MNIST ViT), another embedded model "
                             "(default-cnn, default-swin, default-levit) or a timm name: vit_*, deit_*, resnet*, "
                             "mobilenetv2_*, efficientnet_*, swin_*, levit_* (docs/usage.md)")
    parser.add_argument("--checkpoint", help="weights for --model: a safetensors or weights-only torch file")
    parser.add_argument("--pretrained", action="store_true",
                        help="timm's pretrained weights for a timm --model (timm's cache, or a download)")
    parser.add_argument("--data", default="fmnist", help="'fmnist' (default) or an ImageNet-style folder with train/ and val/")
    parser.add_argument("--data-dir", help="folder of the Fashion-MNIST *-ubyte.gz files (default: $EVOLQ_FMNIST_DIR or the Debian package's)")
    parser.add_argument("--wbits", type=int, help="weight bits, 2..8 (overrides the preset)")
    parser.add_argument("--abits", type=int, help="activation bits, 2..8 (overrides the preset)")
    parser.add_argument("--input-bits", type=int,
                        help="bits of the image's quantizer, 2..8 (default: the activation bits, as in the paper)")
    parser.add_argument("--placement", default="full",
                        help="which tensors are quantized: full (default, FQ-ViT's fully quantized ViT as in the paper; "
                             "other families: also every block's output) or inputs (only the inputs of matmuls "
                             "and LayerNorms)")
    parser.add_argument("--calib-size", type=int, default=1000, help="calibration images from train (default 1000)")
    parser.add_argument("--selection-size", type=int, default=1000,
                        help="held-out training images: quantize and compare pick the best pass on them, "
                             "landscape --metric top1 scores them (default 1000)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--loss", default="infonce", help="infonce (default), mse, kl or cosine")
    parser.add_argument("--out", help=f"run folder for the outputs (default {out})")
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="have glibc reuse freed memory in this process (faster on some machines, "
                             "slower on others: docs/performance.md)")


def _add_preset_and_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=DEMO_PRESET,
                        help=f"quantization preset wXaY: w8a8, w4a8, w3a8, w4a4, w3a4, ... (default {DEMO_PRESET})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data splits and the search (default 0)")


def _add_search(parser: argparse.ArgumentParser) -> None:
    """The block-wise search's options, shared by quantize and compare."""
    parser.add_argument("--passes", type=int, default=10, help="sweeps over all blocks (default 10)")
    parser.add_argument("--evaluations-per-block", type=int, default=4, help="objective evaluations per block visit (default 4)")
    parser.add_argument("--search-space", default="paper",
                        help="each block's searched scales: paper (default: qkv and proj weight scales, as Evol-Q), "
                             "weights (every linear's weight scales) or all (also every activation quantizer's scale)")
    parser.add_argument("--coordinates", default=None,
                        help="what the optimizer moves: scales (as they are) or ratios (each scale over its value at the "
                             "visit's start); default scales for --search-space paper, ratios otherwise")
    parser.add_argument("--select-by", default=None,
                        help="which pass the search returns: top1 (best selection top-1, ties by loss) or loss (lowest "
                             "selection loss); default top1 for --search-space paper, loss otherwise")
    parser.add_argument("--eval-size", type=int, help="evaluate top-1 on the first N evaluation images only (default: all)")
    parser.add_argument("--candidates-per-step", type=int,
                        help="candidates the optimizer proposes together (evolq's children per step, nevergrad's "
                             "workers); default: one per --actors, else 1")


def _quantize_parser(commands) -> None:
    parser = commands.add_parser("quantize", help="PTQ-calibrate a model and search its quantization scales")
    _add_common(parser, out="runs/<model>-<preset>-<optimizer>-seed<seed>")
    _add_preset_and_seed(parser)
    parser.add_argument("--optimizer", default="evolq", help="evolq (default), cmaes, random, gradient, ng:<name>, or none (PTQ only)")
    _add_search(parser)
    parser.add_argument("--executor", default="local",
                        help="where the search's candidates are scored: local (default, this process) or ray "
                             "(--actors model replicas; numbers equal to a local search on one thread)")
    parser.add_argument("--actors", type=int, default=1, help="Ray actors, one model replica and one CPU each (default 1)")
    parser.add_argument("--address", help="Ray cluster to join, e.g. auto or ray://host:10001 (default: start a local one)")
    parser.add_argument("--gpus-per-actor", type=float, default=0,
                        help="GPUs each actor reserves and runs its replica on (default 0; 0.5 shares one GPU)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--config", help="re-run the configuration recorded in a result.json; "
                                         "options given here replace the recorded ones")
    parser.set_defaults(handler=_quantize)


def _config(args: argparse.Namespace, **extra) -> RunConfig:
    """The run configuration named by the model, data and quantization options."""
    settings = dict(
        model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, data=args.data,
        data_dir=args.data_dir, wbits=args.wbits, abits=args.abits, input_bits=args.input_bits,
        calib_size=args.calib_size,
        selection_size=args.selection_size, device=args.device, loss=args.loss, placement=args.placement,
        reuse_freed_memory=args.reuse_freed_memory,
    )
    return RunConfig(**{**settings, **extra})


def _search_settings(args: argparse.Namespace) -> dict:
    return dict(passes=args.passes, evaluations_per_block=args.evaluations_per_block, eval_size=args.eval_size,
                search_space=args.search_space, coordinates=args.coordinates, select_by=args.select_by,
                candidates_per_step=args.candidates_per_step)


def given_options(argv: Sequence[str]) -> set[str]:
    """The destinations of the options typed in ``argv``, as opposed to those left at their default.

    argparse does not tell the two apart, so ``argv`` is parsed again by a parser whose every
    default is suppressed: only typed options reach its namespace.
    """
    shadow = build_parser()
    parsers = [shadow]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:  # argparse offers no public list of a parser's options
            action.default = argparse.SUPPRESS
            if isinstance(action.choices, dict):  # the subcommands
                parsers.extend(action.choices.values())
    return set(vars(shadow.parse_args(argv))) - {"handler", "command"}


def _quantize(args: argparse.Namespace) -> int:
    from evolq.pipeline import run_quantize

    if args.config:
        typed = given_options(args.argv) & {f.name for f in fields(RunConfig)}
        config = replace(RunConfig.from_result(args.config), **{name: getattr(args, name) for name in typed})
    else:
        config = _config(args, preset=args.preset, seed=args.seed, optimizer=args.optimizer, executor=args.executor,
                         actors=args.actors, address=args.address, gpus_per_actor=args.gpus_per_actor,
                         **_search_settings(args))
    out = args.out or f"runs/{config.model}-{config.quant_config().name}-{config.optimizer}-seed{config.seed}"
    result = run_quantize(config, out=out, resume=args.resume)
    _print_table(result)
    print(f"wrote {out}/result.json")
    return 0


def _landscape_parser(commands) -> None:
    parser = commands.add_parser("landscape", help="slice one block's loss surface and measure its roughness")
    _add_common(parser, out="runs/landscape-<preset>-block<block>")
    _add_preset_and_seed(parser)
    parser.add_argument("--block", type=int, default=-1, help="block index (default -1, the last)")
    parser.add_argument("--dims", type=int, default=2, help="1 or 2 (default 2)")
    parser.add_argument("--points", type=int, default=21, help="grid points per axis, at least 5 (default 21)")
    parser.add_argument("--radius", type=float, help="offset range in scale units (default: the paper's mutation size)")
    parser.add_argument("--metric", default="loss", help="loss (default) or top1 (on the --selection-size held-out training images)")
    parser.add_argument("--reference", action="store_true", help="also slice a smooth reference: FP loss with rescaled weights")
    parser.set_defaults(handler=_landscape)


def _landscape(args: argparse.Namespace) -> int:
    from evolq.files import writable_folder
    from evolq.landscape import run_landscape
    from evolq.pipeline import prepare

    # Only --metric top1 looks at the selection images: a loss slice leaves them in the training set.
    config = _config(args, preset=args.preset, seed=args.seed, optimizer="none",
                     **({} if args.metric == "top1" else {"selection_size": 0}))
    out = args.out or f"runs/landscape-{config.quant_config().name}-block{args.block}"
    writable_folder(out)
    summary = run_landscape(
        prepare(config), args.block, dims=args.dims, points=args.points, radius=args.radius, metric=args.metric,
        loss=args.loss, reference=args.reference, seed=args.seed, out=out,
    )
    for name in ("quantized", "reference"):
        if name in summary:
            print(f"{name:<10} " + "  ".join(f"{k}={v:.3g}" for k, v in summary[name].items()))
    print(f"wrote {out}/landscape.png, landscape.csv, roughness.json")
    return 0


def _print_table(result: dict) -> None:
    rows = [("FP top-1", result["fp_top1"]), ("PTQ top-1", result["ptq_top1"])]
    if result.get("evaluations"):
        rows.append(("searched top-1", result["final_top1"]))
    rows += [("calib loss PTQ", result["calib_loss_ptq"]), ("calib loss final", result["calib_loss_final"])]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:8.3f}")
    print(f"{'evaluations':<{width}}  {result['evaluations']:8d}   wall {result['wall_s']:.1f} s")


def _compare_parser(commands) -> None:
    parser = commands.add_parser("compare", help="compare optimizers on the same objectives, locally or on Ray")
    _add_common(parser, out="runs/compare")
    parser.add_argument("--optimizers", default="evolq,cmaes,ng:OnePlusOne,random",
                        help="comma-separated names (default evolq,cmaes,ng:OnePlusOne,random; see docs/optimizers.md)")
    parser.add_argument("--presets", default="w4a8", help="comma-separated presets, one problem each (default w4a8)")
    parser.add_argument("--problem", help="a synthetic problem instead of the model: jagged, sphere, rastrigin, ng:<name> "
                                          "(the model and data options are then unused)")
    parser.add_argument("--dim", type=int, default=64, help="dimension of a synthetic problem (default 64)")
    parser.add_argument("--budget", type=int, help="evaluations per cell (default: passes x blocks x evaluations "
                                                   "per block; 200 for a synthetic --problem)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per cell (default 3)")
    _add_search(parser)
    parser.add_argument("--executor", default="local", help="local (default) or ray")
    parser.add_argument("--workers", type=int, default=1, help="cells run in parallel (default 1)")
    parser.add_argument("--address", help="Ray cluster address to join (default: start a local one)")
    parser.set_defaults(handler=_compare)


def _compare(args: argparse.Namespace) -> int:
    from functools import partial

    from evolq.compare import QuantizedSearch, run_compare
    from optimizers import make_problem

    names = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    threads = max(1, (os.cpu_count() or 1) // max(1, args.workers))  # parallel cells share the cores
    if args.problem:
        make_problem(args.problem, dim=args.dim)  # fail early on a bad name
        problems = {args.problem: partial(make_problem, args.problem, dim=args.dim)}
        budget = 200 if args.budget is None else args.budget
    else:
        problems = {
            preset: QuantizedSearch(_config(args, preset=preset, threads=threads, **_search_settings(args)))
            for preset in (p.strip() for p in args.presets.split(",") if p.strip())
        }
        budget = args.budget
    out = args.out or "runs/compare"
    _, summary = run_compare(problems, names, args.seeds, budget, out, executor=args.executor,
                             workers=args.workers, address=args.address)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out}/results.csv, summary.csv, compare.png")
    return 0


def _train_parser(commands) -> None:
    from evolq.zoo import ZOO
    from evolq.zoo.train import Recipe

    parser = commands.add_parser("train-default", help="train an embedded model into a run folder (resumable)")
    parser.add_argument("--model", default="default", choices=list(ZOO),
                        help="the embedded model to train: default-cnn, default-swin, default-levit or default (default: default, the ViT)")
    parser.add_argument("--epochs", type=int,
                        help=f"training epochs (default: the model's, {Recipe.epochs} for the default ViT)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches (default 0)")
    parser.add_argument("--out", help="run folder for the checkpoint, its model card and the resumable state "
                                      "(default runs/train-<model>)")
    parser.add_argument("--data-dir", help="folder of the Fashion-MNIST *-ubyte.gz files (default: $EVOLQ_FMNIST_DIR or the Debian package's)")
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from evolq.files import writable_folder
    from evolq.zoo import ZOO
    from evolq.zoo.train import Recipe, default_out, train_default

    out = args.out or default_out(args.model)
    writable_folder(out)
    epochs = ZOO[args.model].epochs if args.epochs is None else args.epochs
    card = train_default(Recipe(seed=args.seed, epochs=epochs), out=out, data_dir=args.data_dir,
                         model_name=args.model)
    print(f"test top-1 {card['test_top1']:.2f}%  sha256 {card['sha256']}")
    print(f"wrote {card['checkpoint']}: use it with --model {args.model} --checkpoint {card['checkpoint']}")
    return 0


def _export_parser(commands) -> None:
    parser = commands.add_parser("export", help="write a finished run's quantized model as ONNX with QDQ nodes")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="folder of a finished evolq quantize run")
    parser.add_argument("--out", help="the ONNX file to write (default RUN_DIR/model.onnx)")
    parser.add_argument("--check", action="store_true",
                        help="run the file in ONNX Runtime (CPU) on the run's evaluation images and compare it with "
                             "evolq: top-1 of both, agreement, largest logit difference (needs evolq[export])")
    parser.add_argument("--eval-size", type=int, help="--check on the first N evaluation images only (default: the run's)")
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from evolq.export import export_run

    summary = export_run(args.run_dir, args.out, check=args.check, eval_size=args.eval_size)
    print(f"wrote {summary['path']}: {summary['quantize_linear']} QuantizeLinear, "
          f"{summary['dequantize_linear']} DequantizeLinear nodes")
    if args.check:
        print(f"{'searched top-1 (result.json)':<34}{summary['searched_top1']:8.2f}")
        for name, title in (("onnxruntime", "ONNX Runtime"), ("without_qdq_fusions", "ONNX Runtime, no QDQ fusions")):
            numbers = summary[name]
            if name == "onnxruntime":
                print(f"{'evolq top-1':<34}{numbers['evolq_top1']:8.2f}   on {numbers['images']} images")
            step = numbers["logit_step"]
            in_steps = f" ({numbers['max_logit_difference'] / step:.0f} logit steps)" if step else ""
            print(f"{title + ' top-1':<34}{numbers['onnxruntime_top1']:8.2f}   agreement {numbers['agreement']:.2f} %, "
                  f"largest logit difference {numbers['max_logit_difference']:.4g}{in_steps}")
    return 0


SUBCOMMANDS: list[Callable] = [_quantize_parser, _landscape_parser, _compare_parser, _train_parser, _export_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evolq", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {evolq.__version__}")
    _add_debug(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(commands)
    for command in commands.choices.values():
        _add_debug(command, default=argparse.SUPPRESS)  # set only when typed, so `evolq --debug quantize` keeps it
    return parser


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.argv = argv
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.handler(args)
    except Terminated:
        print("evolq: terminated; the last checkpoint is kept (use --resume)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("evolq: interrupted; the last checkpoint is kept (use --resume)", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure is one line; the traceback with --debug
        if args.debug:
            raise
        if isinstance(error, USAGE_ERRORS + RUNTIME_ERRORS):
            print(f"evolq: error: {error}", file=sys.stderr)
            return EXIT_USAGE if isinstance(error, USAGE_ERRORS) else EXIT_RUNTIME
        print(f"evolq: internal error: {type(error).__name__}: {_first_line(error)}; please report it "
              "(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())

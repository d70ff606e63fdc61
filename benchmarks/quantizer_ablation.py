"""Where a model's PTQ loss is: top-1 with one group of activation quantizers turned off at a time.

    python benchmarks/quantizer_ablation.py --model default-levit --preset w4a4

Calibrates as ``evolq quantize`` does (seed 0, 1,000 images), then for every group of
activation quantizers (their module path with the block and stage numbers replaced by ``#``;
``--separate`` names a path prefix whose quantizers stay one group each) turns that group off,
scores the first ``--eval-size`` test images, and turns it back on. Prints the gain of each
group against everything quantized, largest first (docs/families.md, LeViT).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

from torch.utils.data import Subset

from evolq.evaluate import top1
from evolq.pipeline import RunConfig, prepare
from evolq.quant.quantizer import UniformQuantizer


def activation_groups(model, separate: str) -> dict[str, list]:
    """Activation quantizers by module path, numbers replaced by ``#`` except under ``separate``."""
    groups = defaultdict(list)
    for name, module in model.named_modules():
        if isinstance(module, UniformQuantizer) and not name.endswith("weight_quant"):
            key = name if separate and name.startswith(separate) else re.sub(r"\d+", "#", name)
            groups[key].append(module)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default-levit")
    parser.add_argument("--preset", default="w4a4")
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--separate", default="stem", help="path prefix whose quantizers are scored one by one")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    prepared = prepare(RunConfig(model=args.model, preset=args.preset, optimizer="none", threads=args.threads),
                       progress=False)
    qmodel, test = prepared.qmodel, Subset(prepared.evaluation, range(args.eval_size))
    everything = top1(qmodel, test, progress=False)
    print(f"{args.model} {args.preset}, first {args.eval_size} test images: {everything:.2f} with every quantizer on")
    gains = []
    for key, quantizers in activation_groups(qmodel.model, args.separate).items():
        modes = [quant.mode for quant in quantizers]
        for quant in quantizers:
            quant.mode = "off"
        gains.append((top1(qmodel, test, progress=False) - everything, key, len(quantizers)))
        for quant, mode in zip(quantizers, modes):
            quant.mode = mode
    for gain, key, count in sorted(gains, reverse=True):
        print(f"{gain:+7.2f}  {key} ({count})")


if __name__ == "__main__":
    main()

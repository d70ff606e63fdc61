"""FP and PTQ top-1 of a model at several presets: the README's PTQ table.

    python benchmarks/ptq_table.py --presets w8a8,w4a8,w3a8,w4a4,w3a4

Calibrates on the same 1,000 training images (seed 0) as ``evolq quantize`` and evaluates on
the whole Fashion-MNIST test set; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time

from evolq.objective import fp_logits, model_loss
from evolq.pipeline import RunConfig, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="w8a8,w4a8,w3a8,w4a4,w3a4")
    parser.add_argument("--model", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--placement", default="full", help="full (default) or inputs")
    args = parser.parse_args()
    rows = []
    for preset in args.presets.split(","):
        started = time.time()
        prepared = prepare(RunConfig(model=args.model, preset=preset, seed=args.seed, optimizer="none",
                                     placement=args.placement), progress=False)
        with prepared.qmodel.fp():
            fp_top1 = prepared.top1(progress=False)
        ptq_top1 = prepared.top1(progress=False)
        loss = model_loss(prepared.qmodel, prepared.calib_images, fp_logits(prepared.qmodel, prepared.calib_images))
        rows.append((preset, fp_top1, ptq_top1, ptq_top1 - fp_top1, loss, time.time() - started))
    print("| preset | FP top-1 | PTQ top-1 | PTQ - FP | calib infoNCE (PTQ) |")
    print("|---|---|---|---|---|")
    for preset, fp_top1, ptq_top1, drop, loss, _ in rows:
        print(f"| {preset} | {fp_top1:.2f} | {ptq_top1:.2f} | {drop:+.2f} | {loss:.4f} |")
    print(f"total {sum(r[-1] for r in rows):.0f} s")


if __name__ == "__main__":
    main()

"""Every model family on its embedded model: the table of docs/families.md (issue 18).

    python benchmarks/families.py --models default-cnn,default-swin,default-levit

For each model (``evolq.zoo``): FP and PTQ top-1 at every preset (seed 0: 1,000 calibration
images, the whole Fashion-MNIST test set, as ``evolq quantize``); then, at the preset where
PTQ loses most, Evol-Q as published (paper space, 10 passes, 4 evaluations per block visit)
over ``--seeds`` seeds, each a resumable ``evolq quantize`` run in
``--out/<model>-<preset>-seed<seed>/`` (seeds change the calibration and selection images, so
each gain is against its own PTQ start); and the seconds one evaluation of a block objective
takes against a plain full forward of the same quantized model on the same 1,000 images
(``model_loss``: every layer from the image, the same loss), both the best of ``--repeats``
at fresh points near the calibrated scales, averaged over the blocks. Prints a Markdown table;
results go to ``--json`` (written atomically).
"""

from __future__ import annotations

import argparse
import time
import timeit
from dataclasses import replace
from pathlib import Path
import numpy as np
import torch

from evolq.families import family_of
from evolq.files import write_json
from evolq.objective import BlockObjective, fp_logits, model_loss
from evolq.pipeline import Prepared, RunConfig, prepare
from evolq.zoo import model_card
from search_spaces import run_cell  # benchmarks/ is on the path when this script runs

PRESETS = "w8a8,w4a8,w3a8,w4a4"


def seconds_per_evaluation(prepared: Prepared, repeats: int, seed: int = 0) -> dict:
    """Seconds of one block-objective evaluation (mean over blocks) and of one plain full forward."""
    qmodel, images = prepared.qmodel, prepared.calib_images
    targets = fp_logits(qmodel, images)
    full_forward = min(timeit.repeat(lambda: model_loss(qmodel, images, targets), number=1, repeat=repeats))
    rng = np.random.default_rng(seed)
    per_block = []
    for block in qmodel.blocks:
        f = BlockObjective(qmodel, block.index, images, targets=targets)
        points = iter(f.x0 * (1 + 1e-3 * rng.standard_normal((repeats, f.dim))))  # fresh points: f remembers losses
        per_block.append(min(timeit.repeat(lambda: f(next(points)), number=1, repeat=repeats)))
        block.set_scales(f.x0)
    objective = float(np.mean(per_block))
    return dict(objective_s=objective, full_forward_s=full_forward, speedup=full_forward / objective,
                objective_s_per_block=per_block)


def measure_model(name: str, presets: list[str], seeds: int, repeats: int, threads: int | None, out: Path) -> dict:
    """The family table's row of one embedded model."""
    row = dict(model=name, parameters=model_card(name)["parameters"], ptq_top1={})  # refuses a non-embedded name
    for preset in presets:
        prepared = prepare(RunConfig(model=name, preset=preset, optimizer="none", threads=threads), progress=False)
        if "fp_top1" not in row:
            with prepared.qmodel.fp():
                row.update(fp_top1=prepared.top1(progress=False), family=family_of(prepared.qmodel.model).name)
        row["ptq_top1"][preset] = prepared.top1(progress=False)
        print(f"  {name} {preset}: PTQ {row['ptq_top1'][preset]:.2f} (FP {row['fp_top1']:.2f})", flush=True)
        if row["ptq_top1"][preset] == min(row["ptq_top1"].values()):
            worst = prepared
    row.update(seconds_per_evaluation(worst, repeats), searched_preset=None)
    if seeds:
        base = RunConfig(model=name, preset=worst.config.preset, threads=threads, select_by="top1")
        runs = [run_cell(out / f"{name}-{base.preset}-seed{seed}", replace(base, seed=seed), None)
                for seed in range(seeds)]
        row.update(searched_preset=base.preset, ptq_top1_per_seed=[r["ptq_top1"] for r in runs],
                   searched_top1_per_seed=[r["final_top1"] for r in runs], evaluations=runs[0]["evaluations"],
                   search_wall_s=[r["wall_s"] for r in runs])
    return row


def search_cells(row: dict) -> list[str]:
    """The searched preset, PTQ and searched top-1 (mean ± std over seeds) and the gains; blanks without a search."""
    if row["searched_preset"] is None:
        return ["", "", "", ""]
    ptq, final = np.array(row["ptq_top1_per_seed"]), np.array(row["searched_top1_per_seed"])
    gains = final - ptq
    return [row["searched_preset"], f"{ptq.mean():.2f} ± {ptq.std(ddof=1):.2f}",
            f"{final.mean():.2f} ± {final.std(ddof=1):.2f}",
            f"{gains.mean():+.2f} ± {gains.std(ddof=1):.2f} ({', '.join(f'{g:+.2f}' for g in gains)})"]


def format_row(row: dict, presets: list[str]) -> str:
    return " | ".join([
        f"| {row['model']} ({row['family']}, {row['parameters'] / 1e3:.0f}k)", f"{row['fp_top1']:.2f}",
        *(f"{row['ptq_top1'][preset]:.2f}" for preset in presets), *search_cells(row),
        f"{row['objective_s']:.3f} / {row['full_forward_s']:.3f} ({row['speedup']:.1f}x) |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default-cnn,default-swin,default-levit")
    parser.add_argument("--presets", default=PRESETS)
    parser.add_argument("--seeds", type=int, default=3, help="searches at the worst preset (0: PTQ and timing only)")
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluations per block and full forwards")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/families")
    parser.add_argument("--json", default="benchmarks/results/families.json")
    args = parser.parse_args()
    if args.seeds == 1 or args.seeds < 0:
        raise SystemExit(f"--seeds {args.seeds} is not allowed; allowed: 0 (no search) or 2 or more (a spread)")
    presets = args.presets.split(",")
    started = time.time()
    rows = [measure_model(name, presets, args.seeds, args.repeats, args.threads, Path(args.out))
            for name in args.models.split(",")]
    write_json(args.json, dict(rows=rows, threads=args.threads or torch.get_num_threads(),
                               wall_s=round(time.time() - started, 1)))
    print(f"| model | FP | {' | '.join(f'PTQ {p}' for p in presets)} | searched at | PTQ ({args.seeds} seeds) "
          f"| Evol-Q | gain (per seed) | s per evaluation: objective / full forward |")
    print("|---|---|" + "---|" * len(presets) + "---|---|---|---|---|")
    for row in rows:
        print(format_row(row, presets))


if __name__ == "__main__":
    main()

"""Evol-Q in each search space, and other optimizers in ``all``, at equal budget: docs/benchmarks.md (issue 17).

    python benchmarks/search_spaces.py --presets w4a4,w3a4 --variants paper,weights,all,cmaes-all,oneplusone-all

Every cell (preset, variant, seed) is one ``evolq quantize`` run on ``--model`` (default: the
default model; 10 passes, 4 evaluations per block visit: 240 evaluations there) in ``--out/<preset>-<variant>-seed<seed>/``; a
finished cell is read back, an interrupted one resumed. Every cell picks its pass by selection
top-1 unless its variant says ``by-loss`` (the measured table predates the loss default of the
``weights`` and ``all`` spaces). Seeds change the calibration and
selection images too, so each gain is against its own PTQ start. Prints a Markdown table: PTQ
and searched top-1 (mean ± std over seeds), the gain of every seed, wall seconds per cell.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from evolq.files import read_json
from evolq.pipeline import RunConfig, run_quantize

# name -> (RunConfig settings, mutation size in ratios or None for the default)
VARIANTS: dict[str, tuple[dict, float | None]] = {
    "paper": ({}, None),
    "weights": ({"search_space": "weights"}, None),
    "all": ({"search_space": "all"}, None),
    "all-scales": ({"search_space": "all", "coordinates": "scales"}, None),
    "all-scales-by-loss": ({"search_space": "all", "coordinates": "scales", "select_by": "loss"}, None),
    "all-eps0.01": ({"search_space": "all"}, 0.01),
    "all-eps0.05": ({"search_space": "all"}, 0.05),
    "cmaes-all": ({"search_space": "all", "optimizer": "cmaes"}, None),
    "oneplusone-all": ({"search_space": "all", "optimizer": "ng:OnePlusOne"}, None),
    "oneplusone-all-by-loss": ({"search_space": "all", "optimizer": "ng:OnePlusOne", "select_by": "loss"}, None),
    "all-by-loss": ({"search_space": "all", "select_by": "loss"}, None),
    "all-selection-5000": ({"search_space": "all", "selection_size": 5000}, None),
    "all-kl": ({"search_space": "all", "loss": "kl"}, None),
    "paper-by-loss": ({"select_by": "loss"}, None),
    "paper-selection-5000": ({"selection_size": 5000}, None),
}


def run_cell(folder: Path, config: RunConfig, ratio_eps: float | None) -> dict:
    """The cell's result.json, running (or resuming) it first if it is not complete."""
    result_file = folder / "result.json"
    if result_file.is_file() and read_json(result_file).get("complete"):
        return read_json(result_file)
    module = importlib.import_module("evolq.search")  # the module: evolq.search is also the function's name
    default_eps = module.RATIO_EPS
    module.RATIO_EPS = ratio_eps or default_eps  # the only setting RunConfig does not carry
    try:
        return run_quantize(config, out=folder, resume=(folder / "checkpoint.safetensors").is_file(), progress=False)
    finally:
        module.RATIO_EPS = default_eps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="w4a4,w3a4")
    parser.add_argument("--variants", default="paper,weights,all,cmaes-all,oneplusone-all",
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--model", default="default", help="the model of every cell (an embedded or timm name)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/spaces")
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"variant {unknown[0]!r} is unknown; allowed: {', '.join(VARIANTS)}")
    print("| preset | variant | PTQ top-1 | searched top-1 | gain | gain per seed | wall s per cell |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for preset in args.presets.split(","):
        for variant in args.variants.split(","):
            settings, ratio_eps = VARIANTS[variant]
            base = replace(RunConfig(model=args.model, preset=preset, threads=args.threads, select_by="top1"),
                           **settings)
            results = [run_cell(Path(args.out) / f"{preset}-{variant}-seed{seed}", replace(base, seed=seed), ratio_eps)
                       for seed in range(args.seeds)]
            ptq = np.array([r["ptq_top1"] for r in results])
            final = np.array([r["final_top1"] for r in results])
            gains = final - ptq
            print(f"| {preset} | {variant} | {ptq.mean():.2f} ± {ptq.std(ddof=1):.2f} | {final.mean():.2f} ± "
                  f"{final.std(ddof=1):.2f} | {gains.mean():+.2f} ± {gains.std(ddof=1):.2f} | "
                  f"{', '.join(f'{g:+.2f}' for g in gains)} | {np.mean([r['wall_s'] for r in results]):.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()

"""``evolq compare``: the optimizer comparison on quantized models (or synthetic problems).

Each cell (preset, optimizer, seed) runs the whole block-wise search of :func:`evolq.search`
through :func:`optimizers.compare`, which handles resuming, atomic saving and executors.
Writes ``results.csv`` (one row per evaluation plus a final row per cell), ``summary.csv``
and ``compare.png``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

import optimizers
from evolq.pipeline import Prepared, RunConfig, prepare
from evolq.search import search

_PREPARED: dict[str, tuple[Prepared, dict, dict]] = {}


def _prepared(config: RunConfig) -> tuple[Prepared, dict, dict]:
    """Calibrated model, its PTQ quantization state and PTQ numbers; made once per worker process."""
    key = repr(config)
    if key not in _PREPARED:
        prepared = prepare(config, progress=False)
        with prepared.qmodel.fp():
            fp_top1 = prepared.top1(progress=False)
        baseline = dict(fp_top1=fp_top1, ptq_top1=prepared.top1(progress=False))
        state = {k: v.clone() for k, v in prepared.qmodel.quant_state().items()}
        _PREPARED[key] = (prepared, state, baseline)
    return _PREPARED[key]


class QuantizedSearch:
    """A comparison problem: Evol-Q's block-wise search of one model at one preset."""

    def __init__(self, config: RunConfig) -> None:
        config.check()  # a bad setting fails here, not in every cell
        self.config = config

    def budget(self) -> int:
        """Evaluations of one search: passes x blocks x evaluations per block."""
        from evolq.models import create_model

        blocks = len(create_model(self.config.model, self.config.checkpoint, self.config.pretrained).blocks)
        return self.config.passes * blocks * self.config.evaluations_per_block

    def run(self, optimizer: str, seed: int, budget: int, **options) -> optimizers.Result:
        config = replace(self.config, seed=seed)
        prepared, ptq_state, baseline = _prepared(replace(config, optimizer="none"))
        qmodel = prepared.qmodel.load_quant_state(ptq_state)
        found = search(
            qmodel, prepared.calib_images, prepared.selection, optimizer=optimizer, passes=config.passes,
            evaluations_per_block=config.evaluations_per_block, order=config.order, loss=config.loss, seed=seed,
            optimizer_options=options, progress=False, space=config.search_space, coordinates=config.coordinates,
            select_by=config.select_by, candidates_per_step=config.candidates(),
        )
        final_top1 = prepared.top1(progress=False)
        history = found.history.rename(columns={"pass": "pass_index"})
        return optimizers.Result(
            x=np.concatenate([block.scales() for block in qmodel.blocks_in(config.search_space)]),
            value=found.calib_loss,
            evaluations=found.evaluations,
            history=history[["evaluation", "value", "best", "seconds"]].assign(
                best=history["value"].cummin()),
            info=dict(baseline, final_top1=final_top1, gain=final_top1 - baseline["ptq_top1"],
                      selection_loss=found.selection_loss, best_pass=found.best_pass),
        )


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per problem and optimizer: seeds, and mean and std over seeds of the final numbers."""
    finals = table[table["final"].astype(bool)].rename(
        columns={"value": "final_loss", "evaluation": "evaluations", "seconds": "wall_s"})
    metrics = [c for c in ("final_top1", "gain", "final_loss", "evaluations", "wall_s") if c in finals.columns]
    groups = finals.groupby(["problem", "optimizer"], sort=False)
    summary = groups[metrics].agg(["mean", "std"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary.insert(0, "seeds", groups.size())
    return summary.reset_index()


def plot_comparison(table: pd.DataFrame) -> Figure:
    """Best-so-far loss against evaluations (mean and band over seeds) per problem; top-1 gain bars."""
    rows = table[~table["final"].astype(bool)]
    problems = list(dict.fromkeys(rows["problem"]))
    names = list(dict.fromkeys(rows["optimizer"]))
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one colour per optimizer in every panel
    has_gain = "gain" in table.columns and table["gain"].notna().any()
    columns = len(problems) + int(has_gain)
    figure = Figure(figsize=(4.5 * columns, 3.8), layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    for ax, problem in zip(axes, problems):
        for optimizer, group in rows[rows["problem"] == problem].groupby("optimizer", sort=False):
            curves = group.pivot_table(index="evaluation", columns="seed", values="best").ffill()
            mean, spread = curves.mean(axis=1), curves.std(axis=1).fillna(0)
            ax.plot(mean.index, mean, label=optimizer, color=colour[optimizer])
            ax.fill_between(mean.index, mean - spread, mean + spread, alpha=0.2, color=colour[optimizer])
        ax.set(title=problem, xlabel="objective evaluations", ylabel="best loss so far")
        ax.legend(fontsize="small")
    if has_gain:
        finals = table[table["final"].astype(bool)]
        def by_optimizer(statistic: str) -> pd.DataFrame:
            pivot = finals.pivot_table(index="optimizer", columns="problem", values="gain", aggfunc=statistic)
            return pivot.reindex(index=names, columns=problems)

        gains, errors = by_optimizer("mean"), by_optimizer("std").fillna(0)
        gains.plot.bar(ax=axes[-1], yerr=errors, rot=30)
        axes[-1].axhline(0, color="black", linewidth=0.8)
        axes[-1].set(title="top-1 gain over PTQ (mean, std over seeds)", ylabel="points", xlabel="")
    return figure


def run_compare(problems: dict, optimizer_names: list[str], seeds: int, budget: int | None, out: str | Path,
                executor: str = "local", workers: int = 1, address: str | None = None,
                progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The grid, saved to ``out`` (resumable), with its summary and figure."""
    from evolq.files import writable_folder, write_text
    from landscapes import save_figure

    out = writable_folder(out)  # before hours of cells, not after the first one
    if budget is None:
        budget = max(problem.budget() for problem in problems.values())
    table = optimizers.compare(problems, optimizer_names, seeds, budget, executor=executor, out=out / "results.csv",
                               workers=workers, address=address, progress=progress)
    summary = summarize(table)
    write_text(out / "summary.csv", summary.to_csv(index=False))
    save_figure(plot_comparison(table), out / "compare.png")
    return table, summary

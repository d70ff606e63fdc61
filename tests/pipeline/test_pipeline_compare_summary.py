"""`evolq.compare.summarize` and `plot_comparison` on a hand-made results table."""

import pandas as pd
import pytest

from evolq.compare import plot_comparison, summarize


def _table() -> pd.DataFrame:
    """Two problems; the optimizers appear in a different order in each, as cells finish."""
    rows = []
    for problem, order in (("w3a4", ["evolq", "random"]), ("w3a8", ["random", "evolq"])):
        for optimizer in order:
            for seed in (0, 1):
                start = 10.0 + seed
                for evaluation in range(3):
                    rows.append(dict(problem=problem, optimizer=optimizer, seed=seed, evaluation=evaluation,
                                     value=start - evaluation, best=start - evaluation, seconds=1.0, final=False))
                gain = {"evolq": 0.5, "random": -0.1}[optimizer] + seed
                rows.append(dict(problem=problem, optimizer=optimizer, seed=seed, evaluation=3, value=start - 2,
                                 best=start - 2, seconds=3.0 + seed, final=True, ptq_top1=80.0,
                                 final_top1=80.0 + gain, gain=gain))
    return pd.DataFrame(rows)


def test_summary_is_mean_and_std_over_seeds():
    summary = summarize(_table()).set_index(["problem", "optimizer"])
    assert summary.loc[("w3a4", "evolq"), "seeds"] == 2
    assert summary.loc[("w3a4", "evolq"), "gain_mean"] == pytest.approx(1.0)
    assert summary.loc[("w3a4", "evolq"), "gain_std"] == pytest.approx(0.7071, abs=1e-4)
    assert summary.loc[("w3a8", "random"), "wall_s_mean"] == pytest.approx(3.5)


def test_each_optimizer_keeps_its_colour_in_every_panel():
    figure = plot_comparison(_table())
    panels = figure.axes[:2]
    colours = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in panels]
    assert colours[0] == colours[1] and len(set(colours[0].values())) == 2
    bars = figure.axes[2]
    assert [tick.get_text() for tick in bars.get_xticklabels()] == ["evolq", "random"]
    assert bars.get_legend_handles_labels()[1] == ["w3a4", "w3a8"]

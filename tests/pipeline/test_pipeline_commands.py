"""`evolq landscape` on the default model, tiny grid: the files it promises."""

import json

import pandas as pd
import pytest

from evolq.cli import main

SMALL = ["--calib-size", "100", "--seed", "0"]


def test_landscape_writes_figure_table_and_roughness(tmp_path):
    out = tmp_path / "land"
    assert main(["landscape", "--preset", "w4a8", "--block", "-1", "--dims", "2", "--points", "5",
                 "--reference", "--out", str(out), *SMALL]) == 0
    table = pd.read_csv(out / "landscape.csv")
    assert set(table["surface"]) == {"quantized", "reference"}
    assert (table.groupby("surface").size() == 25).all()
    centre = table[(table["offset1"] == 0) & (table["offset2"] == 0)]
    assert (centre["value"] == 0).all()  # drawn as the change from x0
    summary = json.loads((out / "roughness.json").read_text())
    assert summary["block"] == 5 and summary["radius"] == 1e-3 and summary["points"] == 5
    assert set(summary["quantized"]) == {"local_minima", "tv_over_range", "diff_autocorr", "quadratic_r2"}
    assert (out / "landscape.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_landscape_top1_scores_every_selection_image_and_names_its_axis(tmp_path, monkeypatch):
    import evolq.landscape
    import landscapes

    scored, figures = [], []
    real_top1, real_save = evolq.landscape.top1, landscapes.save_figure

    def counting_top1(model, data, *args, **kwargs):
        scored.append(len(data[0]))
        return real_top1(model, data, *args, **kwargs)

    def keeping_save(figure, path):
        figures.append(figure)
        return real_save(figure, path)

    monkeypatch.setattr(evolq.landscape, "top1", counting_top1)
    monkeypatch.setattr(landscapes, "save_figure", keeping_save)
    assert main(["landscape", "--preset", "w4a8", "--metric", "top1", "--selection-size", "1234", "--dims", "1",
                 "--points", "5", "--out", str(tmp_path / "land"), *SMALL]) == 0
    assert scored and set(scored) == {1234}
    labels = {ax.get_ylabel() for ax in figures[0].axes}
    assert labels == {"change in top-1 (%)"}


def test_compare_on_the_default_model_writes_results_summary_and_figure(tmp_path):
    out = tmp_path / "grid"
    assert main(["compare", "--optimizers", "evolq,random", "--presets", "w4a8", "--seeds", "1", "--passes", "1",
                 "--evaluations-per-block", "2", "--calib-size", "50", "--selection-size", "50", "--search-space",
                 "all", "--eval-size", "200", "--out", str(out)]) == 0
    results = pd.read_csv(out / "results.csv")
    finals = results[results["final"].astype(bool)].set_index("optimizer")
    assert sorted(finals.index) == ["evolq", "random"] and set(finals["problem"]) == {"w4a8"}
    assert (finals["evaluation"] == 1 * 6 * 2).all()  # passes x blocks x evaluations per block
    assert len(results) == 2 * (12 + 1)  # one row per evaluation plus the final row, per cell
    assert finals["gain"].to_numpy() == pytest.approx((finals["final_top1"] - finals["ptq_top1"]).to_numpy())
    assert ((finals["fp_top1"] > 50) & (finals["ptq_top1"] > 50)).all()  # the trained model on 200 test images
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["optimizer"]) == ["evolq", "random"]
    assert {"final_top1_mean", "gain_mean", "evaluations_mean", "wall_s_mean"} <= set(summary.columns)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run finds every cell done and runs nothing
    assert main(["compare", "--optimizers", "evolq,random", "--presets", "w4a8", "--seeds", "1", "--passes", "1",
                 "--evaluations-per-block", "2", "--calib-size", "50", "--selection-size", "50", "--search-space",
                 "all", "--eval-size", "200", "--out", str(out)]) == 0
    assert pd.read_csv(out / "results.csv").equals(results)

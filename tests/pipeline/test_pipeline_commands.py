"""`evolq landscape` on the default model, tiny grid: the files it promises."""

import json

import pandas as pd

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

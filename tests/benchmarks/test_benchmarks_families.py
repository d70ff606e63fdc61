"""benchmarks/families.py: a PTQ-and-timing run on the trained ResNet gives its row of docs/families.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evolq.zoo import model_card

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "families.py"


def test_families_benchmark_measures_an_embedded_model_without_a_search(tmp_path):
    out = tmp_path / "families.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--models", "default-cnn", "--presets", "w8a8,w4a4", "--seeds",
                           "0", "--repeats", "1", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    card = model_card("default-cnn")
    assert (row["model"], row["family"], row["parameters"]) == ("default-cnn", "resnet", card["parameters"])
    # The card's top-1 is the unfolded model's on the same 10,000 test images; folding BatchNorm moves the
    # logits by float rounding only, which can flip an image at a near tie: a few of 10,000 at most.
    assert row["fp_top1"] == pytest.approx(card["test_top1"], abs=0.05)
    assert abs(row["ptq_top1"]["w8a8"] - row["fp_top1"]) < 1.0 and row["searched_preset"] is None
    assert len(row["objective_s_per_block"]) == 4 and row["full_forward_s"] > 0
    assert "| default-cnn (resnet, 1243k) |" in done.stdout


def test_families_benchmark_refuses_a_single_seed():
    done = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "1"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0 and "--seeds 1 is not allowed; allowed: 0 (no search) or 2 or more" in done.stderr

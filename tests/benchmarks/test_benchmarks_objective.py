"""benchmarks/objective.py: its quick run, and every fast path of BlockObjective against its plain reference.

The reference (``reference_loss`` in the benchmark) is a full forward pass of the quantized model
from the images with every weight fake-quantized again at each forward, as the released Evol-Q
code evaluates. The fp32 fast paths must give its numbers; bf16 is opt-in and within a
documented relative tolerance.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from evolq_testing import random_vit

from evolq.allocator import reuse_freed_memory
from evolq.errors import UsageError
from evolq.objective import BlockObjective, fp_logits
from evolq.qmodel import QuantizedModel
from evolq.zoo import DEFAULT_ARCH

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "objective.py"
N_IMAGES, BATCH = 60, 20
LAST_LINE = re.compile(r"^speedup=\d+\.\d+ allowed=\d+\.\d+ peak_fraction=\d+\.\d+$")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmarks_objective", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()


@pytest.fixture(scope="module")
def setup():
    """The default architecture, random 1/sqrt(fan_in) weights (logits that differ per image), w4a8."""
    model = random_vit(0)
    images = torch.randn(N_IMAGES, 1, 28, 28)
    qmodel = QuantizedModel(model, "w4a8").calibrate(images[:20], batch_size=20, progress=False)
    return qmodel, images, fp_logits(qmodel, images, BATCH)


def near(x0: np.ndarray, seed: int, spread: float = 0.05) -> np.ndarray:
    return x0 * (1 + spread * np.random.default_rng(seed).uniform(-1, 1, x0.size))


def reference(qmodel, block, x, images, targets, loss):
    return bench.reference_loss(qmodel, block, x, images, targets, loss, batch_size=BATCH)


@pytest.mark.parametrize("block", [0, 3, 5])
def test_fast_paths_give_the_reference_loss(setup, block):
    qmodel, images, targets = setup
    f = BlockObjective(qmodel, block, images, batch_size=BATCH, targets=targets)
    fb = BlockObjective(qmodel, block, images, batch_size=BATCH, targets=targets, dtype=torch.bfloat16)
    points = np.stack([near(f.x0, 10 * block + i) for i in range(2)])
    references = np.array([reference(qmodel, block, x, images, targets, f.loss) for x in points])
    singles = np.array([f(x) for x in points])
    np.testing.assert_allclose(singles, references, rtol=bench.LEVELS_TOLERANCE)
    np.testing.assert_array_equal(f.batch(points), singles)  # batch == single calls, bit for bit
    bf16 = np.array([fb(x) for x in points])
    np.testing.assert_allclose(bf16, references, rtol=bench.BF16_TOLERANCE)
    np.testing.assert_array_equal(np.array([f(x) for x in points]), singles)  # fp32 untouched by the bf16 objective
    assert singles[0] != singles[1]  # the points do score differently (by 6e-5 to 2e-4 on the machines and
    # paths tried: dozens of float32 steps of the loss, so not equal by chance)


def test_block_inputs_passed_in_equal_the_computed_prefix(setup):
    qmodel, images, targets = setup
    with torch.no_grad():
        inputs = [qmodel.prefix(b, 0) for b in images.split(BATCH)]
        for module in qmodel.model.blocks[:2]:
            inputs = [module(h) for h in inputs]
    given = BlockObjective(qmodel, 2, images, batch_size=BATCH, targets=targets, inputs=inputs)
    computed = BlockObjective(qmodel, 2, images, batch_size=BATCH, targets=targets)
    x = near(given.x0, 7)
    assert given(x) == computed(x)
    assert given.cache_bytes == computed.cache_bytes
    with pytest.raises(UsageError, match="one tensor per calibration batch"):
        BlockObjective(qmodel, 2, images, batch_size=BATCH, targets=targets, inputs=inputs[:1])


def test_bf16_mode_is_opt_in_and_halves_the_input_cache(setup):
    qmodel, images, targets = setup
    f = BlockObjective(qmodel, 1, images, batch_size=BATCH, targets=targets)
    fb = BlockObjective(qmodel, 1, images, batch_size=BATCH, targets=targets, dtype=torch.bfloat16)
    assert f.dtype == torch.float32 and fb.dtype == torch.bfloat16
    assert all(h.dtype == torch.bfloat16 for h in fb._inputs) and all(h.dtype == torch.float32 for h in f._inputs)
    target_bytes = targets.numel() * 4
    assert fb.cache_bytes - target_bytes == (f.cache_bytes - target_bytes) // 2
    with pytest.raises(UsageError, match="dtype"):
        BlockObjective(qmodel, 1, images, batch_size=BATCH, targets=targets, dtype=torch.float16)


def test_reuse_freed_memory_is_idempotent_and_changes_no_number(setup):
    qmodel, images, targets = setup
    f = BlockObjective(qmodel, 4, images, batch_size=BATCH, targets=targets)
    x = near(f.x0, 3)
    before = f(x)
    applied = reuse_freed_memory()
    assert reuse_freed_memory() == applied
    if applied:
        with bench.glibc_malloc_defaults():
            assert f(x) == before
    assert f(x) == before


def test_matmul_flops_are_counted_from_the_shapes(setup):
    qmodel, images, _ = setup
    embed, per_block, head = bench.flops_per_image(qmodel, images[:1])
    c, classes, patch = DEFAULT_ARCH["embed_dim"], DEFAULT_ARCH["num_classes"], DEFAULT_ARCH["patch_size"]
    patches = (DEFAULT_ARCH["img_size"] // patch) ** 2
    tokens, hidden = patches + 1, int(c * DEFAULT_ARCH["mlp_ratio"])
    block = 2 * tokens * (c * 3 * c + c * c + c * hidden + hidden * c) + 2 * 2 * tokens * tokens * c
    assert embed == 2 * patches * c * patch * patch * DEFAULT_ARCH["in_chans"]
    assert per_block == [block] * DEFAULT_ARCH["depth"]
    assert head == 2 * c * classes


def test_matmul_peak_is_read_around_the_timed_call():
    peak = bench.MatmulPeak(torch.device("cpu"), size=64, window=0.02)
    calls = []
    seconds, value, rate = peak.around(lambda: calls.append(len(calls)) or "value")
    assert value == "value" and calls == [0] and seconds >= 0
    started = time.perf_counter()
    sustained = peak.sustained()
    assert time.perf_counter() - started >= peak.window  # a window, not one product
    assert 0 < rate < float("inf") and 0 < sustained < float("inf")
    assert peak.burst(repeats=2) == peak.bursts[-1] > 0 and len(peak.bursts) == 1


def test_quick_benchmark_runs_and_ends_with_the_summary_line(tmp_path):
    out = tmp_path / "objective.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert LAST_LINE.match(lines[-1]), lines[-1]
    result = json.loads(out.read_text())
    assert result["last_line"] == lines[-1] and result["quick"] is True
    assert [case["case"] for case in result["cases"]] == ["default", "deit"]
    for case in result["cases"]:
        summary = case["summary"]
        assert summary["max_rel_diff"] <= bench.LEVELS_TOLERANCE and summary["equal_within_tolerance"]
        assert summary["speedup"] > 0 and summary["allowed"] > 1 and 0 < summary["peak_fraction"]
        assert summary["cache_bytes"] > 0 and summary["peak_rss_bytes"] > 0
        # the fraction is FLOPs done over what the peak read next to each evaluation would have done meanwhile
        rows = case["blocks"]
        done_over_possible = sum(r["suffix_gflop"] for r in rows) / sum(r["fast_s"] * r["peak_gflops"] for r in rows)
        assert summary["peak_fraction"] == pytest.approx(done_over_possible, rel=1e-9)
        assert summary["burst_peak_fraction"] == pytest.approx(
            summary["mean_suffix_gflop"] * 1e9 * summary["fast_evals_per_s"] / result["matmul_peak_flops"], rel=1e-9)
        assert {lever["lever"] for lever in case["levers"]} >= {
            "prefix cache", "cached quantized weights", "no autograd", "contiguous cache", "batched candidates",
            "grid levels", "chunked blocks"}
        levels = next(lever for lever in case["levers"] if lever["lever"] == "grid levels")
        # another rounding, within the tolerance (it may also round the same: 0 on the AVX2 machine, 4 images)
        assert 0 <= levels["max_rel_diff"] <= bench.LEVELS_TOLERANCE
    deit = result["cases"][1]["summary"]
    assert deit["blocks"] == 12 and deit["cache_bytes_per_1000_images"] < 2 * 2**30
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, nothing left behind

"""Determinism and reproduction: same seed, same machine -> bit-identical scales and result numbers;
``result.json`` records versions, seed and the full config; ``--config`` re-runs it exactly.

The reference is a ``python -m evolq quantize`` subprocess (``conftest.py``); the second runs go
through ``evolq.cli.main`` in this process, so each comparison is also one between two processes.
Both use one thread (``OMP_NUM_THREADS=1`` there, ``torch.set_num_threads(1)`` here), or both EVOLQ_TEST_THREADS.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import stat
import struct
from dataclasses import fields

from reliability_support import assert_same_run, quantize_args, read_tensors, run_main

from evolq.pipeline import RunConfig
from evolq.search import HISTORY_COLUMNS


def test_two_runs_with_the_same_seed_are_bit_identical(reference_run, checkpoint, fmnist, tmp_path):
    outcome = run_main(*quantize_args(checkpoint, fmnist, tmp_path / "again"))
    assert outcome.rc == 0, outcome.stderr[-3000:]
    assert_same_run(tmp_path / "again", reference_run)


def test_config_of_a_result_reproduces_the_run(reference_run, tmp_path):
    outcome = run_main("quantize", "--config", reference_run / "result.json", "--out", tmp_path / "again")
    assert outcome.rc == 0, outcome.stderr[-3000:]
    assert_same_run(tmp_path / "again", reference_run)


def test_result_records_versions_seed_and_full_config(reference_run, checkpoint):
    result = json.loads((reference_run / "result.json").read_text())
    assert result["complete"] is True
    for package in ("evolq", "torch", "timm", "numpy", "nevergrad", "cma"):
        assert result["versions"][package] == importlib.metadata.version(package)
    config = result["config"]
    assert set(config) == {f.name for f in fields(RunConfig)}
    assert config["seed"] == 0 and config["checkpoint"] == checkpoint
    assert result["checkpoint_sha256"] == hashlib.sha256(open(checkpoint, "rb").read()).hexdigest()
    assert (config["passes"], config["evaluations_per_block"], config["calib_size"]) == (2, 2, 20)
    assert result["quant_config"]["wbits"] == 4 and result["quant_config"]["abits"] == 8
    assert result["evaluations"] == 2 * 6 * 2


def _is_safetensors(data: bytes) -> bool:
    """An 8-byte little-endian header length, then that many bytes of JSON: the safetensors layout."""
    (length,) = struct.unpack("<Q", data[:8])
    return 8 + length <= len(data) and isinstance(json.loads(data[8 : 8 + length]), dict)


def test_outputs_are_safetensors_json_and_csv(reference_run):
    assert sorted(os.listdir(reference_run)) == ["checkpoint.safetensors", "history.csv", "result.json",
                                                  "scales.safetensors"]
    for name in ("checkpoint.safetensors", "scales.safetensors"):
        assert _is_safetensors((reference_run / name).read_bytes())
        assert read_tensors(reference_run / name)
    assert (reference_run / "history.csv").read_text().splitlines()[0].split(",") == HISTORY_COLUMNS
    json.loads((reference_run / "result.json").read_text())


def test_output_files_all_get_the_same_ordinary_permissions(reference_run):
    # safetensors writes its own 0600 temporary file; the permissions are set just before the rename.
    umask = os.umask(0)
    os.umask(umask)  # the subprocess inherited this process's umask
    modes = {name: oct(stat.S_IMODE(os.stat(reference_run / name).st_mode)) for name in os.listdir(reference_run)}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes

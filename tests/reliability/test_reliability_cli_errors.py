"""Bad input through the CLI: one line naming the value and what is allowed, exit 2 for usage
errors and 1 for runtime failures, no traceback unless ``--debug``.

Most cases call ``evolq.cli.main`` in this process (the same code as ``python -m evolq`` without
the interpreter start); one test checks the real entry point in a subprocess. Checks that come
only after calibration use the least data that calibrates (``TINY``).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_support import SIZES, TINY, run_cli, run_main, write_fmnist_subset

from evolq.errors import UsageError
from evolq.zoo import default_architecture

SMALL_SEARCH = ["--passes", "1", "--evaluations-per-block", "2"]


@pytest.fixture
def quantize(checkpoint, fmnist):
    """``quantize(out, *options, sizes=SIZES)``: ``evolq quantize`` of the random-weight default model."""

    def run(out, *extra, sizes=SIZES):
        return run_main("quantize", "--model", "default", "--checkpoint", checkpoint, "--data-dir", fmnist,
                        "--preset", "w4a8", *sizes, *SMALL_SEARCH, "--out", out, *extra)

    return run


# -- names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, rc, needles", [
    (["--model", "convnext_tiny"], 2, ["'convnext_tiny'", "allowed", "vit_", "deit_"]),
    (["--model", "vit_tiny_patch16_2244"], 2, ["'vit_tiny_patch16_2244'", "did you mean vit_tiny_patch16_224"]),
    (["--preset", "w4b8"], 2, ["'w4b8'", "allowed", "w4a8"]),
    (["--preset", "w9a8"], 2, ["9", "2..8"]),
    (["--wbits", "9"], 2, ["wbits 9", "2..8"]),
    (["--abits", "1"], 2, ["abits 1", "2..8"]),
    (["--wbits", "0", "--optimizer", "none"], 2, ["wbits 0", "2..8"]),
    (["--eval-size", "0", "--optimizer", "none"], 2, ["eval", "0"]),
    (["--device", "tpu"], 2, ["'tpu'", "cpu"]),
    (["--passes", "abc"], 2, ["--passes", "'abc'"]),
    (["--calib-size", "0"], 2, ["calib size 0", "positive"]),
    (["--selection-size", "-1"], 2, ["selection size -1", "positive"]),
    (["--calib-size", "1200"], 2, ["1200", "1100 training images", "allowed"]),
    (["--search-space", "activations"], 2, ["search space 'activations'", "paper, weights, all"]),
    (["--coordinates", "log"], 2, ["coordinates 'log'", "scales, ratios"]),
    (["--select-by", "top5"], 2, ["selection by 'top5'", "top1, loss"]),
    (["--executor", "spark"], 2, ["executor 'spark'", "local, ray"]),
    (["--actors", "2"], 2, ["actors 2", "executor 'ray'"]),
    (["--executor", "ray", "--actors", "0"], 2, ["actors 0", ">= 1"]),
    (["--executor", "ray", "--gpus-per-actor", "-1"], 2, ["GPUs per actor -1", ">= 0"]),
    (["--candidates-per-step", "0"], 2, ["candidates per step 0", ">= 1"]),
])
def test_quantize_rejects_bad_values_before_any_work(quantize, tmp_path, extra, rc, needles):
    quantize(tmp_path / "out", *extra).check_error(rc, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, needles", [
    (["--optimizer", "foo"], ["'foo'", "evolq, cmaes, random, gradient, ng:"]),
    (["--loss", "foo"], ["'foo'", "infonce, mse, kl, cosine"]),
    (["--passes", "0"], ["passes 0", ">= 1"]),
    (["--passes", "-2"], ["passes -2", ">= 1"]),
    (["--evaluations-per-block", "0"], ["evaluations per block 0", ">= 1"]),
])
def test_quantize_rejects_bad_search_settings(quantize, tmp_path, extra, needles):
    quantize(tmp_path / "out", *extra, sizes=TINY).check_error(2, *needles)


# -- data ------------------------------------------------------------------------------------
def _image_folder(root: Path, classes: int, per_class: int = 2, corrupt: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                if corrupt and split == "train":
                    (folder / f"{i}.png").write_bytes(b"this is not a png")
                else:
                    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_missing_data_folder(quantize, tmp_path):
    missing = tmp_path / "nowhere"
    quantize(tmp_path / "out", "--data", missing).check_error(2, str(missing), "does not exist", "train")


def test_empty_data_folder(quantize, tmp_path):
    (tmp_path / "empty").mkdir()
    quantize(tmp_path / "out", "--data", tmp_path / "empty").check_error(2, "empty", "train/")


def test_data_folder_without_class_folders(quantize, tmp_path):
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    quantize(tmp_path / "out", "--data", tmp_path / "data").check_error(2, "train", "no readable images")


def test_image_folder_with_more_classes_than_the_head(quantize, tmp_path):
    data = _image_folder(tmp_path / "data", classes=11)
    quantize(tmp_path / "out", "--data", data, "--calib-size", "2", "--selection-size", "2").check_error(
        2, "11 classes", "head has 10", "allowed")


def test_image_folder_with_unreadable_images(quantize, tmp_path):
    data = _image_folder(tmp_path / "data", classes=2, corrupt=True)
    outcome = quantize(tmp_path / "out", "--data", data, "--calib-size", "2", "--selection-size", "2",
                       "--optimizer", "none")
    assert outcome.rc in (1, 2)
    outcome.check_error(outcome.rc, str(data / "train"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 folder anyway")
def test_data_folder_without_read_permission(quantize, tmp_path):
    data = _image_folder(tmp_path / "data", classes=2)
    (data / "train").chmod(0)
    try:
        outcome = quantize(tmp_path / "out", "--data", data, "--calib-size", "2", "--selection-size", "2")
    finally:
        (data / "train").chmod(0o755)
    assert outcome.rc in (1, 2)
    outcome.check_error(outcome.rc, "train")


def test_fashion_mnist_folder_without_the_files(quantize, tmp_path):
    empty = tmp_path / "fmnist"
    empty.mkdir()
    quantize(tmp_path / "out", "--data-dir", empty).check_error(
        2, str(empty), "train-images-idx3-ubyte.gz", "--data-dir")


def test_truncated_fashion_mnist_file_is_named(quantize, fmnist, tmp_path):
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for name in os.listdir(fmnist):
        shutil.copy(fmnist / name, folder / name)
    damaged = folder / "train-images-idx3-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:10_000])
    outcome = quantize(tmp_path / "out", "--data-dir", folder)
    assert outcome.rc in (1, 2)
    outcome.check_error(outcome.rc, "train-images-idx3-ubyte.gz")


# -- checkpoints -----------------------------------------------------------------------------
class Payload:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_pickled_object_checkpoint_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"patch_embed.proj.weight": torch.zeros(1), "payload": Payload(marker)}, evil)
    run_main("quantize", "--checkpoint", evil, "--out", tmp_path / "out").check_error(
        1, str(evil), "safetensors", "weights-only")
    assert not marker.exists()


def test_whole_module_pickle_checkpoint_is_refused(tmp_path):
    module = tmp_path / "module.pt"
    torch.save(default_architecture(), module)
    run_main("quantize", "--checkpoint", module, "--out", tmp_path / "out").check_error(1, str(module), "safetensors")


def test_pickled_checkpoint_message_does_not_advise_unsafe_loading(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"payload": Payload(tmp_path / "marker")}, evil)
    line = run_main("quantize", "--checkpoint", evil, "--out", tmp_path / "out").check_error(1, str(evil))
    assert "set to `False`" not in line and "weights_only=False" not in line


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupted_or_truncated_model_checkpoint(checkpoint, tmp_path, damage):
    data = Path(checkpoint).read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    run_main("quantize", "--checkpoint", bad, "--out", tmp_path / "out").check_error(1, str(bad), "truncated")


def test_missing_model_checkpoint(tmp_path):
    missing = tmp_path / "nothing.safetensors"
    run_main("quantize", "--checkpoint", missing, "--out", tmp_path / "out").check_error(1, str(missing), "does not exist")


def test_checkpoint_of_another_architecture(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, other)
    run_main("quantize", "--checkpoint", other, "--out", tmp_path / "out").check_error(2, str(other), "allowed")


# -- run folders -----------------------------------------------------------------------------
def test_output_folder_under_a_regular_file(quantize, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "run"
    quantize(out, "--optimizer", "none", sizes=TINY).check_error(1, "cannot write", str(out))


@pytest.mark.parametrize("command", [
    ["compare", "--optimizers", "evolq", "--presets", "w4a8", "--seeds", "1", "--passes", "1"],
    ["landscape", "--block", "0"],
])
def test_landscape_and_compare_check_the_output_folder_before_any_work(checkpoint, fmnist, tmp_path, command):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "run"
    started = time.perf_counter()
    run_main(*command, "--checkpoint", checkpoint, "--data-dir", fmnist, "--calib-size", "20",
             "--selection-size", "20", "--out", out).check_error(1, "cannot write", str(out))
    assert time.perf_counter() - started < 60  # refused up front, not after a calibrated model's first cell


def test_resume_of_a_folder_from_another_configuration(quantize, reference_run, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(reference_run / "checkpoint.safetensors", folder)
    before = (folder / "checkpoint.safetensors").read_bytes()
    quantize(folder, "--resume", sizes=TINY).check_error(
        2, "--resume", str(folder), "written with calib_size=20", "this run has calib_size=2;", "allowed")
    assert (folder / "checkpoint.safetensors").read_bytes() == before
    assert sorted(os.listdir(folder)) == ["checkpoint.safetensors"]


def test_resume_with_a_truncated_search_checkpoint(quantize, reference_run, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    data = (reference_run / "checkpoint.safetensors").read_bytes()
    (folder / "checkpoint.safetensors").write_bytes(data[: len(data) - 1000])
    quantize(folder, "--resume", sizes=TINY).check_error(
        1, "checkpoint.safetensors", "corrupted or truncated", "delete it")


def test_config_that_is_not_a_result_file(tmp_path):
    (tmp_path / "broken.json").write_text('{"config": {"seed": ')
    run_main("quantize", "--config", tmp_path / "broken.json").check_error(1, "broken.json", "not valid JSON")
    (tmp_path / "other.json").write_text('{"seed": 3}')
    run_main("quantize", "--config", tmp_path / "other.json").check_error(2, "other.json", "no 'config'", "allowed")
    run_main("quantize", "--config", tmp_path / "missing.json").check_error(1, "missing.json", "does not exist")


# -- landscape and compare -------------------------------------------------------------------
@pytest.mark.parametrize("block", ["6", "-7"])
def test_landscape_block_index_out_of_range(checkpoint, fmnist, tmp_path, block):
    run_main("landscape", "--model", "default", "--checkpoint", checkpoint, "--data-dir", fmnist, "--calib-size", "2",
             "--block", block, "--out", tmp_path / "out").check_error(2, f"block index {block}", "0..5")


def test_landscape_on_a_small_training_set(checkpoint, tmp_path):
    small = write_fmnist_subset(tmp_path / "fmnist", sizes={"train": 300, "t10k": 10})
    outcome = run_main("landscape", "--model", "default", "--checkpoint", checkpoint, "--data-dir", small,
                       "--calib-size", "2", "--block", "9", "--out", tmp_path / "out")
    outcome.check_error(2, "block index 9")  # reaching the block check means the data was accepted


@pytest.mark.parametrize("extra, needles", [
    (["--optimizers", "random,foo"], ["'foo'", "evolq, cmaes, random"]),
    (["--problem", "foo"], ["'foo'", "sphere, rastrigin, jagged"]),
    (["--budget", "-3"], ["budget", "-3"]),
    (["--budget", "0"], ["budget", "0"]),
    (["--seeds", "0"], ["seeds", "positive"]),
    (["--dim", "0"], ["dim", "0"]),
])
def test_compare_rejects_bad_values(tmp_path, extra, needles):
    args = {"--optimizers": "random", "--problem": "sphere", "--seeds": "1", "--budget": "5", "--dim": "4"}
    args.update(dict(zip(extra[::2], extra[1::2])))
    outcome = run_main("compare", *[item for pair in args.items() for item in pair], "--out", tmp_path / "out")
    outcome.check_error(2, *needles)


# -- tracebacks ------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_lets_the_exception_through(tmp_path, where):
    from evolq.cli import main

    command = ["quantize", "--model", "convnext_tiny", "--out", str(tmp_path / "out")]
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(UsageError, match="'convnext_tiny'"):
            main(["--debug", *command] if where == "before" else [*command, "--debug"])
    finally:
        signal.signal(signal.SIGTERM, handler)


@pytest.mark.parametrize("error", [ValueError("a bug's message"), KeyError("a bug's key")])
def test_an_internal_error_is_not_a_usage_error(monkeypatch, tmp_path, error):
    import evolq.pipeline

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(evolq.pipeline, "run_quantize", broken)
    line = run_main("quantize", "--out", tmp_path / "out").check_error(1, "evolq: internal error:",
                                                                       type(error).__name__, "a bug's")
    assert line.endswith("please report it (run with --debug for the traceback)")


def test_real_entry_point_exit_codes_and_no_traceback(tmp_path):
    outcome = run_cli("quantize", "--model", "convnext_tiny", "--out", tmp_path / "out", log_dir=tmp_path, name="bad")
    outcome.check_error(2, "'convnext_tiny'", "allowed")
    assert outcome.stdout == ""

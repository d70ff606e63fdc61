"""The CLI's options say what the code does: help texts name the real defaults, ``--config``
takes the options typed with it, ``--version`` works, and ``train-default`` writes to its run
folder, never into the installed package."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from dataclasses import asdict, fields

import pytest
from reliability_support import TINY, run_main

import evolq
from evolq.cli import build_parser
from evolq.pipeline import RunConfig
from evolq.zoo import DEFAULT_CARD, DEFAULT_CHECKPOINT

CONFIG_FIELDS = {f.name: f.default for f in fields(RunConfig)}


def _commands() -> dict[str, argparse.ArgumentParser]:
    subcommands = next(a for a in build_parser()._actions if isinstance(a.choices, dict))
    return dict(subcommands.choices)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.default not in (None, False, argparse.SUPPRESS)]


@pytest.mark.parametrize("command", ["quantize", "landscape", "compare", "train-default"])
def test_every_default_is_named_in_the_help(command):
    for action in _options(_commands()[command]):
        default = re.escape(str(action.default))
        assert re.search(rf"\(default {default}\b|{default}'? \(default", action.help), (action.dest, action.help)


@pytest.mark.parametrize("command", ["quantize", "landscape", "compare"])
def test_defaults_of_the_cli_are_those_of_run_config(command):
    for action in _options(_commands()[command]):
        if action.dest in CONFIG_FIELDS:
            assert action.default == CONFIG_FIELDS[action.dest], action.dest


def test_version():
    outcome = run_main("--version")
    assert outcome.rc == 0 and outcome.stdout.strip() == f"evolq {evolq.__version__}"


def test_config_takes_the_options_typed_with_it(checkpoint, fmnist, tmp_path):
    recorded = RunConfig(checkpoint=checkpoint, data_dir=str(fmnist), preset="w4a8", calib_size=20,
                         selection_size=20, eval_size=50, passes=2, evaluations_per_block=2, seed=3)
    (tmp_path / "result.json").write_text(json.dumps({"config": asdict(recorded)}))
    outcome = run_main("quantize", "--config", tmp_path / "result.json", "--optimizer", "none", "--calib-size", "10",
                       "--seed=0", "--out", tmp_path / "again")
    assert outcome.rc == 0, outcome.stderr[-3000:]
    config = json.loads((tmp_path / "again" / "result.json").read_text())["config"]
    typed = dict(optimizer="none", calib_size=10, seed=0)
    assert config == dict(asdict(recorded), **typed)  # the CLI's own defaults (preset w3a4, ...) do not count


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_default_writes_to_its_run_folder_and_the_checkpoint_loads(fmnist, tmp_path):
    embedded = {path: _sha256(path) for path in (DEFAULT_CHECKPOINT, DEFAULT_CARD)}
    out = tmp_path / "train"
    outcome = run_main("train-default", "--epochs", "1", "--data-dir", fmnist, "--out", out)
    assert outcome.rc == 0, outcome.stderr[-3000:]
    assert {path: _sha256(path) for path in embedded} == embedded
    assert sorted(p.name for p in out.iterdir()) == ["fmnist_vit.json", "fmnist_vit.safetensors", "state.pt"]
    card = json.loads((out / "fmnist_vit.json").read_text())
    assert card["sha256"] == _sha256(out / "fmnist_vit.safetensors") and "1,100 images" in card["data"]
    assert f"--checkpoint {out / 'fmnist_vit.safetensors'}" in outcome.stdout
    quantized = run_main("quantize", "--checkpoint", out / "fmnist_vit.safetensors", "--data-dir", fmnist,
                         "--optimizer", "none", *TINY, "--out", tmp_path / "run")
    assert quantized.rc == 0, quantized.stderr[-3000:]

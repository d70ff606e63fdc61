"""Interruptions: Ctrl-C / SIGTERM write a consistent checkpoint and a partial result; kill -9 leaves
only complete files; ``--resume`` then finishes bit-identical to an uninterrupted run.

The runs are session fixtures (``conftest.py``): ``python -m evolq quantize`` runs stopped by
SIGINT, SIGTERM and SIGKILL mid-search, started together with the uninterrupted reference run
of the same configuration and seed; then ``--resume`` of the SIGINT and SIGKILL folders.
"""

from __future__ import annotations

import csv
import json
import math

from reliability_support import VISITS, assert_same_run, file_problems, read_checkpoint

from evolq.pipeline import RunConfig


def _check_partial(run, rc: int, word: str) -> None:
    assert run.outcome.rc == rc, run.outcome.stderr[-2000:]
    assert "Traceback" not in run.outcome.stderr
    lines = run.outcome.error_lines
    assert len(lines) == 1 and word in lines[0] and "--resume" in lines[0], lines
    assert 1 <= run.visits_done < VISITS, "the signal did not land mid-search"
    assert run.problems == []
    assert run.result is not None, "no result.json was written"
    assert run.result["complete"] is False
    assert run.result["config"]["seed"] == 0 and set(run.result["config"]) == set(RunConfig.__dataclass_fields__)
    assert "versions" in run.result


def test_sigint_mid_search_exits_130_with_checkpoint_and_incomplete_result(interrupted_runs):
    _check_partial(interrupted_runs["sigint"], 130, "interrupted")


def test_sigterm_mid_search_exits_143_with_checkpoint_and_incomplete_result(interrupted_runs):
    _check_partial(interrupted_runs["sigterm"], 143, "terminated")


def test_sigkill_mid_search_leaves_only_complete_files(interrupted_runs):
    run = interrupted_runs["sigkill"]
    assert run.outcome.rc == -9
    assert run.problems == [], run.problems  # no *.tmp / .tmp* file, and every file parses
    assert 2 <= run.visits_done < VISITS
    assert not (run.folder / "result.json").exists() or run.result is not None


def _check_resumed(name, interrupted_runs, resumed_runs, reference_run) -> None:
    outcome, _ = resumed_runs[name]
    assert outcome.rc == 0, outcome.stderr[-3000:]
    folder = interrupted_runs[name].folder
    assert json.loads((folder / "result.json").read_text())["complete"] is True
    assert_same_run(folder, reference_run)
    # It went on from the checkpoint rather than starting over: the history rows of the visits
    # done before the signal keep the times they were recorded with.
    before = interrupted_runs[name].seconds
    with open(folder / "history.csv", newline="") as handle:
        after = [float(row["seconds"]) for row in csv.DictReader(handle)]
    assert len(before) == interrupted_runs[name].visits_done * 2
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(after, before))


def test_resume_after_sigint_is_bit_identical_to_an_uninterrupted_run(interrupted_runs, resumed_runs, reference_run):
    _check_resumed("sigint", interrupted_runs, resumed_runs, reference_run)


def test_resume_after_sigkill_is_bit_identical_to_an_uninterrupted_run(interrupted_runs, resumed_runs, reference_run):
    _check_resumed("sigkill", interrupted_runs, resumed_runs, reference_run)


def test_resumed_folders_hold_only_complete_files(interrupted_runs, resumed_runs):
    folder = interrupted_runs["sigint"].folder
    assert file_problems(folder) == []
    meta, _ = read_checkpoint(folder / "checkpoint.safetensors")
    assert meta["visits_done"] == VISITS


def test_resume_removes_temporary_files_a_kill_left_behind(resumed_runs):
    outcome, leftovers = resumed_runs["sigkill"]
    assert outcome.rc == 0
    assert leftovers == []


def test_interruption_message_starts_its_own_line(interrupted_runs):
    for name, message in (("sigint", "evolq: interrupted"), ("sigterm", "evolq: terminated")):
        assert interrupted_runs[name].outcome.own_line(message), interrupted_runs[name].outcome.stderr[-600:]

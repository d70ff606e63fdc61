"""Fixtures of the reliability suite: a random-weight checkpoint, shared CLI runs, a small model.

The trained default checkpoint need not exist: every run here uses a random-weight checkpoint
of the default architecture (``--model default --checkpoint PATH``) and small sizes.

Most of a subprocess run's cost here is the interpreter start and imports, so the four
``python -m evolq`` runs (one uninterrupted reference, three stopped by SIGINT, SIGTERM and
SIGKILL) are started together once per session and shared by the tests that inspect them;
runs that need no signal (resume, the second run of the determinism test, ``--config``) go
through ``evolq.cli.main`` in this process, which is the same code without the start-up.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from reliability_support import (  # noqa: E402 - after the sys.path entry above
    Outcome,
    Proc,
    file_problems,
    quantize_args,
    run_main,
    read_checkpoint,
    signal_mid_search,
    temporary_files,
    write_fmnist_subset,
)


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory) -> Path:
    """A small Fashion-MNIST folder (1,100 train, 100 test images) in the original file format."""
    return write_fmnist_subset(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    """A safetensors checkpoint of the default architecture with random (seeded) weights."""
    from evolq.files import save_tensors
    from evolq.zoo import default_architecture

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint") / "random_vit.safetensors"
    save_tensors(path, default_architecture().state_dict())
    return str(path.resolve())


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@dataclass
class Interrupted:
    """A run stopped by a signal: its outcome, checkpoint progress and files as the signal left them."""

    folder: Path
    outcome: Outcome
    visits_done: int
    seconds: list[float]
    problems: list[str]
    result: dict | None


@dataclass
class SessionRuns:
    """The subprocess runs: one uninterrupted reference run, and three stopped by a signal."""

    reference: Path
    reference_outcome: Outcome
    interrupted: dict[str, Interrupted]


# The interrupted runs: the signal and the checkpoint version it is sent right after. SIGINT and
# SIGTERM follow the first checkpoint; SIGKILL the second, so its resumed run starts later on.
PLAN = {"sigint": (signal.SIGINT, 1), "sigterm": (signal.SIGTERM, 1), "sigkill": (signal.SIGKILL, 2)}


@pytest.fixture(scope="session")
def session_runs(checkpoint, fmnist, runs_dir) -> SessionRuns:
    """Four ``python -m evolq quantize`` runs of one configuration and seed, started together.

    One runs to the end; the others are stopped mid-search by SIGINT, SIGTERM and SIGKILL.
    (Started together because most of a run's cost here is the interpreter start and imports.)
    """
    folders = {name: runs_dir / name for name in ["reference", *PLAN]}
    procs = {name: Proc(quantize_args(checkpoint, fmnist, folder), runs_dir / "logs", name)
             for name, folder in folders.items()}
    try:
        signal_mid_search({name: procs[name] for name in PLAN}, folders, PLAN)
        outcomes = {name: proc.wait() for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    interrupted = {}
    for name in PLAN:
        folder = folders[name]
        problems = file_problems(folder)  # as the signal left the folder, before any resume
        meta = read_checkpoint(folder / "checkpoint.safetensors")[0] if not problems else {"visits_done": -1, "history": []}
        result_file = folder / "result.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() and not problems else None
        interrupted[name] = Interrupted(folder, outcomes[name], meta["visits_done"],
                                        [row["seconds"] for row in meta["history"]], problems, result)
    return SessionRuns(folders["reference"], outcomes["reference"], interrupted)


@pytest.fixture(scope="session")
def reference_run(session_runs) -> Path:
    """The folder of the uninterrupted subprocess run (seed 0)."""
    assert session_runs.reference_outcome.rc == 0, session_runs.reference_outcome.stderr[-3000:]
    return session_runs.reference


@pytest.fixture(scope="session")
def interrupted_runs(session_runs) -> dict[str, Interrupted]:
    return session_runs.interrupted


STALE = (".checkpoint.safetensors.k9x2ab.tmp", ".tmpQ3zXw1")


@pytest.fixture(scope="session")
def resumed_runs(interrupted_runs, checkpoint, fmnist) -> dict[str, tuple[Outcome, list[str]]]:
    """``evolq quantize --resume`` of the SIGINT and SIGKILL runs (in this process: no restart cost).

    First the SIGKILL folder is given what a kill in the middle of a write would leave there
    (a half-written temporary file of evolq's and one of safetensors'). Returns each outcome
    and the temporary files present after the resumed run.
    """
    for name in STALE:
        (interrupted_runs["sigkill"].folder / name).write_bytes(b"\x00" * 100)
    found = {}
    for name in ("sigint", "sigkill"):
        folder = interrupted_runs[name].folder
        found[name] = (run_main(*quantize_args(checkpoint, fmnist, folder, "--resume")), temporary_files(folder))
    return found


# -- a small model for the Python API and the property tests ---------------------------------
@dataclass
class Small:
    qmodel: object
    calib: torch.Tensor
    selection: tuple[torch.Tensor, torch.Tensor]
    ptq_state: dict


@pytest.fixture(scope="session")
def small_session(fmnist) -> Small:
    from evolq import QuantizedModel
    from evolq.data import load_fmnist
    from evolq.zoo import default_architecture

    torch.manual_seed(0)
    images, labels = load_fmnist("train", fmnist)
    calib = images[:20].clone()
    qmodel = QuantizedModel(default_architecture().eval(), "w4a8").calibrate(calib, progress=False)
    state = {k: v.clone() for k, v in qmodel.quant_state().items()}
    return Small(qmodel, calib, (images[20:40].clone(), labels[20:40].clone()), state)


@pytest.fixture
def small(small_session) -> Small:
    """Default architecture, random weights, w4a8, calibrated on 20 images; PTQ scales restored."""
    small_session.qmodel.load_quant_state(small_session.ptq_state)
    return small_session

"""Helpers of the reliability suite: CLI runners (in-process and subprocess) and run-folder readers.

Imported by ``conftest.py`` and the test modules (``conftest.py`` puts this folder on
``sys.path``, so this works in any pytest import mode).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open

# Small sizes for the CLI runs that search (one calibration batch). Calibration (OMSE) is most
# of a run's cost after the imports, and it grows with the batch: 20 images keep it small.
SIZES = ["--calib-size", "20", "--selection-size", "20", "--eval-size", "50"]
# The search of the subprocess runs: 2 passes x 6 blocks = 12 visits of 2 evaluations.
EVALUATIONS_PER_BLOCK = 2
SEARCH = ["--passes", "2", "--evaluations-per-block", str(EVALUATIONS_PER_BLOCK)]
VISITS = 2 * 6
# In-process runs that only have to reach a check made after calibration: the least data.
TINY = ["--calib-size", "2", "--selection-size", "2", "--eval-size", "2"]

# The subprocess runs use the in-process runs' thread count (tests/conftest.py: one, or EVOLQ_TEST_THREADS):
# bit-identical results are promised for the same machine and the same threads.
THREADS = os.environ.get("EVOLQ_TEST_THREADS", "1")
ENV = {**os.environ, "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS, "PYTHONWARNINGS": "ignore"}
RUN_TIMEOUT = 900  # seconds a subprocess run may take on a very busy machine


# -- data ------------------------------------------------------------------------------------
FMNIST = Path("/usr/share/datasets/fashion-mnist")
# Images per split of the small copy; 1,100 train images leave room for `evolq landscape`'s
# fixed selection split of 1,000.
SUBSET = {"train": 1100, "t10k": 100}


def write_fmnist_subset(folder: Path, source: Path = FMNIST, sizes: dict[str, int] = SUBSET) -> Path:
    """The first images of each Fashion-MNIST split, in the original ``*-ubyte.gz`` format.

    Every run reads its data through evolq's own reader from ``--data-dir``; a small copy
    spares each run decompressing 70,000 images (about a CPU second each time).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in sizes.items():
        for kind, header_ints, item_bytes in (("images", 4, 28 * 28), ("labels", 2, 1)):
            name = f"{split}-{kind}-idx{header_ints - 1}-ubyte.gz"
            with gzip.open(source / name, "rb") as handle:
                header = bytearray(handle.read(4 * header_ints))
                body = handle.read(count * item_bytes)
            header[4:8] = count.to_bytes(4, "big")
            (folder / name).write_bytes(gzip.compress(bytes(header) + body, compresslevel=1))
    return folder


# -- outcomes --------------------------------------------------------------------------------
@dataclass
class Outcome:
    """Exit status and output of one CLI run."""

    rc: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """evolq's own messages on stderr, each from ``evolq`` to the end of its line.

        A message may follow a progress bar on the same line (see ``own_line``), so it is
        looked for anywhere in a line; progress bars alone are left out.
        """
        found = []
        for line in self.stderr.replace("\r", "\n").splitlines():
            start = line.find("evolq: ") if not line.startswith("evolq") else 0
            if start >= 0:
                found.append(line[start:])
        return found

    def own_line(self, message: str) -> bool:
        """Whether an evolq message starting with ``message`` starts a line of its own."""
        return any(line.startswith(message) for line in self.stderr.replace("\r", "\n").splitlines())

    def check_error(self, rc: int, *needles: str) -> str:
        """Exit ``rc``, exactly one evolq message holding every needle, no traceback; returns it."""
        assert self.rc == rc, f"exit {self.rc}, expected {rc}; stderr tail:\n{self.stderr[-2000:]}"
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        lines = self.error_lines
        assert len(lines) == 1, f"expected one error line, got {lines!r}"
        for needle in needles:
            assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
        return lines[0]


def run_main(*args) -> Outcome:
    """``evolq.cli.main(args)`` in this process (no interpreter start); SystemExit becomes the exit code."""
    from evolq.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = signal.getsignal(signal.SIGTERM)  # main() installs its own
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as stop:
                rc = stop.code if isinstance(stop.code, int) else 1
    finally:
        signal.signal(signal.SIGTERM, handler)
    return Outcome(rc, out.getvalue(), err.getvalue())


# -- subprocesses ----------------------------------------------------------------------------
def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _sigint_reset():
    """A shell that starts background jobs may leave SIGINT ignored, an ignored signal stays
    ignored across exec, and Python then keeps ignoring it; these runs must see Ctrl-C as a
    terminal's foreground job does. (Only then, as code between fork and exec is best avoided.)"""
    return _default_sigint if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else None


class Proc:
    """One ``python -m evolq`` subprocess; its output goes to files, so no pipe can fill up."""

    def __init__(self, args: list, log_dir: Path, name: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_file, self.err_file = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
        with open(self.out_file, "w") as out, open(self.err_file, "w") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "evolq", *map(str, args)], stdout=out, stderr=err, env=ENV,
                preexec_fn=_sigint_reset(), cwd=log_dir,
            )

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float = RUN_TIMEOUT) -> Outcome:
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return Outcome(rc, self.out_file.read_text(), self.err_file.read_text())

    def kill(self) -> None:
        if self.running():
            self.popen.kill()
            self.popen.wait()


def run_cli(*args, log_dir: Path, name: str, timeout: float = RUN_TIMEOUT) -> Outcome:
    proc = Proc(list(args), log_dir, name)
    try:
        return proc.wait(timeout)
    finally:
        proc.kill()


def quantize_args(checkpoint: str, data_dir: Path, out: Path, *extra) -> list[str]:
    return ["quantize", "--model", "default", "--checkpoint", checkpoint, "--data-dir", str(data_dir),
            "--preset", "w4a8", *SIZES, *SEARCH, "--seed", "0", "--out", str(out), *map(str, extra)]


class CheckpointWatch:
    """Sees each replacement of ``folder/checkpoint.safetensors`` (``os.replace``: a new inode)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "checkpoint.safetensors"
        self.inode: int | None = None
        self.seen = 0

    def poll(self) -> int:
        """The number of checkpoint versions seen so far."""
        try:
            inode = self.path.stat().st_ino
        except FileNotFoundError:
            return self.seen
        if inode != self.inode:
            self.inode, self.seen = inode, self.seen + 1
        return self.seen


def _stopped(pid: int, timeout: float = 30.0) -> None:
    """Wait until process ``pid`` is stopped (state T) after a SIGSTOP."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


def signal_mid_search(procs: dict[str, Proc], folders: dict[str, Path], plan: dict[str, tuple[int, int]],
                      timeout: float = RUN_TIMEOUT) -> None:
    """Send ``plan[name] = (signal, versions)`` to each run once it wrote that many checkpoint versions.

    Polled every few milliseconds, so the signal lands right after a checkpoint write. SIGKILL
    goes to a stopped process, and only when no write is under way (no temporary file in its
    folder; otherwise it waits for the next checkpoint): what a kill leaves is then decided
    by the renames alone, not by how fast this loop was scheduled. A run that ends before its
    signal fails the test (it was not interrupted mid-search).
    """
    watches = {name: CheckpointWatch(folders[name]) for name in plan}
    pending = dict(plan)
    deadline = time.monotonic() + timeout
    while pending:
        for name, (sig, versions) in list(pending.items()):
            proc = procs[name]
            if watches[name].poll() >= versions:
                if sig == signal.SIGKILL:
                    proc.popen.send_signal(signal.SIGSTOP)
                    _stopped(proc.popen.pid)
                    if temporary_files(folders[name]):  # stopped inside a write: try after the next one
                        proc.popen.send_signal(signal.SIGCONT)
                        pending[name] = (sig, versions + 1)
                        continue
                proc.popen.send_signal(sig)
                del pending[name]
            elif not proc.running():
                raise AssertionError(f"run {name!r} ended (exit {proc.popen.returncode}) before "
                                     f"checkpoint version {versions}: {proc.err_file.read_text()[-1500:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint in time for {sorted(pending)}")
        time.sleep(0.003)


# -- run folders -----------------------------------------------------------------------------
def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """A search checkpoint's progress (its metadata JSON) and its tensors."""
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["state"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return meta, tensors


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def result_numbers(folder: Path) -> dict:
    """``result.json`` without its wall time: what two equal runs must agree on exactly."""
    result = json.loads((folder / "result.json").read_text())
    result.pop("wall_s")
    return result


def history_without_times(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "history.csv").drop(columns=["seconds"])


def assert_same_run(folder: Path, reference: Path) -> None:
    """Bit-identical scales (file bytes and tensors), equal result numbers and history (times aside)."""
    ours, theirs = read_tensors(folder / "scales.safetensors"), read_tensors(reference / "scales.safetensors")
    assert ours.keys() == theirs.keys()
    different = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    assert not different, f"scales differ in {different[:5]}"
    assert (folder / "scales.safetensors").read_bytes() == (reference / "scales.safetensors").read_bytes()
    assert result_numbers(folder) == result_numbers(reference)
    pd.testing.assert_frame_equal(history_without_times(folder), history_without_times(reference), check_exact=True)


def temporary_files(folder: Path) -> list[str]:
    """Leftovers of an interrupted write: evolq's end in ``.tmp``, safetensors' own start with ``.tmp``."""
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp") or n.startswith(".tmp"))


def file_problems(folder: Path) -> list[str]:
    """What is wrong with a run folder: temporary files left, or files that do not parse completely."""
    problems = [f"temporary file left: {name}" for name in temporary_files(folder)]
    for name in sorted(set(os.listdir(folder)) - set(temporary_files(folder))):
        path = folder / name
        try:
            if name.endswith(".json"):
                json.loads(path.read_text())
            elif name.endswith(".csv"):
                pd.read_csv(path)
            elif name == "checkpoint.safetensors":
                meta, tensors = read_checkpoint(path)
                assert 1 <= meta["visits_done"] <= VISITS, meta["visits_done"]
                assert len(meta["history"]) == meta["visits_done"] * EVALUATIONS_PER_BLOCK
                assert all(torch.isfinite(t).all() for t in tensors.values())
            elif name.endswith(".safetensors"):
                read_tensors(path)
            else:
                problems.append(f"unexpected file: {name}")
        except Exception as error:  # noqa: BLE001 - every unreadable file is reported
            problems.append(f"{name}: {type(error).__name__}: {error}")
    return problems

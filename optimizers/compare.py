"""Run every optimizer on every problem for every seed, and keep the results in one tidy table.

A *cell* is one (problem, optimizer, seed) triple. Cells are independent, so they can run in
worker processes or on Ray (see :mod:`optimizers.executors`), and a grid that stops half way
can resume: with ``out=`` each finished cell is saved at once and skipped on the next run.

Table schema (one row per evaluation, plus one final row per cell; also the CSV's columns):

============  ==========================================================================
problem       the problem's label (key of ``problems``)
optimizer     the optimizer's label (the name, or the key of an ``optimizers`` dict)
seed          the seed of the cell (int)
evaluation    the evaluation's number in the result's history (0 is x0's score); on
              the final row the result's ``evaluations`` (the count)
value         the objective at that evaluation; on the final row the result's ``value``
best          the lowest value so far; on the final row the result's ``value``
seconds       seconds since the search started, from the result's history; on the final
              row the cell's wall time (building the objective included)
final         False on evaluation rows, True on the one final row of each cell
<extra>       scalar entries of the result's ``info`` (e.g. ``final_top1``), on the final
              row only (empty elsewhere); entries named like a column above (``seed``,
              ``optimizer``) and non-scalar ones (arrays, lists, dicts) are left out
============  ==========================================================================
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from optimizers.base import InputError
from optimizers.executors import Executor, make_executor
from optimizers.files import atomic_path
from optimizers.problems import make_problem
from optimizers.registry import make

KEY = ("problem", "optimizer", "seed")
HISTORY = ("evaluation", "value", "best", "seconds")
COLUMNS = KEY + HISTORY + ("final",)


@dataclass
class Cell:
    """One unit of work: everything a worker needs to run one (problem, optimizer, seed)."""

    problem: str
    optimizer: str
    seed: int
    spec: Any
    method: str
    options: dict
    budget: int

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.problem, self.optimizer, self.seed)


def run_cell(cell: Cell) -> pd.DataFrame:
    """Run one cell and return its rows in the table schema (module level, so it pickles)."""
    start = time.perf_counter()
    if hasattr(cell.spec, "run"):
        result = cell.spec.run(cell.method, cell.seed, cell.budget, **cell.options)
    else:
        objective = cell.spec()
        optimizer = make(cell.method, **cell.options)
        result = optimizer.minimize(objective, getattr(objective, "x0", None), cell.budget, seed=cell.seed)
    wall = time.perf_counter() - start
    rows = result.history.loc[:, list(HISTORY)].assign(final=False)
    last = {"evaluation": result.evaluations, "value": result.value, "best": result.value, "seconds": wall}
    rows = pd.concat([rows, pd.DataFrame([{**last, "final": True, **_extras(result.info)}])], ignore_index=True)
    for position, (name, value) in enumerate(zip(KEY, cell.key)):
        rows.insert(position, name, value)
    return rows


def _extras(info: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar entries of ``Result.info`` that do not clash with a schema column."""
    scalar = (str, bool, int, float, np.generic)
    return {name: value for name, value in info.items() if name not in COLUMNS and isinstance(value, scalar)}


def _problems(problems: Mapping[str, Any]) -> dict[str, Any]:
    """Check the problem specs; a string names a synthetic problem of :func:`make_problem`."""
    checked = {}
    for label, spec in problems.items():
        if isinstance(spec, str):
            make_problem(spec)  # fails early, listing the allowed names
            spec = partial(make_problem, spec)
        if not (hasattr(spec, "run") or callable(spec)):
            raise InputError(f"problem {label!r} must be a factory returning an objective or have run(); got {spec!r}")
        checked[str(label)] = spec
    if not checked:
        raise InputError("problems is empty; give at least one")
    return checked


def _optimizers(optimizers: Iterable[str] | Mapping[str, Any]) -> dict[str, tuple[str, dict]]:
    """Normalize to label -> (name, options) and build each once, so a bad name fails before any work."""
    if isinstance(optimizers, str):
        optimizers = [optimizers]
    specs = dict(optimizers) if isinstance(optimizers, Mapping) else {name: name for name in optimizers}
    checked = {}
    for label, spec in specs.items():
        name, options = (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1]))
        make(name, **options)
        checked[str(label)] = (name, options)
    if not checked:
        raise InputError("optimizers is empty; give at least one")
    return checked


def _seeds(seeds: int | Iterable[int]) -> list[int]:
    seeds = list(range(seeds)) if isinstance(seeds, (int, np.integer)) else [int(seed) for seed in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"seeds must be a positive count or distinct integers, got {seeds}")
    return seeds


def load(out: str | os.PathLike) -> pd.DataFrame:
    """The finished cells saved in ``out`` (rows of any cell without a final row are dropped)."""
    frame = pd.read_csv(out, dtype={"problem": str, "optimizer": str})
    missing = [column for column in COLUMNS if column not in frame.columns]
    if missing:
        raise InputError(f"{out} is not a comparison table: missing columns {missing}")
    finished = frame.loc[frame["final"].astype(bool), list(KEY)].drop_duplicates()
    return frame.merge(finished, on=list(KEY))


def compare(
    problems: Mapping[str, Any],
    optimizers: Iterable[str] | Mapping[str, str | tuple[str, Mapping[str, Any]]],
    seeds: int | Iterable[int],
    budget: int,
    executor: str | Executor = "local",
    out: str | os.PathLike | None = None,
    workers: int = 1,
    address: str | None = None,
    retries: int = 2,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the grid problems x optimizers x seeds with ``budget`` evaluations per cell.

    ``problems`` maps a label to a problem: a zero-argument callable returning an objective
    with ``x0`` (the cell runs ``make(name, **options).minimize(f, f.x0, budget, seed)``), an
    object with ``run(optimizer, seed, budget, **options) -> Result`` (the whole search of
    one cell, e.g. Evol-Q's block-wise loop), or the name of a synthetic problem. ``optimizers``
    is a list of names or a dict label -> name or (name, options). ``seeds`` is a count
    (0..n-1) or a list. ``executor`` is ``"local"`` or ``"ray"``, configured by ``workers``
    (parallel cells), ``address`` and ``retries`` (Ray's), or an executor object such as
    ``RayExecutor(num_gpus=0.5)`` (see :mod:`optimizers.executors`). A cell delivered twice
    is kept once.

    With ``out`` (a CSV path), cells already finished there are skipped, and each cell that
    finishes is saved at once by rewriting the file atomically: an interruption loses only
    the cells in flight. Returns the table (module docstring): the saved rows, then the new.
    """
    if not isinstance(budget, (int, np.integer)) or budget < 1:
        raise InputError(f"budget must be a positive integer, got {budget!r}")
    problems, optimizers, seeds = _problems(problems), _optimizers(optimizers), _seeds(seeds)
    if isinstance(executor, str):
        executor = make_executor(executor, workers=workers, address=address, retries=retries)
    out = None if out is None else Path(out)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    table = load(out) if out is not None and out.exists() else pd.DataFrame(columns=list(COLUMNS))
    done = set(table.loc[table["final"].astype(bool), list(KEY)].itertuples(index=False, name=None))
    cells = [
        Cell(problem, label, seed, spec, name, options, int(budget))
        for problem, spec in problems.items()
        for label, (name, options) in optimizers.items()
        for seed in seeds
        if (problem, label, seed) not in done
    ]
    _say(progress, f"compare: {len(cells)} cells to run, {len(done)} already in {out}")
    parts = [table] if len(table) else []
    count = 0
    for cell, rows in executor.map_unordered(run_cell, cells):
        if cell.key in done:  # a task delivered twice (e.g. retried after a lost worker)
            continue
        done.add(cell.key)
        count += 1
        parts.append(rows)
        if out is not None:
            with atomic_path(out) as temporary:
                pd.concat(parts, ignore_index=True).to_csv(temporary, index=False)
        final = rows.iloc[-1]
        _say(progress, f"compare: [{count}/{len(cells)}] {cell.problem} / {cell.optimizer} / seed {cell.seed}: "
                       f"best {final['value']:.6g} after {final['evaluation']} evaluations, {final['seconds']:.1f} s")
    return pd.concat(parts, ignore_index=True) if parts else table


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)

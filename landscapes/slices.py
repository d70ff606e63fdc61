"""1-D and 2-D slices of an objective around a point, returned as DataFrames.

A slice shows how the objective changes when the point moves along one or two directions:
``f(x0 + t * d)`` for ``t`` on an even grid in ``[-radius, radius]``. With an odd number of
points the grid holds ``t = 0`` exactly, so the start's own value is on it. The frames' format
is described in :mod:`landscapes.frames`; ``df.attrs`` records ``x0``, the direction(s) and
``radius`` (as tuples, so frames still concatenate), and ``steps``: what an offset means.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from .directions import as_point, describe_steps
from .directions import direction as make_direction
from .evaluate import evaluate_grid

Objective = Callable[[np.ndarray], float]


def slice_1d(
    f: Objective,
    x0: np.ndarray,
    direction: np.ndarray | None = None,
    radius: float = 0.1,
    points: int = 41,
    seed: int | None = 0,
    normalize: str = "elementwise",
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Evaluate ``f(x0 + t * d)`` on ``points`` offsets ``t`` in ``[-radius, radius]``.

    ``direction`` is a vector (e.g. from :func:`landscapes.direction`), used as given, or None for
    a random direction drawn with ``seed`` and ``normalize``. Returns columns ``offset``, ``value``.
    """
    point = as_point(x0)
    d = _resolve(point, direction, seed, normalize)
    offsets = grid_offsets(radius, points)
    values = evaluate_grid(f, point, d[None, :], offsets[:, None], batch_size, progress, "slice 1-D")
    df = pd.DataFrame({"offset": offsets, "value": values})
    df.attrs.update(x0=tuple(point.tolist()), direction=tuple(d.tolist()), radius=float(radius),
                    steps=_steps(point, normalize, direction is None))
    return df


def slice_2d(
    f: Objective,
    x0: np.ndarray,
    d1: np.ndarray | None = None,
    d2: np.ndarray | None = None,
    radius: float = 0.1,
    points: int = 21,
    seed: int | None = 0,
    normalize: str = "elementwise",
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Evaluate ``f(x0 + s * d1 + t * d2)`` on a ``points`` x ``points`` grid in ``[-radius, radius]^2``.

    A missing ``d1`` is drawn with ``seed``, a missing ``d2`` with ``seed + 1``, so ``d1`` equals
    the direction of ``slice_1d`` with the same seed. Returns ``points**2`` rows with columns
    ``offset1``, ``offset2``, ``value``, ``offset1`` varying slowest.
    """
    point = as_point(x0)
    first = _resolve(point, d1, seed, normalize)
    second = _resolve(point, d2, None if seed is None else seed + 1, normalize)
    cosine = abs(first @ second) / (np.linalg.norm(first) * np.linalg.norm(second))
    if cosine > 1 - 1e-9:
        raise ValueError("d1 and d2 are parallel; a 2-D slice needs two different directions")
    offsets = grid_offsets(radius, points)
    grid1, grid2 = (g.ravel() for g in np.meshgrid(offsets, offsets, indexing="ij"))
    coefficients = np.stack([grid1, grid2], axis=1)
    values = evaluate_grid(f, point, np.stack([first, second]), coefficients, batch_size, progress, "slice 2-D")
    df = pd.DataFrame({"offset1": grid1, "offset2": grid2, "value": values})
    df.attrs.update(
        x0=tuple(point.tolist()),
        direction1=tuple(first.tolist()),
        direction2=tuple(second.tolist()),
        radius=float(radius),
        steps=_steps(point, normalize, d1 is None or d2 is None),
    )
    return df


def grid_offsets(radius: float, points: int) -> np.ndarray:
    """Return ``points`` evenly spaced offsets from ``-radius`` to ``radius``, symmetric, 0 exact when odd."""
    if isinstance(radius, bool) or not isinstance(radius, (int, float, np.number)) or not 0 < radius < np.inf:
        raise ValueError(f"radius {radius!r} is not allowed; use a positive finite number")
    if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 2:
        raise ValueError(f"points {points!r} is not allowed; use an integer of at least 2")
    ramp = np.linspace(-float(radius), float(radius), int(points))
    return 0.5 * (ramp - ramp[::-1])


def _steps(point: np.ndarray, normalize: str, drawn: bool) -> str:
    """What an offset means: the rule of the drawn direction(s), or that the directions were given."""
    return describe_steps(point, normalize) if drawn else "given directions, used as they are"


def _resolve(point: np.ndarray, given: np.ndarray | None, seed: int | None, normalize: str) -> np.ndarray:
    """Return the given direction checked against ``point``, or a random one when none is given."""
    return make_direction(point, "random" if given is None else given, seed=seed, normalize=normalize)

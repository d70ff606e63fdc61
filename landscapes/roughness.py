"""Roughness of a slice: numbers that tell a smooth bowl from a jagged loss surface.

All four measures work on 1-D and 2-D slice frames (2-D: computed over every row and every
column of the grid, pooled). For each, the *jagged* direction is stated; a smooth bowl and the
same bowl with a high-frequency ripple land far apart on every one.

``local_minima``
    Grid points strictly lower than all their neighbours (1-D: 2 neighbours; 2-D: all 8,
    diagonals included, so a point on a sloping ridge is not counted). Edge points are not
    counted, so a monotone slice has 0 and a bowl 1. Jagged: many.
``tv_over_range``
    Total variation (sum of absolute steps along a line) divided by the line's value range;
    2-D: both summed over all rows and columns before dividing. It is never below 1 for a line
    that changes at all: 1 for a monotone line, between 1 and 2 for a line with one minimum (2
    when the ends are equally high); every extra wiggle adds about twice its height over the
    range. Jagged: large. A constant slice gives 0.
``diff_autocorr``
    Lag-1 autocorrelation of the first differences (the cosine between consecutive steps, not
    mean-centred, so a straight line gives exactly +1). Smooth: near +1, since each step points
    like the one before; white noise: about -0.5; a zig-zag: near -1. Jagged: low or negative.
``quadratic_r2``
    R^2 of a least-squares quadratic in the offsets (2-D: all six terms up to s*t, s^2, t^2).
    A bowl or saddle fits exactly: 1. Jagged: well below 1, as the ripple is what a quadratic
    cannot explain. A constant slice gives 1.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from .frames import frame_dims, grid_arrays, line_arrays

MIN_POINTS = 5


def roughness(df: pd.DataFrame) -> dict[str, float]:
    """Return ``local_minima``, ``tv_over_range``, ``diff_autocorr`` and ``quadratic_r2`` of a slice frame."""
    if frame_dims(df) == 1:
        offsets, values = line_arrays(df)
        axes = [offsets]
    else:
        *axes, values = grid_arrays(df)
    if min(values.shape) < MIN_POINTS:
        raise ValueError(f"slice has shape {values.shape}; roughness needs at least {MIN_POINTS} points per axis")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"slice has {np.sum(~np.isfinite(values))} non-finite value(s); roughness needs finite values")
    lines = [np.moveaxis(values, axis, -1).reshape(-1, values.shape[axis]) for axis in range(values.ndim)]
    return {
        "local_minima": _local_minima(values),
        "tv_over_range": _tv_over_range(lines),
        "diff_autocorr": _diff_autocorr(lines),
        "quadratic_r2": _quadratic_r2(axes, values),
    }


def _local_minima(values: np.ndarray) -> int:
    """Count interior grid points strictly lower than every neighbour (diagonals included)."""
    inner = tuple(slice(1, -1) for _ in range(values.ndim))
    centre = values[inner]
    lowest = np.ones(centre.shape, dtype=bool)
    for shift in itertools.product((-1, 0, 1), repeat=values.ndim):
        if any(shift):
            neighbour = tuple(slice(1 + s, values.shape[k] - 1 + s) for k, s in enumerate(shift))
            lowest &= centre < values[neighbour]
    return int(lowest.sum())


def _tv_over_range(lines: list[np.ndarray]) -> float:
    """Total variation summed over all lines, divided by their value ranges summed; 0 if all are flat."""
    variation = sum(np.abs(np.diff(group, axis=1)).sum() for group in lines)
    spread = sum(np.ptp(group, axis=1).sum() for group in lines)
    return float(variation / spread) if spread > 0 else 0.0


def _diff_autocorr(lines: list[np.ndarray]) -> float:
    """Cosine between each step and the next, pooled over all lines; +1 when no step is taken."""
    steps = [np.diff(group, axis=1) for group in lines]
    products = sum((d[:, :-1] * d[:, 1:]).sum() for d in steps)
    before = sum((d[:, :-1] ** 2).sum() for d in steps)
    after = sum((d[:, 1:] ** 2).sum() for d in steps)
    if before == 0 or after == 0:
        return 1.0
    return float(products / np.sqrt(before * after))


def _quadratic_r2(axes: list[np.ndarray], values: np.ndarray) -> float:
    """R^2 of the least-squares quadratic in the offsets (offsets scaled to [-1, 1] for conditioning)."""
    grids = np.meshgrid(*[a / np.max(np.abs(a)) for a in axes], indexing="ij")
    coords = [g.ravel() for g in grids]
    features = [np.ones_like(coords[0]), *coords]
    features += [coords[i] * coords[j] for i in range(len(coords)) for j in range(i, len(coords))]
    design = np.stack(features, axis=1)
    target = values.ravel()
    fit, *_ = np.linalg.lstsq(design, target, rcond=None)
    total = np.sum((target - target.mean()) ** 2)
    if total == 0:
        return 1.0
    return float(1 - np.sum((target - design @ fit) ** 2) / total)

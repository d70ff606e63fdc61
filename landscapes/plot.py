"""One figure of an objective's landscape around a point, optionally beside a reference.

``plot_landscape`` either slices an objective itself (a 2-D slice and a finer 1-D slice along
the 2-D slice's first direction) or draws slice frames it is given. A reference (for example
a smooth objective) is drawn in a second row on the same colour scale and y-range, so a
jagged landscape and a smooth one can be told apart in one picture. Figures are built with
``matplotlib.figure.Figure`` (no pyplot state), so this works under any backend, headless too.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from . import panels
from .frames import frame_dims, grid_arrays
from .slices import slice_1d, slice_2d

Frames = Union[pd.DataFrame, Sequence[pd.DataFrame]]
Objective = Callable[[np.ndarray], float]

CAPTION = (
    "star: start x0 (offset 0).  Smooth: 0-1 minima, TV/range 1-2, autocorr near +1, R² near 1.\n"
    "Jagged: many minima, TV/range well above 2, autocorr near or below 0, R² well below 1."
)


def plot_landscape(
    f: Objective | None = None,
    x0: np.ndarray | None = None,
    *,
    data: Frames | None = None,
    reference: Frames | Objective | None = None,
    radius: float = 0.1,
    points: int = 21,
    points_1d: int = 101,
    seed: int | None = 0,
    normalize: str = "elementwise",
    surface3d: bool = False,
    title: str | None = None,
    label: str = "objective",
    reference_label: str = "reference",
    value_label: str = "value",
    progress: bool = True,
) -> Figure:
    """Plot slices of ``f`` around ``x0``, or the slice frames in ``data``; return the Figure.

    With ``f`` and ``x0``: a ``points`` x ``points`` 2-D slice and a ``points_1d`` 1-D slice
    along its first direction (0 skips either). ``data``: a slice frame or a list of them (at
    most one 2-D). ``reference``: frames, or an objective sliced along the same directions as
    the main slices (read from their ``attrs``). Panels: heatmap with colour bar, a 3-D surface
    if ``surface3d``, one line panel per 1-D slice; roughness numbers in each panel title.
    ``value_label`` names the values (colour bar, y axes). The caption says what an offset
    means (the frames' ``attrs["steps"]``): from a start point with zeros, an ``"elementwise"``
    direction moves those elements by absolute steps.
    """
    if (f is None) == (data is None) or (f is None) != (x0 is None):
        raise ValueError("pass either f and x0 (to compute slices) or data (slice frames), not both or neither")
    frames = _compute(f, x0, radius, points, points_1d, seed, normalize, progress) if data is None else _listed(data)
    rows = [(label, *_split(frames, "data"))]
    if callable(reference):
        reference = [_slice_like(reference, frame, progress) for frame in frames]
    if reference is not None:
        rows.append((reference_label, *_split(_listed(reference), "reference")))
    return _draw(rows, surface3d, title or "Landscape around x0", value_label)


def _compute(
    f: Objective,
    x0: np.ndarray,
    radius: float,
    points: int,
    points_1d: int,
    seed: int | None,
    normalize: str,
    progress: bool,
) -> list[pd.DataFrame]:
    """Slice ``f``: 2-D with ``points`` per axis, 1-D (same first direction) with ``points_1d``; 0 skips one."""
    if points == 0 and points_1d == 0:
        raise ValueError("points and points_1d are both 0; at least one slice is needed")
    options = dict(radius=radius, seed=seed, normalize=normalize, progress=progress)
    frames = [slice_2d(f, x0, points=points, **options)] if points else []
    return frames + ([slice_1d(f, x0, points=points_1d, **options)] if points_1d else [])


def _slice_like(g: Objective, frame: pd.DataFrame, progress: bool) -> pd.DataFrame:
    """Slice ``g`` at the same start, directions and offsets as ``frame`` (read from its attrs)."""
    dims = frame_dims(frame)
    keys = ("x0", "radius", "direction1", "direction2") if dims == 2 else ("x0", "radius", "direction")
    if not all(key in frame.attrs for key in keys):
        raise ValueError(f"an objective as reference needs frames made by slice_1d/slice_2d (attrs {list(keys)})")
    x0, radius, *directions = (frame.attrs[key] for key in keys)
    if dims == 1:
        return slice_1d(g, np.asarray(x0), np.asarray(directions[0]), radius, len(frame), progress=progress)
    d1, d2 = (np.asarray(d) for d in directions)
    return slice_2d(g, np.asarray(x0), d1, d2, radius, len(grid_arrays(frame)[0]), progress=progress)


def _listed(frames: Frames) -> list[pd.DataFrame]:
    """One frame or a sequence of frames, as a list."""
    return [frames] if isinstance(frames, pd.DataFrame) else list(frames)


def _split(frames: list[pd.DataFrame], name: str) -> tuple[pd.DataFrame | None, list[pd.DataFrame]]:
    """Return ``(the 2-D frame or None, the 1-D frames)``; at most one 2-D frame is allowed."""
    if not frames:
        raise ValueError(f"{name} holds no slice frames")
    grids = [df for df in frames if frame_dims(df) == 2]
    if len(grids) > 1:
        raise ValueError(f"{name} holds {len(grids)} 2-D slices; pass at most one")
    return (grids[0] if grids else None), [df for df in frames if frame_dims(df) == 1]


def _draw(rows: list[tuple[str, pd.DataFrame | None, list[pd.DataFrame]]], surface3d: bool, title: str,
          value_label: str) -> Figure:
    """Lay out one row of panels per objective, sharing colour scale and y-range; return the Figure."""
    grids = [grid for _, grid, _ in rows if grid is not None]
    lines = [df for _, _, row_lines in rows for df in row_lines]
    grid_columns = (1 + surface3d) if grids else 0
    ncols = grid_columns + max(len(row_lines) for _, _, row_lines in rows)
    fig = Figure(figsize=(4.6 * ncols + 0.8, 4.0 * len(rows) + 0.8), layout="constrained")
    norm = Normalize(*_padded_limits([grid_arrays(df)[2] for df in grids], pad=0.0))
    limits = _padded_limits([df["value"].to_numpy(dtype=float) for df in lines])
    meshes = []
    for r, (label, grid, row_lines) in enumerate(rows):
        if grid is not None:
            ax = fig.add_subplot(len(rows), ncols, r * ncols + 1)
            meshes.append(panels.heatmap(ax, grid, norm, f"{label}: 2-D slice"))
            if surface3d:
                ax = fig.add_subplot(len(rows), ncols, r * ncols + 2, projection="3d")
                panels.surface(ax, grid, norm, f"{label}: surface")
        for k, df in enumerate(row_lines):
            ax = fig.add_subplot(len(rows), ncols, r * ncols + grid_columns + k + 1)
            number = f" {k + 1}" if len(row_lines) > 1 else ""
            panels.line(ax, df, limits, f"{label}: 1-D slice{number}", value_label)
    if meshes:
        fig.colorbar(meshes[0], ax=[mesh.axes for mesh in meshes], label=value_label, shrink=0.9)
    fig.suptitle(title)
    steps = [df.attrs["steps"] for _, grid, row_lines in rows for df in [grid, *row_lines]
             if df is not None and "steps" in df.attrs]
    fig.supxlabel(CAPTION + (f"\noffsets: {steps[0]}" if steps else ""), fontsize=8)
    return fig


def _padded_limits(values: list[np.ndarray], pad: float = 0.05) -> tuple[float, float]:
    """Shared (low, high) range of the finite values, widened by ``pad`` of the span; (0, 1) if none."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    margin = pad * (high - low) if high > low else max(abs(high), 1.0) * 0.05
    return low - margin, high + margin

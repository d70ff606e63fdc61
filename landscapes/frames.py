"""The slice table format that slices write and roughness and plots read.

A 1-D slice is a DataFrame with columns ``offset`` and ``value``. A 2-D slice has columns
``offset1``, ``offset2`` and ``value``, one row per grid point, ``offset1`` varying slowest
(row ``i * n + j`` holds offsets ``(t[i], t[j])``). Frames from elsewhere (a CSV, a filtered
frame) are accepted in any row order as long as the 2-D grid is complete.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LINE_COLUMNS = ("offset", "value")
GRID_COLUMNS = ("offset1", "offset2", "value")


def frame_dims(df: pd.DataFrame) -> int:
    """Return 1 or 2, the dimension of a slice frame, or raise ValueError naming its columns."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"expected a slice DataFrame, got {type(df).__name__}")
    columns = set(df.columns)
    if set(GRID_COLUMNS) <= columns:
        return 2
    if set(LINE_COLUMNS) <= columns:
        return 1
    raise ValueError(
        f"frame has columns {list(df.columns)}; a slice needs {list(LINE_COLUMNS)} or {list(GRID_COLUMNS)}"
    )


def line_arrays(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(offsets, values)`` of a 1-D slice frame, sorted by offset."""
    offsets = df["offset"].to_numpy(dtype=np.float64)
    order = np.argsort(offsets, kind="stable")
    offsets = offsets[order]
    if np.any(np.diff(offsets) == 0):
        raise ValueError("1-D slice frame repeats an offset; each offset must appear once")
    return offsets, df["value"].to_numpy(dtype=np.float64)[order]


def grid_arrays(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(offsets1, offsets2, values)`` of a 2-D slice, ``values[i, j]`` at ``(offsets1[i], offsets2[j])``."""
    column1 = df["offset1"].to_numpy(dtype=np.float64)
    column2 = df["offset2"].to_numpy(dtype=np.float64)
    offsets1, rows = np.unique(column1, return_inverse=True)
    offsets2, cols = np.unique(column2, return_inverse=True)
    cells = rows * offsets2.size + cols
    counts = np.bincount(cells, minlength=offsets1.size * offsets2.size)
    if np.any(counts != 1):
        raise ValueError(
            f"2-D slice frame is not a complete grid: {len(df)} rows for "
            f"{offsets1.size} x {offsets2.size} offset pairs, each needed exactly once"
        )
    values = np.empty(offsets1.size * offsets2.size)
    values[cells] = df["value"].to_numpy(dtype=np.float64)
    return offsets1, offsets2, values.reshape(offsets1.size, offsets2.size)

"""Draw one slice into one matplotlib Axes: a heatmap, a 3-D surface or a line.

Each function takes the value scale from its caller, so panels of different objectives can
share one colour scale (2-D) or one y-range (1-D) and be compared by eye. The start point
(offset 0) is marked with a star in every panel.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.collections import QuadMesh
from matplotlib.colors import Normalize
from matplotlib.ticker import MaxNLocator

from .frames import grid_arrays, line_arrays
from .roughness import roughness

CMAP = "viridis"
START = dict(marker="*", markersize=13, color="white", markeredgecolor="black", linestyle="none")


def heatmap(ax: Axes, df: pd.DataFrame, norm: Normalize, title: str) -> QuadMesh:
    """Draw a 2-D slice as a heatmap, ``offset1`` across and ``offset2`` up; return the mesh for a colour bar."""
    offsets1, offsets2, values = grid_arrays(df)
    mesh = ax.pcolormesh(offsets1, offsets2, values.T, shading="nearest", cmap=CMAP, norm=norm)
    ax.plot([0.0], [0.0], **START)
    ax.set_xlabel("offset along d1")
    ax.set_ylabel("offset along d2")
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.set_title(caption(df, title), fontsize=9)
    return mesh


def surface(ax: Axes, df: pd.DataFrame, norm: Normalize, title: str) -> None:
    """Draw a 2-D slice as a 3-D surface on the shared colour scale and z-range (values read off the colour bar)."""
    offsets1, offsets2, values = grid_arrays(df)
    grid1, grid2 = np.meshgrid(offsets1, offsets2, indexing="ij")
    ax.plot_surface(grid1, grid2, values, cmap=CMAP, norm=norm, linewidth=0, antialiased=False)
    ax.plot([0.0], [0.0], [_start_value(offsets1, offsets2, values)], zorder=10, **START)
    ax.set_zlim(norm.vmin, norm.vmax)
    ax.set_xlabel("d1")
    ax.set_ylabel("d2")
    ax.set_title(title, fontsize=9)


def line(ax: Axes, df: pd.DataFrame, limits: tuple[float, float], title: str, value_label: str = "value") -> None:
    """Draw a 1-D slice as a line with its grid points, on the shared y-range ``limits``; y axis ``value_label``."""
    offsets, values = line_arrays(df)
    ax.plot(offsets, values, color="tab:blue", linewidth=1, marker=".", markersize=3)
    ax.plot([0.0], [np.interp(0.0, offsets, values)], **START)
    ax.axvline(0.0, color="grey", linewidth=0.6, linestyle="--")
    ax.set_ylim(*limits)
    ax.set_xlabel("offset along d")
    ax.set_ylabel(value_label)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.grid(alpha=0.3)
    ax.set_title(caption(df, title), fontsize=9)


def caption(df: pd.DataFrame, title: str) -> str:
    """Return the panel title with the slice's roughness numbers on a second line."""
    try:
        r = roughness(df)
    except ValueError as error:
        return f"{title}\nroughness n/a: {error}"
    return (
        f"{title}\nminima {r['local_minima']}  TV/range {r['tv_over_range']:.2f}  "
        f"autocorr {r['diff_autocorr']:+.2f}  R² {r['quadratic_r2']:.3f}"
    )


def _start_value(offsets1: np.ndarray, offsets2: np.ndarray, values: np.ndarray) -> float:
    """Value at the grid point nearest to offset (0, 0)."""
    return float(values[np.argmin(np.abs(offsets1)), np.argmin(np.abs(offsets2))])

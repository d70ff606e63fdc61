"""Slices of any objective around a point, their roughness, and plots of both.

An objective is any callable ``f(x: np.ndarray) -> float``, optionally with
``f.batch(X) -> np.ndarray`` for several points at once. Nothing here needs torch or evolq.
"""

from .directions import direction
from .plot import plot_landscape
from .roughness import roughness
from .save import save_figure
from .slices import slice_1d, slice_2d

__all__ = ["direction", "slice_1d", "slice_2d", "roughness", "plot_landscape", "save_figure"]

"""Directions to slice an objective along: seeded random, one coordinate axis, or a given vector.

A slice evaluates ``f(x0 + t * d)`` for offsets ``t``; the direction ``d`` decides what an
offset of 1 means. Two normalisations make offsets comparable between objectives:

``"elementwise"`` (default, the per-element analogue of filter normalisation in loss-landscape
plots): ``d_i = s_i * |x0_i|``, where ``s`` has root-mean-square 1. An offset ``t`` then changes
each element by a fraction of about ``t`` of its own size, so ``t = 0.05`` is a ~5 % relative
perturbation whatever the scale of the vector. An element that is 0 in ``x0`` has no size to
be relative to: it takes absolute steps (``d_i = s_i``), so any finite start point, all zeros
included, can be sliced. :func:`describe_steps` says which rule a slice used.

``"absolute"``: ``d_i = s_i``, root-mean-square 1 per element. An offset ``t`` moves each element
by about ``t`` in the vector's own units (compare Evol-Q's absolute mutation size ``eps``).

For ``kind="random"``, ``s`` is a Gaussian vector rescaled to RMS 1; for ``kind="coordinate"``,
``s`` is 1 at ``index`` and 0 elsewhere, so the one moving element changes by ``t`` (absolute)
or by ``t * |x0[index]|`` (elementwise; ``t`` where ``x0[index]`` is 0). A given vector is used unchanged, whatever
``normalize`` says, so offset 1 lands on ``x0 + vector`` (e.g. the step from a start to a
search result).
"""

from __future__ import annotations

import numpy as np

KINDS = ("random", "coordinate")
NORMALIZATIONS = ("elementwise", "absolute")


def as_point(x0: np.ndarray) -> np.ndarray:
    """Return ``x0`` as a flat, finite float64 vector, or raise ValueError naming what is wrong."""
    point = np.asarray(x0, dtype=np.float64)
    if point.ndim != 1 or point.size == 0:
        raise ValueError(f"x0 has shape {point.shape}; it must be a non-empty 1-D vector")
    _require_finite("x0", point)
    return point.copy()


def direction(
    x0: np.ndarray,
    kind: str | np.ndarray = "random",
    seed: int | None = None,
    index: int | None = None,
    normalize: str = "elementwise",
) -> np.ndarray:
    """Return a direction ``d`` (same shape as ``x0``) for slicing around ``x0``.

    ``kind`` is ``"random"`` (Gaussian, reproducible with ``seed``), ``"coordinate"`` (the
    axis ``index``) or a vector used as given. ``normalize`` is ``"elementwise"`` or
    ``"absolute"``; see the module docstring for what a unit offset means in each case.
    """
    point = as_point(x0)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize {normalize!r} is not allowed; use one of {NORMALIZATIONS}")
    if not isinstance(kind, str):
        return _given_vector(kind, point)
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not allowed; use one of {KINDS} or a vector of length {point.size}")
    if kind == "random":
        if index is not None:
            raise ValueError(f"index {index!r} is only for kind='coordinate'")
        unit = np.random.default_rng(seed).standard_normal(point.size)
        unit /= np.sqrt(np.mean(unit**2))
    else:
        unit = np.zeros(point.size)
        unit[_check_index(index, point.size)] = 1.0
    return unit * _step_sizes(point, normalize)


def _step_sizes(point: np.ndarray, normalize: str) -> np.ndarray:
    """Per-element size of a unit step: ``|x0_i|`` (elementwise; 1 where ``x0_i`` is 0) or 1 (absolute)."""
    if normalize == "absolute":
        return np.ones_like(point)
    return np.where(point == 0, 1.0, np.abs(point))


def describe_steps(x0: np.ndarray, normalize: str) -> str:
    """One line saying what an offset ``t`` of a drawn direction does to ``x0`` (recorded with slices)."""
    point = as_point(x0)
    if normalize == "absolute":
        return "absolute steps: offset t moves each element by about t"
    zeros = int(np.sum(point == 0))
    text = "elementwise steps: offset t moves each element by about t times |x0_i|"
    if zeros:
        text += f"; the {zeros} of {point.size} elements that are 0 in x0 take absolute steps (about t)"
    return text


def _given_vector(vector: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Validate a user's direction vector against ``x0``."""
    try:
        d = np.asarray(vector, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"kind {vector!r} is not allowed; use one of {KINDS} or a vector of length {point.size}"
        ) from None
    if d.shape != point.shape:
        raise ValueError(f"direction has shape {d.shape} but x0 has shape {point.shape}; they must match")
    _require_finite("direction", d)
    if not np.any(d):
        raise ValueError("direction is all zeros; a slice along it would be a single point")
    return d.copy()


def _check_index(index: int | None, size: int) -> int:
    """Return ``index`` if it names an element of a vector of ``size`` elements."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise ValueError(f"index {index!r} is not allowed; kind='coordinate' needs an integer in [0, {size})")
    if not 0 <= index < size:
        raise ValueError(f"index {index} is out of range; x0 has {size} elements, so use 0 to {size - 1}")
    return int(index)


def _require_finite(name: str, values: np.ndarray) -> None:
    """Raise ValueError naming the first non-finite element of ``values``."""
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(f"{name} has {bad.size} non-finite value(s), first {values[bad[0]]} at index {bad[0]}")

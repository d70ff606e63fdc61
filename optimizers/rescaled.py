"""``Rescaled``: an objective seen in units of a per-coordinate scale, ``g(u) = f(u * unit)``.

Optimizers take steps of one size for every coordinate (Evol-Q's eps, CMA-ES's sigma,
nevergrad's mutation). Where the coordinates differ in magnitude by orders (weight scales of
1e-3 beside activation scales of 1e-1), a step right for one is noise or nothing for another.
Searching ``u = x / unit`` from ``u = 1`` with ``unit = x0`` makes every step relative to its
coordinate's start: eps = 0.02 moves each coordinate by up to 2 % of its own start.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from optimizers.base import InputError, as_vector


class Rescaled:
    """``f`` over ``u`` with ``x = u * unit``; ``x0`` is ``f.x0 / unit`` (ones when ``unit`` is ``f.x0``).

    ``batch`` and ``value_and_grad`` go to ``f``'s own where it has them (the gradient in ``u``
    is ``unit`` times the gradient in ``x``). ``to_x(u)`` maps a result back.
    """

    def __init__(self, f: Any, unit: Any) -> None:
        self.f = f
        self.unit = np.array(unit, dtype=float)
        if self.unit.ndim != 1 or not (np.all(np.isfinite(self.unit)) and np.all(self.unit != 0)):
            raise InputError(f"unit must be a 1-D vector, finite and non-zero in every coordinate, got shape "
                             f"{self.unit.shape}; allowed: e.g. a start x0 where no coordinate is 0")
        x0 = getattr(f, "x0", None)
        self.x0 = None if x0 is None else as_vector(x0) / self.unit

    def to_x(self, u: Any) -> np.ndarray:
        return np.asarray(u, dtype=float) * self.unit

    def __call__(self, u: Any) -> float:
        return self.f(self.to_x(u))

    def batch(self, us: Any) -> np.ndarray:
        xs = np.atleast_2d(us) * self.unit
        if callable(getattr(self.f, "batch", None)):
            return np.asarray(self.f.batch(xs))
        return np.array([self.f(x) for x in xs])

    def value_and_grad(self, u: Any) -> tuple[float, np.ndarray]:
        if not callable(getattr(self.f, "value_and_grad", None)):
            raise InputError(f"{type(self.f).__name__} has no value_and_grad(x); a gradient optimizer needs one")
        value, grad = self.f.value_and_grad(self.to_x(u))
        return value, np.asarray(grad, dtype=float) * self.unit

"""Synthetic objectives for quick, model-free comparisons of optimizers.

A quantized ViT costs seconds per evaluation; these cost microseconds, so a comparison grid
can be tried on them first. Each problem is an objective in the package's sense: ``f(x)``
returns a float, ``f.batch(X)`` scores the rows of ``X`` at once and ``f.x0`` is the
starting point. Problems are plain module-level classes holding only arrays and strings, so
they pickle: a worker process or Ray task can receive one, or build its own from
``functools.partial(make_problem, name, dim=...)``.

Names (see :func:`problem_names`):

- ``sphere``: ``sum(x**2)``, optimum 0 at the origin; x0 drawn from N(0, 1).
- ``rastrigin``: ``10 d + sum(x**2 - 10 cos(2 pi x))``, many regular local minima; x0 as sphere.
- ``jagged``: mimics the loss of a quantized model over positive scale vectors (see
  :class:`Jagged`).
- ``ng:<name>``: a function of nevergrad's ``nevergrad.functions.corefuncs.registry``
  (``ng:sphere``, ``ng:ackley``, ...) at its usual place; x0 as sphere.
"""

from __future__ import annotations

import inspect

import numpy as np

from optimizers.base import InputError

BUILTIN = ("sphere", "rastrigin", "jagged")
NG_PREFIX = "ng:"


class Objective:
    """Base of the synthetic problems: checks shapes, derives ``f(x)`` from ``batch``.

    Subclasses set ``x0`` and implement ``_values(X)`` for a 2-D array of candidates.
    """

    x0: np.ndarray

    @property
    def dim(self) -> int:
        """Length of the search vector."""
        return self.x0.size

    def __call__(self, x: np.ndarray) -> float:
        """Value at one point ``x`` of shape ``(dim,)``."""
        return float(self.batch(np.asarray(x, dtype=float).reshape(1, -1))[0])

    def batch(self, X: np.ndarray) -> np.ndarray:
        """Values at the rows of ``X`` (shape ``(n, dim)``), as a float array of length n."""
        X = np.asarray(X, dtype=float)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise InputError(f"expected candidates of shape (n, {self.dim}), got {X.shape}")
        return np.asarray(self._values(X), dtype=float)

    def _values(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _normal_start(dim: int, seed: int) -> np.ndarray:
    """The seeded N(0, 1) starting point shared by the classic test functions."""
    return np.random.default_rng(seed).normal(size=dim)


class Sphere(Objective):
    """``sum(x**2)``: the smooth, unimodal baseline."""

    def __init__(self, dim: int = 8, seed: int = 0):
        self.x0 = _normal_start(dim, seed)

    def _values(self, X: np.ndarray) -> np.ndarray:
        return (X**2).sum(axis=1)


class Rastrigin(Objective):
    """``10 d + sum(x**2 - 10 cos(2 pi x))``: a bowl covered by a regular grid of local minima."""

    def __init__(self, dim: int = 8, seed: int = 0):
        self.x0 = _normal_start(dim, seed)

    def _values(self, X: np.ndarray) -> np.ndarray:
        return 10.0 * X.shape[1] + (X**2 - 10.0 * np.cos(2.0 * np.pi * X)).sum(axis=1)


class Jagged(Objective):
    """A stand-in for a quantized model's loss over per-channel weight scales.

    With ``u = (x - x_opt) / step`` (distance to a hidden optimum in units of ``step``)::

        f(x) = mean(u**2 + round(u)**2) / 2 + ripple * mean(sin(pi * 4.85 * u)**2)

    The bowl makes progress towards ``x_opt`` pay off; ``round(u)`` adds the staircase that
    rounding weights to a grid produces (jumps each time a scale crosses a threshold); the
    ripple, about five periods per step, adds many shallow local minima, as measured loss
    landscapes of quantized ViTs show. ``x0`` is positive, around 0.05 like weight scales,
    and ``x_opt`` lies about ten percent away from it per coordinate, i.e. a few ``step``s,
    so moves of size ``eps = step = 1e-3`` (Evol-Q's default) are the meaningful scale.
    ``f(x_opt) = 0``.
    """

    def __init__(self, dim: int = 8, seed: int = 0, step: float = 1e-3, ripple: float = 0.5):
        if step <= 0 or ripple < 0:
            raise InputError(f"jagged needs step > 0 and ripple >= 0, got step={step}, ripple={ripple}")
        rng = np.random.default_rng(seed)
        self.x0 = 0.05 * (1.0 + 0.2 * rng.uniform(-1.0, 1.0, size=dim))
        self.x_opt = np.abs(self.x0 * (1.0 + 0.1 * rng.normal(size=dim)))
        self.step = float(step)
        self.ripple = float(ripple)

    def _values(self, X: np.ndarray) -> np.ndarray:
        u = (X - self.x_opt) / self.step
        bowl = (u**2 + np.round(u) ** 2).mean(axis=1) / 2.0
        return bowl + self.ripple * (np.sin(np.pi * 4.85 * u) ** 2).mean(axis=1)


class Nevergrad(Objective):
    """A function of nevergrad's ``corefuncs`` registry, looked up by name at each use.

    Only the name is stored, so the problem pickles even where the registered function
    (a lambda, a class) would not.
    """

    def __init__(self, name: str, dim: int = 8, seed: int = 0):
        self.name = name
        self.x0 = _normal_start(dim, seed)

    def _values(self, X: np.ndarray) -> np.ndarray:
        function = _nevergrad_registry()[self.name]
        return np.array([float(function(x)) for x in X])


def _nevergrad_registry() -> dict:
    from nevergrad.functions import corefuncs  # imported lazily: it takes about two seconds

    return corefuncs.registry


def problem_names() -> list[str]:
    """Names :func:`make_problem` accepts: the built-in ones, then ``ng:<name>`` for nevergrad's."""
    return list(BUILTIN) + [NG_PREFIX + name for name in sorted(_nevergrad_registry())]


def make_problem(name: str, dim: int = 8, seed: int = 0, **params: float) -> Objective:
    """Build the synthetic problem ``name`` over ``dim`` variables.

    ``seed`` fixes the starting point ``x0`` (and the hidden optimum of ``jagged``);
    ``params`` go to the problem (``jagged`` takes ``step`` and ``ripple``).
    """
    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InputError(f"dim must be a positive integer, got {dim!r}")
    builtin = {"sphere": Sphere, "rastrigin": Rastrigin, "jagged": Jagged}
    if name in builtin:
        cls, args = builtin[name], ()
    elif name.startswith(NG_PREFIX) and name[len(NG_PREFIX):] in _nevergrad_registry():
        cls, args = Nevergrad, (name[len(NG_PREFIX):],)
    else:
        raise InputError(
            f"unknown problem {name!r}; allowed: {', '.join(BUILTIN)}, or ng:<name> with <name> one of "
            f"{', '.join(sorted(_nevergrad_registry()))}"
        )
    allowed = [p for p in inspect.signature(cls).parameters if p not in ("name", "dim", "seed")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise InputError(f"problem {name!r} has no parameter {unknown[0]!r}; its parameters: {allowed or 'none'}")
    return cls(*args, dim=dim, seed=seed, **params)

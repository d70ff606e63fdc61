"""CMA-ES from the `cma` package, on the non-negative scale vector.

Step size: sigma0 = eps / sqrt(3), so each coordinate starts with the same spread
(standard deviation) as Evol-Q's U(-eps, eps) mutation; eps is absolute (1e-3 default,
1e-4 for 8-bit weights). CMA-ES then adapts it.

Non-negativity: CMA-ES samples freely and the objective sees abs(sample), i.e. CMA-ES
minimizes g(y) = f(|y|), the same reflection Evol-Q uses. (cma's bound handling maps a
wide band next to the bound non-linearly, which would distort scales of 1e-3..1e-1.)
From a start with negative values (or with nonnegative=False) the samples go to f as drawn.
sigma0 is absolute, so a start at 0 moves like any other.

diagonal=True (default) is separable CMA-ES (cma's CMA_diagonal): O(n) per sample
instead of O(n^2), and learnable from a few hundred evaluations in hundreds to thousands
of dimensions, where a full covariance matrix is not. popsize: cma's default 4 + 3 ln(n).
CMA-ES updates once per full generation: a budget below popsize never updates it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from optimizers.base import InputError, Optimizer, check_int, check_positive, pop_match
from optimizers.registry import register


@register("cmaes")
class CMAES(Optimizer):
    """(mu/mu_w, lambda)-CMA-ES; eps: initial per-coordinate spread (1e-3);
    diagonal: separable CMA-ES (True); popsize: samples per generation (None: cma's default)."""

    def __init__(self, eps: float = 1e-3, diagonal: bool = True, popsize: int | None = None):
        self.eps = check_positive("eps", eps)
        if not isinstance(diagonal, bool):
            raise InputError(f"diagonal must be True or False, got {diagonal!r}")
        self.diagonal = diagonal
        self.popsize = None if popsize is None else check_int("popsize", popsize, 2)

    def _reset(self) -> None:
        import cma  # imported here: it takes a second and only this optimizer needs it

        rng = self.rng_
        options = {
            "CMA_diagonal": self.diagonal,
            "randn": lambda lam, n: rng.standard_normal((lam, n)),  # our seeded stream, not np.random
            "seed": math.nan,  # leave numpy's global random state alone
            "verbose": -9, "verb_log": 0, "verb_disp": 0,
        }
        if self.popsize is not None:
            options["popsize"] = self.popsize
        self.es_ = cma.CMAEvolutionStrategy(self.x0_.copy(), self.eps / math.sqrt(3), options)
        self.queue_: list[tuple[np.ndarray, np.ndarray]] = []  # sampled, not yet asked
        self.pending_: list[tuple[np.ndarray, np.ndarray]] = []  # asked, not yet told
        self.told_: list[tuple[np.ndarray, float]] = []  # told, not yet given to cma

    def _refill(self) -> None:
        if not self.queue_:
            reflect = np.abs if self.nonnegative_ else np.array
            self.queue_ = [(reflect(y), np.asarray(y)) for y in self.es_.ask()]

    def _ask(self) -> np.ndarray:
        self._refill()
        x, y = self.queue_.pop(0)
        self.pending_.append((x, y))
        return x.copy()

    def _ask_batch(self) -> list[np.ndarray]:
        """The rest of the current generation."""
        self._refill()
        return [self._ask() for _ in range(len(self.queue_))]

    def _tell(self, x: np.ndarray, value: float, grad: Any = None) -> None:
        y = pop_match(self.pending_, x)
        self.told_.append((x if y is None else y, value))
        lam = self.es_.popsize
        if len(self.told_) >= lam:
            generation, self.told_ = self.told_[:lam], self.told_[lam:]
            self.es_.tell([g for g, _ in generation], [v for _, v in generation])

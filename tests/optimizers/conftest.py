"""Test objectives for the optimizers: analytic functions that record every evaluation."""

from typing import Callable

import numpy as np
import pytest

DIM = 8
# The optimum: some coordinates at 0, so the search pushes against the non-negativity.
CENTER = np.array([0.0, 0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
WIDTH = 0.01  # Rastrigin's period: eps=1e-3 steps are a tenth of a bump


class Recorded:
    """An objective that records each evaluated point and value.

    `fn(x) -> value`; `grad(x) -> gradient` adds `value_and_grad`; `batch=True` adds
    `batch(X)`, and `batches` records the size of each batch call.
    """

    def __init__(self, fn: Callable, x0: np.ndarray, grad: Callable | None = None, batch: bool = False):
        self.fn, self.grad, self.x0 = fn, grad, x0
        self.points: list[np.ndarray] = []
        self.values: list[float] = []
        self.batches: list[int] = []
        if grad is not None:
            self.value_and_grad = lambda x: (self(x), grad(x))
        if batch:
            self.batch = self._batch

    def __call__(self, x: np.ndarray) -> float:
        self.points.append(np.array(x, dtype=float))
        self.values.append(float(self.fn(self.points[-1])))
        return self.values[-1]

    def _batch(self, X: np.ndarray) -> np.ndarray:
        self.batches.append(len(X))
        return np.array([self(x) for x in X])

    @property
    def calls(self) -> int:
        return len(self.points)


def sphere(x: np.ndarray) -> float:
    return float(np.sum((x - CENTER) ** 2))


def sphere_grad(x: np.ndarray) -> np.ndarray:
    return 2 * (x - CENTER)


def rastrigin(x: np.ndarray) -> float:
    z = (x - CENTER) / WIDTH
    return float(np.sum(z**2 + 10 * (1 - np.cos(2 * np.pi * z))))


def rastrigin_grad(x: np.ndarray) -> np.ndarray:
    z = (x - CENTER) / WIDTH
    return (2 * z + 20 * np.pi * np.sin(2 * np.pi * z)) / WIDTH


# x0: off the optimum and off Rastrigin's local minima, a few coordinates close to 0.
X0 = CENTER + np.array([0.0004, 0.0013, -0.0007, 0.0013, 0.0013, -0.0012, 0.0014, 0.0011])

FUNCTIONS = {"sphere": (sphere, sphere_grad), "rastrigin": (rastrigin, rastrigin_grad)}


@pytest.fixture
def objective() -> Callable[..., Recorded]:
    """Factory: objective("sphere" | "rastrigin", batch=False) with a gradient, starting at X0."""

    def build(name: str = "sphere", batch: bool = False) -> Recorded:
        fn, grad = FUNCTIONS[name]
        return Recorded(fn, X0.copy(), grad=grad, batch=batch)

    return build


@pytest.fixture
def scripted() -> Callable[..., Recorded]:
    """Factory: an objective whose k-th evaluation returns values[k], whatever the point."""

    def build(values, x0: np.ndarray = X0, batch: bool = False) -> Recorded:
        script = iter(values)
        return Recorded(lambda x: next(script), np.array(x0, dtype=float), batch=batch)

    return build

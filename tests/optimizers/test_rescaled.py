"""``Rescaled``: an objective in units of a per-coordinate scale, and optimizers on it."""

import numpy as np
import pytest

import optimizers
from optimizers import InputError, Rescaled


class Quadratic:
    """sum(w * (x - target)^2) with coordinates of very different sizes; counts its calls."""

    def __init__(self) -> None:
        self.x0 = np.array([1e-3, 2e-3, 0.5, 1.0])
        self.target = self.x0 * 1.1
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return float(np.sum(((x - self.target) / self.x0) ** 2))

    def value_and_grad(self, x):
        return self(x), 2 * (x - self.target) / self.x0**2


def test_rescaled_is_the_objective_in_units_of_the_start():
    f = Quadratic()
    g = Rescaled(f, f.x0)
    np.testing.assert_array_equal(g.x0, np.ones(4))
    u = np.array([1.1, 1.0, 0.9, 1.2])
    assert g(u) == f(u * f.x0)
    np.testing.assert_array_equal(g.to_x(u), u * f.x0)
    np.testing.assert_array_equal(g.batch(np.stack([u, g.x0])), [f(u * f.x0), f(f.x0)])  # f has no batch: one by one
    value, grad = g.value_and_grad(u)
    step = 1e-6
    numeric = [(g(u + step * e) - g(u - step * e)) / (2 * step) for e in np.eye(4)]
    assert value == g(u)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5)  # the chain rule: unit times the gradient in x


def test_relative_steps_reach_coordinates_that_absolute_ones_swamp_or_miss():
    """eps = 1e-3 in scales is noise for x = 1e-3 and nothing for x = 1; eps = 0.05 in ratios suits both."""
    f = Quadratic()
    in_scales = optimizers.make("evolq", eps=1e-3).minimize(f, f.x0, budget=300, seed=0).value
    g = Rescaled(Quadratic(), f.x0)
    in_ratios = optimizers.make("evolq", eps=0.05).minimize(g, g.x0, budget=300, seed=0).value
    assert in_ratios < 0.1 * in_scales


@pytest.mark.parametrize("unit", [[1.0, 0.0, 1.0, 1.0], [1.0, np.nan, 1.0, 1.0], [[1.0, 1.0]]])
def test_a_unit_with_zero_or_non_finite_entries_is_refused(unit):
    with pytest.raises(InputError, match="unit must be a 1-D vector, finite and non-zero"):
        Rescaled(Quadratic(), unit)


def test_a_gradient_optimizer_on_an_objective_without_gradients_says_so():
    g = Rescaled(lambda x: float(np.sum(x**2)), np.ones(3))
    with pytest.raises(InputError, match="has no value_and_grad"):
        g.value_and_grad(np.ones(3))

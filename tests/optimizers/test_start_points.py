"""Every optimizer works on a user's function from any finite start: zeros, negative values.

Started at 0, the relative-eps modes take absolute steps there; candidates stay >= 0 exactly
when the start is >= 0 (Evol-Q's reflection), unless `nonnegative` says otherwise, and
`Result.info["nonnegative"]` says which it was.
"""

import numpy as np
import pytest
from conftest import Recorded

import optimizers

DIM, BUDGET = 4, 60
NAMES = ["evolq", "random", "cmaes", "gradient", "ng:OnePlusOne"]
OPTIONS = {"gradient": {"lr": 1e-3}}


def bowl(center: np.ndarray, x0: np.ndarray) -> Recorded:
    """A quadratic bowl around `center` with its gradient, recording every point, starting at `x0`."""
    return Recorded(lambda x: float(np.sum((x - center) ** 2)), x0, grad=lambda x: 2 * (x - center))


def run(name: str, f: Recorded, **kwargs) -> optimizers.Result:
    return optimizers.minimize(f, f.x0, BUDGET, name, seed=0, **{**OPTIONS.get(name, {}), **kwargs})


@pytest.mark.parametrize("name", NAMES)
def test_from_zeros_the_search_moves_and_stays_non_negative(name):
    f = bowl(np.full(DIM, 0.005), np.zeros(DIM))
    result = run(name, f)
    assert result.value < f.values[0] and result.info["nonnegative"] is True
    assert (np.array(f.points) >= 0).all()


@pytest.mark.parametrize("name", ["evolq", "random"])
def test_relative_eps_from_zeros_moves(name):
    f = bowl(np.full(DIM, 0.005), np.zeros(DIM))
    result = run(name, f, eps_mode="relative")
    assert result.value < f.values[0]


@pytest.mark.parametrize("name", NAMES)
def test_from_negative_values_the_search_is_not_reflected(name):
    center = np.full(DIM, -1.005)
    f = bowl(center, np.full(DIM, -1.0))
    result = run(name, f)
    assert result.value < f.values[0] and result.info["nonnegative"] is False
    assert (np.array(f.points) < 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_nonnegative_false_from_zeros_reaches_negative_values(name):
    f = bowl(np.full(DIM, -0.005), np.zeros(DIM))
    result = run(name, f, nonnegative=False)
    assert result.value < f.values[0] and (result.x < 0).any()


def test_nonnegative_true_with_a_negative_start_names_the_value():
    with pytest.raises(optimizers.InputError, match="negative value -1.0 at index 2; nonnegative=True"):
        optimizers.minimize(lambda x: 0.0, [0.0, 1.0, -1.0], 5, "evolq", nonnegative=True)
    with pytest.raises(optimizers.InputError, match="nonnegative must be True, False or None"):
        optimizers.minimize(lambda x: 0.0, [0.0], 5, "evolq", nonnegative="yes")

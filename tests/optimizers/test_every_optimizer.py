"""What every registered optimizer promises: it improves, keeps to its budget, stays
non-negative, is reproducible from its seed, and survives NaN values."""

import math

import numpy as np
import pytest

from optimizers import minimize

NAMES = ["evolq", "cmaes", "random", "ng:OnePlusOne", "ng:TwoPointsDE", "gradient"]
BUDGET = 150
# Options that make each optimizer ask several candidates at once (cmaes: a generation).
BATCHED = {"evolq": {"children_per_step": 4}, "random": {"batch_size": 3}, "cmaes": {},
           "ng:OnePlusOne": {"num_workers": 5}, "ng:TwoPointsDE": {"num_workers": 5}, "gradient": {}}


@pytest.mark.parametrize("problem", ["sphere", "rastrigin"])
@pytest.mark.parametrize("name", NAMES)
def test_lowers_the_objective_within_budget(name, problem, objective):
    f = objective(problem)
    start = f(f.x0)
    f.points.clear(), f.values.clear()
    result = minimize(f, f.x0, BUDGET, optimizer=name, seed=3)
    assert f.calls == result.evaluations == BUDGET
    assert result.value < 0.9 * start
    assert result.value == min(f.values)
    assert result.value == pytest.approx(f.fn(result.x))
    assert min(p.min() for p in f.points) >= 0.0


@pytest.mark.parametrize("budget", [1, 2, 7, 23])
@pytest.mark.parametrize("name", NAMES)
def test_never_spends_more_than_the_budget(name, budget, objective):
    f = objective("sphere", batch=True)
    result = minimize(f, f.x0, budget, optimizer=name, seed=0, **BATCHED[name])
    assert f.calls == result.evaluations == budget == len(result.history)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_result(name, objective):
    runs = [minimize(objective("rastrigin"), None, 40, optimizer=name, seed=7) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].x, runs[1].x)
    assert runs[0].value == runs[1].value
    columns = ["evaluation", "value", "best"]
    assert runs[0].history[columns].equals(runs[1].history[columns])


@pytest.mark.parametrize("name", [n for n in NAMES if n != "gradient"])
def test_different_seeds_search_differently(name, objective):
    values = [minimize(objective("rastrigin"), None, 30, optimizer=name, seed=s).history["value"]
              for s in (1, 2)]
    assert not values[0].equals(values[1])


@pytest.mark.parametrize("name", NAMES)
def test_nan_values_count_as_worst(name, objective):
    f = objective("sphere")
    broken = iter(range(10**6))

    def nan_every_third(x):
        return math.nan if next(broken) % 3 == 1 else f(x)

    nan_every_third.value_and_grad = lambda x: (nan_every_third(x), f.grad(x))
    result = minimize(nan_every_third, f.x0, 60, optimizer=name, seed=0)
    assert result.evaluations == 60
    assert np.isinf(result.history["value"].iloc[1::3]).all()
    assert math.isfinite(result.value) and result.value <= f.fn(f.x0)


"""The synthetic problems: names, shapes, pickling, and the jagged one being jagged."""

import pickle
from functools import partial

import numpy as np
import pytest

from optimizers.problems import make_problem, problem_names


def local_minima_along_line(name: str) -> int:
    """Strict local minima of the problem on 1,001 points of the line from x0 through its optimum."""
    f = make_problem(name, dim=8)
    direction = getattr(f, "x_opt", np.zeros(f.dim)) - f.x0
    t = np.linspace(-0.5, 1.5, 1001)[:, None]
    v = f.batch(f.x0 + t * direction)
    return int(np.sum((v[1:-1] < v[:-2]) & (v[1:-1] < v[2:])))


def test_names_include_builtins_and_nevergrad():
    names = problem_names()
    assert names[:3] == ["sphere", "rastrigin", "jagged"]
    assert {"ng:sphere", "ng:rastrigin", "ng:ackley"} <= set(names)


@pytest.mark.parametrize("name", ["sphere", "rastrigin", "jagged", "ng:ackley"])
def test_problem_is_an_objective_and_pickles(name):
    f = make_problem(name, dim=5, seed=3)
    assert f.x0.shape == (5,)
    X = np.random.default_rng(0).normal(f.x0, 0.01, size=(4, 5))
    values = f.batch(X)
    assert values.shape == (4,)
    assert values == pytest.approx([f(x) for x in X])
    assert isinstance(f(f.x0), float)
    factory = partial(make_problem, name, dim=5, seed=3)
    for copy in (pickle.loads(pickle.dumps(f)), pickle.loads(pickle.dumps(factory))()):
        assert copy.batch(X) == pytest.approx(values)
        assert np.array_equal(copy.x0, f.x0)


def test_seed_changes_the_start():
    assert not np.array_equal(make_problem("sphere", seed=0).x0, make_problem("sphere", seed=1).x0)
    assert np.array_equal(make_problem("jagged", seed=1).x0, make_problem("jagged", seed=1).x0)


def test_jagged_looks_like_a_scale_search():
    f = make_problem("jagged", dim=16, step=1e-3)
    assert np.all(f.x0 > 0.03) and np.all(f.x0 < 0.07)
    assert f(f.x_opt) == 0.0
    steps_away = np.abs(f.x_opt - f.x0) / 1e-3
    assert 1 < np.median(steps_away) < 20  # eps = 1e-3 moves matter
    assert f(f.x0) > f(f.x0 + 1e-3 * np.sign(f.x_opt - f.x0))  # one step towards the optimum helps


def test_jagged_is_jagged_and_sphere_is_not():
    assert local_minima_along_line("jagged") > 10
    assert local_minima_along_line("sphere") == 1
    smooth = make_problem("jagged", dim=8, ripple=0.0)
    assert smooth(smooth.x0) < make_problem("jagged", dim=8)(smooth.x0) + 1e-12


def test_bad_input_names_what_is_allowed():
    with pytest.raises(ValueError, match=r"unknown problem 'nope'; allowed: sphere, rastrigin, jagged.*ackley"):
        make_problem("nope")
    with pytest.raises(ValueError, match="unknown problem 'ng:nope'"):
        make_problem("ng:nope")
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        make_problem("sphere", dim=0)
    with pytest.raises(ValueError, match=r"problem 'sphere' has no parameter 'step'; its parameters: none"):
        make_problem("sphere", step=1e-3)
    with pytest.raises(ValueError, match=r"has no parameter 'stepp'; its parameters: \['step', 'ripple'\]"):
        make_problem("jagged", stepp=1e-3)
    with pytest.raises(ValueError, match="batch|shape"):
        make_problem("sphere", dim=3).batch(np.zeros((2, 4)))

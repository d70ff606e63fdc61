"""The run loop every optimizer shares: ask/tell, budget, value0, callback, history, batches."""

import math

import numpy as np
import pandas as pd
import pytest

from optimizers import EvolutionarySearch, RandomSearch, Result, minimize


def test_history_has_one_row_per_evaluation_and_a_monotone_best(objective):
    f = objective("rastrigin")
    result = minimize(f, f.x0, 50, optimizer="random", seed=0)
    history = result.history
    assert isinstance(result, Result) and isinstance(history, pd.DataFrame)
    assert list(history.columns) == ["evaluation", "value", "best", "seconds"]
    assert list(history["evaluation"]) == list(range(50))
    assert history["evaluation"].dtype.kind == "i"
    np.testing.assert_array_equal(history["value"], f.values)
    np.testing.assert_array_equal(history["best"], np.minimum.accumulate(f.values))
    assert (history["seconds"].diff().dropna() >= 0).all() and history["seconds"].iloc[0] >= 0
    assert result.info["optimizer"] == "random" and result.info["value0"] == f.values[0]


def test_callback_sees_each_evaluation_and_can_stop(objective):
    f = objective("sphere")
    seen = []

    def callback(i, x, value, best):
        seen.append((i, value, best))
        return i == 5

    result = minimize(f, f.x0, 100, optimizer="evolq", seed=0, callback=callback)
    assert result.evaluations == f.calls == 6 and result.info["stopped_by_callback"]
    assert [s[0] for s in seen] == list(range(6))
    assert [s[1] for s in seen] == f.values
    assert [s[2] for s in seen] == list(np.minimum.accumulate(f.values))


def test_callback_stop_finishes_the_current_batch(objective):
    f = objective("sphere", batch=True)
    result = minimize(f, f.x0, 100, optimizer="evolq", seed=0, children_per_step=4,
                      callback=lambda i, *_: i == 2)
    assert result.evaluations == f.calls == 5  # x0, then one batch of 4


def test_value0_makes_x0_free(objective):
    f = objective("sphere")
    value0 = f.fn(f.x0)
    result = minimize(f, f.x0, 10, optimizer="random", seed=0, value0=value0)
    assert f.calls == result.evaluations == 10
    assert not any(np.array_equal(p, f.x0) for p in f.points)
    assert result.value <= value0


def test_x0_defaults_to_the_objective_attribute(objective):
    f = objective("sphere")
    result = minimize(f, None, 3, optimizer="random", seed=0)
    np.testing.assert_array_equal(f.points[0], f.x0)
    assert result.evaluations == 3
    with pytest.raises(ValueError, match="x0"):
        minimize(lambda x: 0.0, None, 3)


@pytest.mark.parametrize("budget", [0, -1, 2.5, True])
def test_bad_budget_is_refused(budget):
    with pytest.raises(ValueError, match="budget must be an integer >= 1"):
        minimize(lambda x: 0.0, np.ones(2), budget)


@pytest.mark.parametrize("x0", [np.ones((2, 2)), np.array([]), np.array([1.0, np.nan])])
def test_bad_x0_is_refused(x0):
    with pytest.raises(ValueError, match="x0 must be a non-empty 1-D vector"):
        minimize(lambda x: 0.0, x0, 3)


def test_batch_must_return_one_value_per_candidate():
    def f(x):
        return 1.0

    f.batch = lambda X: np.ones(len(X) + 1)
    with pytest.raises(ValueError, match="f.batch returned 4 values for 3 candidates"):
        minimize(f, np.ones(2), 5, optimizer="random", batch_size=3)


def test_every_nan_objective_keeps_x0():
    result = minimize(lambda x: math.nan, np.full(3, 0.1), 20, optimizer="evolq", seed=0)
    assert result.evaluations == 20 and result.value == math.inf
    np.testing.assert_array_equal(result.x, np.full(3, 0.1))
    assert np.isinf(result.history["value"]).all()


def test_ask_returns_x0_until_its_value_is_told():
    x0 = np.array([0.1, 0.2])
    opt = EvolutionarySearch().start(x0, seed=0)
    np.testing.assert_array_equal(opt.ask(), x0)
    np.testing.assert_array_equal(opt.ask_batch(), [x0])
    with pytest.raises(ValueError, match="first tell must be x0's value"):
        opt.tell(x0 + 1, 1.0)
    opt.tell(x0, 2.0)
    assert opt.value0_ == 2.0 and opt.best_value_ == 2.0
    assert not np.array_equal(opt.ask(), x0)


def test_start_resets_the_run():
    opt = RandomSearch()
    first = opt.minimize(lambda x: float(np.sum(x**2)), np.full(4, 0.5), 30, seed=1)
    again = opt.minimize(lambda x: float(np.sum(x**2)), np.full(4, 0.5), 30, seed=1)
    np.testing.assert_array_equal(first.x, again.x)
    assert first.history["value"].equals(again.history["value"])

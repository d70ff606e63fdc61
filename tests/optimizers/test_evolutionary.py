"""EvolutionarySearch makes exactly the released Evol-Q algorithm's choices."""

import numpy as np
import pytest

from optimizers import EvolutionarySearch, minimize


def reference_evolq(x0, value0, scores, seed, population=15, tournament=10, eps=1e-3):
    """The released algorithm written out plainly, on the same random draws: yields the
    population, a list of (x, value) pairs, after each child."""
    rng = np.random.default_rng(seed)
    members = [(x0.copy(), value0) for _ in range(population)]
    for score in scores:
        drawn = rng.integers(0, population, size=tournament)
        parent = members[drawn[0]]
        for i in drawn[1:]:
            if members[i][1] < parent[1]:  # strictly lower: the first drawn wins ties
                parent = members[i]
        child = np.abs(parent[0] + rng.uniform(-eps, eps, size=x0.size))
        members = sorted(members + [(child, score)], key=lambda member: member[1])  # stable
        members.pop()  # drop the last: a child tying the worst goes
        yield members


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_reference_step_by_step(seed, scripted):
    # Few distinct values: ties everywhere, so tie-breaking is exercised.
    scores = list(np.random.default_rng(100 + seed).choice([1.0, 2.0, 3.0, 4.0], size=60))
    x0 = np.array([0.0005, 0.01, 0.2, 0.0])
    opt = EvolutionarySearch().start(x0, seed=seed, value0=3.0)
    for step, expected in enumerate(reference_evolq(x0, 3.0, scores, seed)):
        opt.tell(opt.ask(), scores[step])
        np.testing.assert_array_equal(opt.members_, np.array([x for x, _ in expected]))
        np.testing.assert_array_equal(opt.values_, [v for _, v in expected])
        np.testing.assert_array_equal(opt.best_x_, expected[0][0])
        assert opt.best_value_ == expected[0][1]


def test_minimize_matches_the_reference_with_small_population(scripted):
    scores = [5.0, 4.0, 6.0, 4.0, 3.0, 3.0, 7.0, 2.0, 2.0]
    f = scripted(scores)
    opt = EvolutionarySearch(population=3, tournament=2, eps=0.01)
    result = opt.minimize(f, f.x0, len(scores), seed=4)
    *_, last = reference_evolq(f.x0, 5.0, scores[1:], 4, population=3, tournament=2, eps=0.01)
    np.testing.assert_array_equal(opt.members_, np.array([x for x, _ in last]))
    np.testing.assert_array_equal(result.x, last[0][0])
    assert result.value == 2.0


@pytest.mark.parametrize("child_value, kept", [(5.0, False), (6.0, False), (4.9, True)])
def test_a_child_tying_the_worst_is_dropped(child_value, kept):
    x0 = np.full(3, 0.1)
    opt = EvolutionarySearch().start(x0, seed=0, value0=5.0)
    child = opt.ask()
    opt.tell(child, child_value)
    assert len(opt.members_) == 15
    assert any(np.array_equal(m, child) for m in opt.members_) == kept
    assert np.array_equal(opt.members_[0], child) == kept
    assert (opt.values_ == 5.0).sum() == (14 if kept else 15)


def test_x0_is_scored_once_and_a_visit_costs_one_plus_three(scripted):
    f = scripted([5.0, 5.0, 4.0, 6.0])
    result = minimize(f, f.x0, 4, optimizer="evolq", seed=0)
    assert f.calls == result.evaluations == 4
    np.testing.assert_array_equal(f.points[0], f.x0)
    assert not any(np.array_equal(p, f.x0) for p in f.points[1:])
    assert result.value == 4.0 and np.array_equal(result.x, f.points[2])
    assert list(result.history["best"]) == [5.0, 5.0, 4.0, 4.0]


def test_known_value0_is_not_rescored(scripted):
    f = scripted([6.0, 6.0, 6.0])
    result = minimize(f, f.x0, 3, optimizer="evolq", seed=0, value0=5.0)
    assert f.calls == 3
    assert not any(np.array_equal(p, f.x0) for p in f.points)
    assert result.value == 5.0 and np.array_equal(result.x, f.x0)  # the unchanged start


def test_children_are_uniform_in_the_eps_box_and_non_negative():
    x0 = np.array([0.0, 0.0005, 0.5])
    opt = EvolutionarySearch(eps=1e-3).start(x0, seed=0, value0=1.0)
    children = np.array([opt.ask() for _ in range(2000)])
    assert (children >= 0).all()
    assert np.abs(children - x0).max() <= 1e-3
    assert children[:, 2].std() == pytest.approx(1e-3 / np.sqrt(3), rel=0.1)


def test_relative_eps_scales_the_noise_by_the_parent():
    x0 = np.array([0.0, 0.01, 1.0])
    opt = EvolutionarySearch(eps=0.1, eps_mode="relative").start(x0, seed=0, value0=1.0)
    children = np.array([opt.ask() for _ in range(500)])
    # the coordinate at 0 has no size to scale by: it takes absolute steps (abs() keeps it >= 0)
    assert np.abs(children - x0).max(axis=0) == pytest.approx([0.1, 0.001, 0.1], rel=0.05)


def test_several_children_per_step_go_to_f_batch(scripted):
    f = scripted(np.linspace(9, 1, 9), batch=True)
    opt = EvolutionarySearch(children_per_step=4)
    result = opt.minimize(f, f.x0, 9, seed=0)
    assert f.batches == [4, 4] and f.calls == 9
    assert result.value == 1.0
    assert len(opt.members_) == 15


def test_one_child_per_step_never_uses_batch(scripted):
    f = scripted([3.0] * 6, batch=True)
    minimize(f, f.x0, 6, optimizer="evolq", seed=0)
    assert f.batches == [] and f.calls == 6


@pytest.mark.parametrize("options, word", [
    ({"eps": 0}, "eps"), ({"eps": -1e-3}, "eps"), ({"eps": float("nan")}, "eps"),
    ({"population": 5, "tournament": 10}, "tournament"), ({"population": 0}, "population"),
    ({"children_per_step": 0}, "children_per_step"), ({"eps_mode": "percent"}, "eps_mode"),
    ({"tournament": 2.5}, "tournament"),
])
def test_bad_options_name_the_value(options, word):
    with pytest.raises(ValueError, match=word):
        EvolutionarySearch(**options)

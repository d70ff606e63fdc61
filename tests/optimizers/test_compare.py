"""The comparison harness: grid rows, resume, interruption, and the executors agreeing."""

import sys
from functools import partial

import numpy as np
import pandas as pd
import pytest

import optimizers
from optimizers.compare import KEY, compare, load
from optimizers.executors import RAY_MISSING, LocalExecutor, make_executor
from optimizers.problems import make_problem

JAGGED = partial(make_problem, "jagged", dim=6)
BUDGET = 12


def finals(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["final"].astype(bool)]


def numbers(table: pd.DataFrame) -> pd.DataFrame:
    """The seed-determined part of a table (no timings), in a fixed order."""
    columns = list(KEY) + ["final", "evaluation", "value", "best"]
    return table[columns].sort_values(list(KEY) + ["final", "evaluation"]).reset_index(drop=True)


class Counting:
    """A problem factory that counts the cells it is built for."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return JAGGED()


class InterruptOnThirdCell(Counting):
    """Its objective raises KeyboardInterrupt half way through the third cell."""

    def __call__(self):
        objective = super().__call__()
        if self.calls != 3:
            return objective
        evaluations = []

        def interrupted(x):
            evaluations.append(1)
            if len(evaluations) == BUDGET // 2:
                raise KeyboardInterrupt
            return objective(x)

        interrupted.x0 = objective.x0
        return interrupted


class BlockSearch:
    """A problem that runs its own whole search per cell and reports extra final metrics."""

    def run(self, optimizer, seed, budget, **options):
        f = JAGGED()
        result = optimizers.minimize(f, f.x0, budget, optimizer=optimizer, seed=seed, **options)
        result.info.update(final_top1=0.5 + seed, value="shadowed", scales=np.ones(3))
        return result


def test_grid_has_one_final_row_per_cell_and_stays_within_budget():
    table = compare({"jagged": JAGGED}, ["random", "evolq"], seeds=2, budget=BUDGET, progress=False)
    schema = ["problem", "optimizer", "seed", "evaluation", "value", "best", "seconds", "final"]
    assert list(table.columns[:8]) == schema
    assert sorted(finals(table)[list(KEY)].itertuples(index=False, name=None)) == [
        ("jagged", "evolq", 0), ("jagged", "evolq", 1), ("jagged", "random", 0), ("jagged", "random", 1)]
    for _, cell in table.groupby(list(KEY)):
        history, final = cell[~cell["final"]], cell[cell["final"]].iloc[0]
        assert 1 <= len(history) <= BUDGET and history["evaluation"].max() <= BUDGET
        assert final["evaluation"] <= BUDGET
        assert np.all(np.diff(history["best"]) <= 0)
        assert final["value"] == pytest.approx(history["value"].min())
        assert final["best"] == final["value"] and final["seconds"] > 0


def test_labels_options_and_run_problems_with_extra_metrics():
    table = compare({"block": BlockSearch()}, {"rs": ("random", {}), "plain": "random"}, seeds=[3], budget=BUDGET,
                    progress=False)
    final = finals(table).set_index("optimizer")
    assert set(final.index) == {"rs", "plain"}
    assert final.loc["rs", "final_top1"] == 3.5 and final.loc["rs", "stopped_by_callback"] == False  # noqa: E712
    assert not {"scales", "options", "info_value"} & set(table.columns)
    assert table.loc[~table["final"].astype(bool), "final_top1"].isna().all()
    assert final.loc["rs", "value"] == final.loc["plain", "value"]  # same optimizer, same seed


def test_resume_runs_only_missing_cells_and_appends_them(tmp_path):
    out, factory = tmp_path / "grid.csv", Counting()
    first = compare({"j": factory}, ["random"], seeds=2, budget=BUDGET, out=out, progress=False)
    assert factory.calls == 2
    second = compare({"j": factory}, ["random", "evolq"], seeds=3, budget=BUDGET, out=out, progress=False)
    assert factory.calls == 2 + 4
    saved = load(out)
    assert len(saved) == len(second) and len(finals(saved)) == 6
    assert not finals(saved).duplicated(list(KEY)).any()
    pd.testing.assert_frame_equal(numbers(saved.iloc[: len(first)]), numbers(first), check_dtype=False)
    third = compare({"j": factory}, ["random", "evolq"], seeds=3, budget=BUDGET, out=out, progress=False)
    assert factory.calls == 6 and len(third) == len(saved)


def test_interrupted_run_keeps_finished_cells_and_resumes_without_duplicates(tmp_path):
    out, grid = tmp_path / "grid.csv", dict(optimizers=["random", "evolq"], seeds=2, budget=BUDGET, progress=False)
    with pytest.raises(KeyboardInterrupt):
        compare({"j": InterruptOnThirdCell()}, out=out, **grid)
    assert len(finals(load(out))) == 2 and len(pd.read_csv(out)) == len(load(out))  # no half cell
    assert [path.name for path in tmp_path.iterdir()] == ["grid.csv"]  # no temporary left behind
    factory = Counting()
    resumed = compare({"j": factory}, out=out, **grid)
    assert factory.calls == 2
    assert len(finals(resumed)) == 4 and not finals(resumed).duplicated(list(KEY)).any()
    for _, cell in resumed.groupby(list(KEY)):
        assert cell["evaluation"][~cell["final"].astype(bool)].is_unique
    pd.testing.assert_frame_equal(numbers(resumed), numbers(compare({"j": JAGGED}, **grid)), check_dtype=False)


def test_process_pool_gives_the_sequential_numbers():
    grid = dict(problems={"jagged": JAGGED, "sphere": "sphere"}, optimizers=["random", "evolq"], seeds=2,
                budget=BUDGET, progress=False)
    pooled = compare(workers=2, **grid)
    pd.testing.assert_frame_equal(numbers(pooled), numbers(compare(**grid)))


class Twice(LocalExecutor):
    """An executor that delivers every result twice, as a retried task might."""

    def map_unordered(self, fn, items):
        for item, result in super().map_unordered(fn, items):
            yield item, result
            yield item, result


def test_a_cell_delivered_twice_is_kept_once(tmp_path):
    table = compare({"j": JAGGED}, ["random"], seeds=2, budget=BUDGET, executor=Twice(), out=tmp_path / "g.csv",
                    progress=False)
    assert len(finals(table)) == 2 and len(table) == 2 * (BUDGET + 1)
    pd.testing.assert_frame_equal(load(tmp_path / "g.csv"), table, check_dtype=False)


def test_ray_executor_gives_the_local_numbers(local_ray):
    grid = dict(problems={"jagged": JAGGED}, optimizers=["random", "evolq"], seeds=2, budget=BUDGET, progress=False)
    on_ray = compare(executor="ray", **grid)
    assert local_ray.is_initialized()  # a Ray started by the caller is left running
    pd.testing.assert_frame_equal(numbers(on_ray), numbers(compare(**grid)))


def test_ray_batch_evaluator_spreads_a_batch_over_actors(local_ray):
    from optimizers.executors import RayBatchEvaluator

    reference = JAGGED()
    X = np.random.default_rng(0).normal(reference.x0, 1e-3, size=(7, reference.dim))
    with RayBatchEvaluator(JAGGED, actors=2) as evaluator:
        np.testing.assert_array_equal(evaluator.x0, reference.x0)
        np.testing.assert_allclose(evaluator.batch(X), reference.batch(X))
        assert evaluator(X[0]) == pytest.approx(reference(X[0]))
        result = optimizers.minimize(evaluator, evaluator.x0, BUDGET, optimizer="random", seed=0)
    assert result.value == optimizers.minimize(reference, reference.x0, BUDGET, optimizer="random", seed=0).value


def test_bad_names_say_what_is_allowed(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown executor 'dask'; allowed: local, ray"):
        compare({"j": JAGGED}, ["random"], seeds=1, budget=BUDGET, executor="dask", progress=False)
    with pytest.raises(ValueError, match=r"unknown problem 'nope'; allowed: sphere, rastrigin, jagged"):
        compare({"j": "nope"}, ["random"], seeds=1, budget=BUDGET, progress=False)
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        compare({"j": JAGGED}, ["random"], seeds=1, budget=0, progress=False)
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'evolq\[distributed\]'") as error:
        make_executor("ray")
    assert str(error.value) == RAY_MISSING

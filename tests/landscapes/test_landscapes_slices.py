import numpy as np
import pandas as pd
import pytest

from landscapes import direction, slice_1d, slice_2d

X0 = np.array([1.0, -2.0, 3.0])


def square_norm(x):
    return float(np.sum(x**2))


class Counting:
    """sum(x^2) that counts scalar calls and batch sizes."""

    def __init__(self):
        self.calls = 0
        self.batches = []

    def __call__(self, x):
        self.calls += 1
        return square_norm(x)

    def batch(self, X):
        self.batches.append(len(X))
        return np.sum(X**2, axis=1)


def test_1d_slice_along_a_coordinate_matches_the_formula():
    d = direction(X0, "coordinate", index=2, normalize="absolute")
    df = slice_1d(square_norm, X0, d, radius=0.5, points=11, progress=False)
    assert list(df.columns) == ["offset", "value"]
    t = df["offset"].to_numpy()
    expected = np.sum(X0**2) + 2 * X0[2] * t + t**2
    np.testing.assert_allclose(df["value"], expected, rtol=1e-13)


def test_elementwise_coordinate_offset_is_a_relative_change():
    d = direction(X0, "coordinate", index=1)
    df = slice_1d(lambda x: x[1], X0, d, radius=0.5, points=5, progress=False)
    np.testing.assert_allclose(df["value"], X0[1] + df["offset"] * abs(X0[1]))


def test_offsets_are_symmetric_with_exact_zero_when_odd():
    odd = slice_1d(square_norm, X0, radius=0.3, points=7, progress=False)["offset"].to_numpy()
    assert odd[0] == -0.3 and odd[-1] == 0.3 and odd[3] == 0.0
    np.testing.assert_array_equal(odd, -odd[::-1])
    even = slice_1d(square_norm, X0, radius=0.3, points=6, progress=False)["offset"].to_numpy()
    assert 0.0 not in even and len(even) == 6


def test_2d_grid_order_shape_and_values():
    a = np.array([0.5, 1.0, -2.0])
    d1 = direction(X0, "coordinate", index=0, normalize="absolute")
    d2 = direction(X0, "coordinate", index=2, normalize="absolute")
    df = slice_2d(lambda x: float(a @ x), X0, d1, d2, radius=1.0, points=5, progress=False)
    assert list(df.columns) == ["offset1", "offset2", "value"] and len(df) == 25
    t = np.linspace(-1, 1, 5)
    np.testing.assert_array_equal(df["offset1"], np.repeat(t, 5))
    np.testing.assert_array_equal(df["offset2"], np.tile(t, 5))
    grid = df["value"].to_numpy().reshape(5, 5)
    assert grid[1, 4] == pytest.approx(a @ X0 + t[1] * a[0] + t[4] * a[2])


def test_directions_are_recorded_and_shared_between_1d_and_2d():
    one = slice_1d(square_norm, X0, points=5, seed=7, progress=False)
    two = slice_2d(square_norm, X0, points=5, seed=7, progress=False)
    assert one.attrs["direction"] == two.attrs["direction1"] != two.attrs["direction2"]
    assert one.attrs["x0"] == tuple(X0) and one.attrs["radius"] == 0.1
    np.testing.assert_array_equal(one.attrs["direction"], direction(X0, seed=7))
    assert len(pd.concat([one, one])) == 10  # attrs hold tuples, so frames still concatenate


@pytest.mark.parametrize("normalize", ["elementwise", "absolute"])
def test_slices_from_zeros_move_and_record_how_offsets_step(normalize):
    zeros = np.zeros(3)
    one = slice_1d(square_norm, zeros, radius=0.5, points=5, normalize=normalize, progress=False)
    two = slice_2d(square_norm, zeros, radius=0.5, points=5, normalize=normalize, progress=False)
    assert one["value"].max() > 0 and two["value"].max() > 0
    assert "absolute steps" in one.attrs["steps"] and one.attrs["steps"] == two.attrs["steps"]
    given = slice_1d(square_norm, zeros, np.ones(3), points=5, progress=False)
    assert given.attrs["steps"] == "given directions, used as they are"


def test_batch_path_is_used_in_chunks_and_matches_the_loop():
    counting = Counting()
    batched = slice_1d(counting, X0, points=41, batch_size=16, progress=False)
    assert counting.batches == [16, 16, 9] and counting.calls == 0
    looped = slice_1d(square_norm, X0, points=41, progress=False)
    np.testing.assert_allclose(batched["value"], looped["value"], rtol=0, atol=1e-12)


def test_batch_path_in_2d_matches_the_loop():
    counting = Counting()
    batched = slice_2d(counting, X0, points=9, batch_size=64, progress=False)
    assert counting.batches == [64, 17] and counting.calls == 0
    looped = slice_2d(square_norm, X0, points=9, progress=False)
    np.testing.assert_allclose(batched["value"], looped["value"], rtol=0, atol=1e-12)


def test_loop_path_calls_once_per_point():
    calls = []
    slice_1d(lambda x: calls.append(x.copy()) or 0.0, X0, points=9, progress=False)
    assert len(calls) == 9 and all(x.shape == X0.shape for x in calls)


def test_progress_bar_can_be_shown_or_hidden(capsys):
    slice_1d(square_norm, X0, points=5, progress=True)
    assert "slice 1-D" in capsys.readouterr().err
    slice_1d(square_norm, X0, points=5, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(radius=-1.0), "radius -1.0"),
        (dict(radius=float("nan")), "radius nan"),
        (dict(points=1), "points 1"),
        (dict(points=2.5), "points 2.5"),
        (dict(batch_size=0), "batch_size 0"),
        (dict(direction=np.ones(4)), "(4,)"),
    ],
)
def test_bad_slice_arguments_name_the_value(kwargs, named):
    with pytest.raises(ValueError) as error:
        slice_1d(Counting(), X0, progress=False, **kwargs)
    assert named in str(error.value)


def test_non_callable_objective_is_refused():
    with pytest.raises(ValueError, match="not callable"):
        slice_1d(3.0, X0, progress=False)


def test_objective_returning_wrong_things_is_reported():
    bad = Counting()
    bad.batch = lambda X: np.zeros(len(X) - 1)
    with pytest.raises(ValueError, match="returned 4 number"):
        slice_1d(bad, X0, points=5, progress=False)
    with pytest.raises(ValueError, match="'oops'"):
        slice_1d(lambda x: "oops", X0, points=5, progress=False)


def test_parallel_2d_directions_are_refused():
    d = np.array([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="parallel"):
        slice_2d(square_norm, X0, d, 2 * d, progress=False)

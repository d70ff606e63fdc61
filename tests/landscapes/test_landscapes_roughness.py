import numpy as np
import pandas as pd
import pytest

from landscapes import roughness, slice_1d, slice_2d

X0 = np.random.default_rng(1).uniform(1.0, 2.0, 16)


def bowl(x):
    return float(np.sum((x - X0) ** 2 / X0**2))


def rippled_bowl(x):
    """The bowl plus a high-frequency ripple (period ~ a few grid steps at radius 0.2)."""
    return bowl(x) + 0.03 * float(np.sum(np.sin(400 * x)))


JAGGED_IS_HIGHER = dict(local_minima=True, tv_over_range=True, diff_autocorr=False, quadratic_r2=False)


def line_frame(values):
    return pd.DataFrame({"offset": np.linspace(-1, 1, len(values)), "value": values})


@pytest.mark.parametrize(
    "make, smooth_limits, jagged_limits",
    [
        (
            lambda f: slice_1d(f, X0, radius=0.2, points=61, progress=False),
            dict(local_minima=1, tv_over_range=2.0 + 1e-9, diff_autocorr=0.95, quadratic_r2=0.999),
            dict(local_minima=10, tv_over_range=4.0, diff_autocorr=0.0, quadratic_r2=0.9),
        ),
        (
            lambda f: slice_2d(f, X0, radius=0.2, points=21, progress=False),
            dict(local_minima=1, tv_over_range=1.9, diff_autocorr=0.95, quadratic_r2=0.999),
            dict(local_minima=10, tv_over_range=2.5, diff_autocorr=0.3, quadratic_r2=0.95),
        ),
    ],
    ids=["1d", "2d"],
)
def test_bowl_and_rippled_bowl_land_apart_on_every_measure(make, smooth_limits, jagged_limits):
    smooth, jagged = roughness(make(bowl)), roughness(make(rippled_bowl))
    for key, jagged_is_higher in JAGGED_IS_HIGHER.items():
        sign = 1 if jagged_is_higher else -1
        ordered = [sign * smooth[key], sign * smooth_limits[key], sign * jagged_limits[key], sign * jagged[key]]
        assert ordered[0] <= ordered[1] < ordered[2] <= ordered[3], (key, smooth[key], jagged[key])


def test_reference_values_of_simple_lines():
    t = np.linspace(-1, 1, 21)
    linear = roughness(line_frame(3 * t + 1))
    assert linear == pytest.approx(dict(local_minima=0, tv_over_range=1.0, diff_autocorr=1.0, quadratic_r2=1.0))
    flat = roughness(line_frame(np.full(21, 2.0)))
    assert flat == dict(local_minima=0, tv_over_range=0.0, diff_autocorr=1.0, quadratic_r2=1.0)
    zigzag = roughness(line_frame(t**2 + 0.5 * (-1.0) ** np.arange(21)))
    assert zigzag["diff_autocorr"] < -0.9 and zigzag["local_minima"] >= 9


def test_white_noise_has_step_autocorrelation_near_minus_half():
    noise = np.random.default_rng(0).standard_normal(4001)
    assert roughness(line_frame(noise))["diff_autocorr"] == pytest.approx(-0.5, abs=0.05)


def test_2d_minima_need_all_eight_neighbours_higher():
    values = np.zeros((5, 5)) + 1.0
    values[2, 2] = 0.0  # a true minimum
    values[1, 1] = -1.0  # lower than (2, 2) diagonally: (2, 2) is no longer counted, (1, 1) is
    t = np.linspace(-1, 1, 5)
    df = pd.DataFrame({"offset1": np.repeat(t, 5), "offset2": np.tile(t, 5), "value": values.ravel()})
    assert roughness(df)["local_minima"] == 1


def test_2d_row_order_does_not_matter():
    df = slice_2d(rippled_bowl, X0, radius=0.2, points=9, progress=False)
    shuffled = df.sample(frac=1.0, random_state=0)
    assert roughness(shuffled) == roughness(df)


def test_1d_is_read_in_offset_order():
    df = slice_1d(rippled_bowl, X0, radius=0.2, points=21, progress=False)
    assert roughness(df.iloc[::-1]) == pytest.approx(roughness(df))


@pytest.mark.parametrize(
    "df, named",
    [
        (pd.DataFrame({"x": [1.0], "value": [1.0]}), "['x', 'value']"),
        (line_frame(np.arange(4.0)), "(4,)"),
        (line_frame(np.array([1.0, 2.0, np.nan, 3.0, 4.0, 5.0])), "1 non-finite"),
        (pd.DataFrame({"offset1": [0.0, 0.0, 1.0], "offset2": [0.0, 1.0, 0.0], "value": [1.0, 2.0, 3.0]}), "2 x 2"),
        (pd.DataFrame({"offset": [0.0, 0.0, 1.0, 2.0, 3.0], "value": np.arange(5.0)}), "repeats an offset"),
    ],
)
def test_bad_frames_are_named(df, named):
    with pytest.raises(ValueError) as error:
        roughness(df)
    assert named in str(error.value)


def test_non_frame_is_refused():
    with pytest.raises(ValueError, match="ndarray"):
        roughness(np.zeros(5))

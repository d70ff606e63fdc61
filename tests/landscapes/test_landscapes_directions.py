import numpy as np
import pytest

from landscapes import direction
from landscapes.directions import describe_steps

X0 = np.array([0.5, -2.0, 1.5, 4.0, -0.25])


def rms(v):
    return np.sqrt(np.mean(v**2))


def test_random_direction_is_reproducible_and_seed_dependent():
    np.testing.assert_array_equal(direction(X0, seed=3), direction(X0, seed=3))
    assert not np.allclose(direction(X0, seed=3), direction(X0, seed=4))


def test_elementwise_scales_each_element_by_its_size():
    d = direction(X0, "random", seed=1, normalize="elementwise")
    assert rms(d / np.abs(X0)) == pytest.approx(1.0)


def test_absolute_has_unit_rms_per_element():
    d = direction(X0, "random", seed=1, normalize="absolute")
    assert rms(d) == pytest.approx(1.0)


def test_elementwise_gives_zero_elements_absolute_steps():
    x0 = np.array([1.0, 0.0, 2.0])
    elementwise, absolute = direction(x0, seed=0), direction(x0, seed=0, normalize="absolute")
    assert elementwise[1] == absolute[1] != 0.0
    np.testing.assert_allclose(elementwise[[0, 2]], absolute[[0, 2]] * [1.0, 2.0])
    assert "1 of 3 elements that are 0 in x0 take absolute steps" in describe_steps(x0, "elementwise")
    assert "absolute" not in describe_steps(np.ones(3), "elementwise")


def test_coordinate_directions():
    np.testing.assert_array_equal(direction(X0, "coordinate", index=1, normalize="absolute"), [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(direction(X0, "coordinate", index=1), [0, 2.0, 0, 0, 0])


def test_given_vector_is_used_unchanged_and_copied():
    v = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    d = direction(X0, v, normalize="absolute")
    np.testing.assert_array_equal(d, v)
    d[0] = 99.0
    assert v[0] == 1.0


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(kind="diagonal"), "'diagonal'"),
        (dict(kind="random", normalize="relative"), "'relative'"),
        (dict(kind="coordinate"), "None"),
        (dict(kind="coordinate", index=5), "index 5"),
        (dict(kind="coordinate", index=-1), "index -1"),
        (dict(kind="random", index=2), "index 2"),
        (dict(kind=np.ones(3)), "(3,)"),
        (dict(kind=np.array([1.0, np.nan, 0, 0, 0])), "nan"),
        (dict(kind=np.zeros(5)), "all zeros"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, named):
    with pytest.raises(ValueError) as error:
        direction(X0, **kwargs)
    assert named in str(error.value)


def test_unknown_kind_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="'random', 'coordinate'"):
        direction(X0, "diagonal")


@pytest.mark.parametrize(
    "x0, named", [(np.array([1.0, np.inf]), "inf"), (np.ones((2, 2)), "(2, 2)"), (np.ones(0), "(0,)")]
)
def test_bad_start_point_is_named(x0, named):
    with pytest.raises(ValueError) as error:
        direction(x0)
    assert named in str(error.value)


@pytest.mark.parametrize("kind, index", [("random", None), ("coordinate", 2)])
def test_elementwise_direction_from_a_zero_vector_takes_absolute_steps(kind, index):
    d = direction(np.zeros(4), kind, seed=0, index=index)
    np.testing.assert_array_equal(d, direction(np.zeros(4), kind, seed=0, index=index, normalize="absolute"))
    assert np.any(d)

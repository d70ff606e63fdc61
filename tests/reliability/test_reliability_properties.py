"""Property tests (hypothesis): hostile scale vectors only ever raise ``UsageError``; fake quantization
keeps its error and grid bounds; random ``QuantConfig`` arguments construct or raise ``UsageError``.

Derandomized (the same examples every run) and without an example database, so a run writes
nothing and a failure reproduces. The model is the session's small one (default architecture,
random weights, 20 calibration images); each example restores the block's scales.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from evolq import BlockObjective, QuantConfig, UsageError
from evolq.quant.bits import BitType
from evolq.quant.observers import MinMaxObserver, affine_qparams, fake_quantize
from evolq.quant.quantizer import Log2Quantizer

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DIM = 256  # qkv (192) + proj (64) output channels of the default architecture


# -- hostile scale vectors -------------------------------------------------------------------
any_float = st.floats(allow_nan=True, allow_infinity=True)
scale_like = st.floats(min_value=1e-6, max_value=1.0)


def hostile_vectors() -> st.SearchStrategy:
    """Right and wrong lengths, NaN/inf/0/negative/huge/tiny, other dtypes, nesting, strings, junk."""
    right = st.one_of(
        hnp.arrays(np.float64, DIM, elements=scale_like),  # valid
        hnp.arrays(np.float64, DIM, elements=any_float),  # mostly invalid
        st.tuples(hnp.arrays(np.float64, DIM, elements=scale_like), st.integers(-1100, 1100)).map(
            lambda pair: np.ldexp(pair[0], pair[1])),  # huge and tiny: beyond float32, even float64
        st.sampled_from([np.float16, np.float32, np.int8, np.int64, np.uint8, np.bool_, np.complex128]).flatmap(
            lambda dtype: hnp.arrays(dtype, DIM)),
        hnp.arrays(np.float64, DIM, elements=scale_like).map(lambda a: a.tolist()),
        hnp.arrays(np.float64, DIM, elements=scale_like).map(lambda a: [str(v) for v in a]),
        hnp.arrays(np.float64, DIM, elements=scale_like).map(torch.from_numpy),
    )
    wrong = st.one_of(
        st.integers(0, 2 * DIM).filter(lambda n: n != DIM).flatmap(lambda n: hnp.arrays(np.float64, n, elements=scale_like)),
        hnp.arrays(np.float64, st.sampled_from([(2, DIM // 2), (DIM, 1), (1, DIM), ()]), elements=scale_like),
        st.lists(st.lists(any_float, max_size=4), max_size=4),
        st.lists(st.one_of(any_float, st.text(max_size=3), st.none()), max_size=8),
    )
    junk = st.one_of(st.none(), st.booleans(), st.integers(), any_float, st.text(max_size=10), st.binary(max_size=10),
                     st.dictionaries(st.text(max_size=3), any_float, max_size=3), st.complex_numbers())
    return st.one_of(right, wrong, junk)


def _restore(block, x0) -> None:
    block.set_scales(x0)


@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")
@SETTINGS
@given(vector=hostile_vectors())
@example(vector=np.full(DIM, np.nan))
@example(vector=np.zeros(DIM))
@example(vector=[[0.01] * DIM])
@example(vector="0.01")
def test_set_scales_accepts_or_raises_usage_error(small_session, vector):
    block = small_session.qmodel.blocks[-1]
    x0 = block.scales()
    try:
        block.set_scales(vector)
    except UsageError as error:
        assert isinstance(error, ValueError) and "\n" not in str(error) and "allowed" in str(error)
        assert np.array_equal(block.scales(), x0)  # a rejected vector changes nothing
        return
    finally:
        stored = block.scales()
        _restore(block, x0)
    expected = np.asarray(vector, dtype=np.float64).astype(np.float32).astype(np.float64)
    assert np.array_equal(stored, expected)


@pytest.fixture(scope="module")
def objective(small_session):
    small_session.qmodel.load_quant_state(small_session.ptq_state)
    return BlockObjective(small_session.qmodel, -1, small_session.calib)


@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")
@SETTINGS
@given(vector=hostile_vectors())
@example(vector=np.full(DIM, np.inf))
def test_objective_returns_a_float_or_raises_usage_error(objective, vector):
    try:
        value = objective(vector)
    except UsageError:
        return
    finally:
        _restore(objective.block, objective.x0)
    assert isinstance(value, float)


@SETTINGS
@given(vectors=st.lists(hnp.arrays(np.float64, DIM, elements=scale_like), min_size=1, max_size=3))
def test_objective_batch_agrees_with_single_calls(objective, vectors):
    try:
        batch = objective.batch(np.stack(vectors))
        single = [objective(v) for v in vectors]
    finally:
        _restore(objective.block, objective.x0)
    assert batch.tolist() == single


# -- fake quantization -----------------------------------------------------------------------
def _grid(bits: int, signed: bool):
    bit_type = BitType(bits, signed)
    return bit_type, bit_type.qmin, bit_type.qmax


@st.composite
def per_tensor_case(draw):
    bits, signed = draw(st.integers(2, 8)), draw(st.booleans())
    bit_type, qmin, qmax = _grid(bits, signed)
    scale = draw(st.floats(2.0**-13, 2.0**7, width=32))
    zero = 0 if signed else draw(st.integers(qmin, qmax))
    x = draw(hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(-1e4, 1e4, width=32)))
    return bit_type, np.float32(scale), zero, x


@SETTINGS
@given(case=per_tensor_case())
def test_fake_quantize_error_bound_and_grid_per_tensor(case):
    bit_type, scale, zero, x = case
    out = fake_quantize(torch.from_numpy(x), torch.tensor(scale), torch.tensor(zero, dtype=torch.int32), bit_type).numpy()
    low, high = scale * (bit_type.qmin - zero), scale * (bit_type.qmax - zero)
    slack = 1e-5 * (np.abs(x) + abs(low) + abs(high)) + 1e-12
    inside = (x >= low) & (x <= high)
    assert np.all(np.abs(x - out)[inside] <= scale / 2 + slack[inside])
    assert np.all(out >= low - slack) and np.all(out <= high + slack)
    levels = out.astype(np.float64) / float(scale) + zero
    assert np.allclose(levels, np.round(levels), atol=1e-3)
    assert np.all((np.round(levels) >= bit_type.qmin) & (np.round(levels) <= bit_type.qmax))
    outside_low, outside_high = x < low, x > high
    assert np.allclose(out[outside_low], low, rtol=1e-5) and np.allclose(out[outside_high], high, rtol=1e-5)


@SETTINGS
@given(case=per_tensor_case())
def test_fake_quantize_matches_torch_kernel(case):
    bit_type, scale, zero, x = case
    ours = fake_quantize(torch.from_numpy(x), torch.tensor(scale), torch.tensor(zero, dtype=torch.int32), bit_type)
    theirs = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), float(scale), zero, bit_type.qmin, bit_type.qmax)
    assert torch.equal(ours, theirs)


@st.composite
def per_channel_case(draw):
    bits, signed = draw(st.integers(2, 8)), draw(st.booleans())
    bit_type, _, _ = _grid(bits, signed)
    channels, width = draw(st.integers(1, 8)), draw(st.integers(1, 16))
    x = draw(hnp.arrays(np.float32, (channels, width), elements=st.floats(-1e3, 1e3, width=32)))
    return bit_type, x


@SETTINGS
@given(case=per_channel_case())
def test_calibrated_per_channel_quantization_error_at_most_half_a_step(case):
    bit_type, x = case
    observer = MinMaxObserver(bit_type, channel_axis=0)
    observer.update(torch.from_numpy(x))
    scale, zero = observer.qparams()
    out = fake_quantize(torch.from_numpy(x), scale, zero, bit_type, channel_axis=0).numpy()
    step = scale.numpy()[:, None].astype(np.float64)
    error = np.abs(x.astype(np.float64) - out)
    assert np.all(error <= step / 2 + 1e-5 * np.abs(x) + 1e-6)  # every value lies in [min, max]
    levels = out / step + zero.numpy()[:, None]
    assert np.allclose(levels, np.round(levels), atol=1e-3)


@SETTINGS
@given(low=st.floats(-1e4, 0, width=32), high=st.floats(0, 1e4, width=32), bits=st.integers(2, 8),
       signed=st.booleans())
def test_affine_qparams_are_finite_positive_and_on_the_grid(low, high, bits, signed):
    bit_type = BitType(bits, signed)
    scale, zero = affine_qparams(torch.tensor(low), torch.tensor(high), bit_type)
    assert math.isfinite(scale.item()) and scale.item() > 0
    assert bit_type.qmin <= zero.item() <= bit_type.qmax


@SETTINGS
@given(x=hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(0, 1, width=32)), bits=st.integers(2, 8))
def test_log2_quantizer_outputs_powers_of_two_or_zero(x, bits):
    quantizer = Log2Quantizer(bits)
    quantizer.mode = "quant"
    out = quantizer(torch.from_numpy(x)).numpy()
    allowed = {0.0} | {2.0 ** -q for q in range(2**bits)}
    assert set(out.tolist()) <= allowed
    assert np.all(out <= 1.0) and np.all(out >= 0.0)


# -- configs ---------------------------------------------------------------------------------
values = st.one_of(
    st.integers(-2, 12), st.booleans(), st.none(), st.floats(allow_nan=True), st.text(max_size=6),
    st.sampled_from(["omse", "minmax", "ema", "percentile", "ptf", "uniform", "log2", "8", "w4a8"]),
)
config_kwargs = st.fixed_dictionaries({}, optional={
    name: values for name in ("wbits", "abits", "act_observer", "ptf", "softmax", "softmax_bits", "bias_correction")
})


@SETTINGS
@given(kwargs=config_kwargs)
@example(kwargs={"wbits": 8.0})
@example(kwargs={"wbits": True})
@example(kwargs={"softmax": None})
def test_quant_config_constructs_or_raises_usage_error(kwargs):
    try:
        config = QuantConfig(**kwargs)
    except UsageError as error:
        assert "\n" not in str(error) and "allowed" in str(error)
        return
    assert config.wbits in range(2, 9) and config.abits in range(2, 9) and config.softmax_bits in range(2, 9)
    recorded = json.dumps(config.to_dict(), sort_keys=True)  # what result.json records
    assert json.dumps(QuantConfig(**json.loads(recorded)).to_dict(), sort_keys=True) == recorded


@SETTINGS
@given(name=st.one_of(st.text(max_size=8), st.from_regex(r"w\d{1,2}a\d{1,2}", fullmatch=True), st.none(), st.integers()))
def test_presets_construct_or_raise_usage_error(name):
    try:
        config = QuantConfig.preset(name)
    except UsageError:
        return
    assert config.name == f"w{config.wbits}a{config.abits}"


@pytest.mark.parametrize("value", [["omse"], {"name": "omse"}])
def test_quant_config_unhashable_observer_raises_usage_error(value):
    with pytest.raises(UsageError):
        QuantConfig(act_observer=value)


@pytest.mark.parametrize("value", [["uniform"], {"kind": "log2"}])
def test_quant_config_unhashable_softmax_raises_usage_error(value):
    with pytest.raises(UsageError):
        QuantConfig(softmax=value)


@pytest.mark.parametrize("field", ["ptf", "bias_correction"])
def test_quant_config_switches_must_be_booleans(field):
    with pytest.raises(UsageError):
        QuantConfig(**{field: "no"})

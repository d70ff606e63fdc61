"""Observers on known tensors: the ranges and quantization parameters they choose."""

import contextlib

import pytest
import torch

from evolq.errors import UsageError
from evolq.quant import kernels
from evolq.quant.bits import BitType
from evolq.quant.observers import (
    SAMPLE_SIZE,
    EMAObserver,
    MinMaxObserver,
    OMSEObserver,
    PercentileObserver,
    PTFObserver,
    affine_qparams,
    fake_quantize,
    make_observer,
)
from evolq.quant.quantizer import Log2Quantizer, UniformQuantizer

UINT8 = BitType(8)


def l2(x, scale, zero_point, bit_type=UINT8, axis=None):
    return (fake_quantize(x, scale, zero_point, bit_type, axis) - x).pow(2).mean().item()


# -- min-max -------------------------------------------------------------------------------------
def test_minmax_per_tensor_over_two_batches():
    observer = MinMaxObserver(UINT8)
    observer.update(torch.tensor([[-1.0, 2.0], [3.0, -4.0]]))
    observer.update(torch.tensor([[5.0, 0.0]]))
    assert (observer.low.item(), observer.high.item()) == (-4.0, 5.0)
    scale, zero_point = observer.qparams()
    assert scale.item() == pytest.approx(9 / 255, rel=1e-6)
    assert zero_point.item() == 113  # round(4 / (9/255)) = round(113.33)


def test_minmax_per_channel_axis_0():
    observer = MinMaxObserver(UINT8, channel_axis=0)
    observer.update(torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.25, 4.0]]))
    assert observer.low.tolist() == [-2.0, 0.25] and observer.high.tolist() == [3.0, 4.0]
    scale, zero_point = observer.qparams()
    torch.testing.assert_close(scale, torch.tensor([5 / 255, 4 / 255]), rtol=1e-6, atol=0)
    assert zero_point.tolist() == [102, 0]  # channel 1 widened to [0, 4]


def test_minmax_per_channel_last_axis():
    observer = MinMaxObserver(UINT8, channel_axis=-1)
    x = torch.tensor([[[1.0, -1.0, 0.0], [2.0, -2.0, 0.0]], [[3.0, 0.0, 0.0], [4.0, 5.0, 0.0]]])  # (2, 2, 3)
    observer.update(x)
    observer.update(x * 0.5)
    assert observer.low.tolist() == [0.5, -2.0, 0.0]
    assert observer.high.tolist() == [4.0, 5.0, 0.0]


def test_qparams_before_data_is_an_error():
    with pytest.raises(RuntimeError, match="calibrate first"):
        MinMaxObserver(UINT8).qparams()
    with pytest.raises(RuntimeError, match="calibrate first"):
        PTFObserver(UINT8).qparams()


# -- EMA -----------------------------------------------------------------------------------------
def test_ema_two_batches_momentum_0_9():
    observer = EMAObserver(UINT8, momentum=0.9)
    observer.update(torch.tensor([-1.0, 0.5, 2.0]))
    assert (observer.low.item(), observer.high.item()) == (-1.0, 2.0)  # the first batch is taken as is
    observer.update(torch.tensor([-3.0, 4.0, 1.0]))
    # low = 0.9 * -1 + 0.1 * -3 = -1.2; high = 0.9 * 2 + 0.1 * 4 = 2.2 (min-max would say -3, 4)
    assert observer.low.item() == pytest.approx(-1.2, abs=1e-6)
    assert observer.high.item() == pytest.approx(2.2, abs=1e-6)
    scale, zero_point = observer.qparams()
    assert scale.item() == pytest.approx(3.4 / 255, rel=1e-5)
    assert zero_point.item() == 90  # round(1.2 / (3.4/255)) = round(90.0)


# -- percentile ----------------------------------------------------------------------------------
def test_percentile_clips_one_huge_outlier():
    x = torch.cat([torch.linspace(-1.0, 1.0, 10001), torch.tensor([1000.0])])
    observer = PercentileObserver(UINT8, percentile=99.9)
    observer.update(x)
    assert 0.99 < observer.high.item() < 1.0
    assert -1.0 < observer.low.item() < -0.99
    scale, _ = observer.qparams()
    assert scale.item() < 2 / 255
    minmax = MinMaxObserver(UINT8)
    minmax.update(x)
    assert minmax.qparams()[0].item() > 1000 / 255


def test_percentile_per_channel():
    x = torch.stack([torch.linspace(0.0, 1.0, 2001), torch.linspace(-5.0, 5.0, 2001)])
    x[0, 7] = 300.0
    observer = PercentileObserver(UINT8, channel_axis=0, percentile=99.0)
    observer.update(x)
    assert observer.high.shape == (2,)
    assert observer.high[0].item() < 1.0 and 4.8 < observer.high[1].item() < 5.0
    assert -5.0 < observer.low[1].item() < -4.8


# -- OMSE ----------------------------------------------------------------------------------------
def test_omse_shrinks_the_range_when_an_outlier_costs_resolution():
    x = torch.cat([torch.rand(100_000, generator=torch.Generator().manual_seed(0)), torch.tensor([50.0])])
    omse, minmax = OMSEObserver(UINT8), MinMaxObserver(UINT8)
    omse.update(x)
    minmax.update(x)
    scale, zero_point = omse.qparams()
    minmax_scale, minmax_zero = minmax.qparams()
    factor = scale.item() / minmax_scale.item()
    assert 0.5 < factor < 0.995  # a shrink 1 - 0.01 i with i >= 1
    steps = (1 - factor) * 100
    assert abs(steps - round(steps)) < 1e-3  # factor 1 - 0.01 i
    assert l2(x, scale, zero_point) < l2(x, minmax_scale, minmax_zero)


def test_omse_keeps_min_max_without_outliers():
    x = torch.linspace(-1.0, 3.0, 4001)
    omse, minmax = OMSEObserver(UINT8), MinMaxObserver(UINT8)
    omse.update(x)
    minmax.update(x)
    scale, zero_point = omse.qparams()
    assert l2(x, scale, zero_point) <= l2(x, *minmax.qparams())
    assert scale.item() == pytest.approx(minmax.qparams()[0].item(), rel=0.03)


def test_omse_tracks_min_max_over_all_batches_and_chooses_on_the_last():
    omse = OMSEObserver(UINT8)
    omse.update(torch.tensor([0.0, 50.0]))
    last = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    omse.update(last)
    assert (omse.low.item(), omse.high.item()) == (0.0, 50.0)
    scale, zero_point = omse.qparams()
    # every shrink down to 0.11 still holds [0, 1]: a finer grid wins on the last batch
    assert scale.item() <= 0.15 * 50 / 255
    assert zero_point.item() == 0


# -- OMSE and PTF equal the plain loops of FQ-ViT bit for bit -----------------------------------
def reference_omse(observer):
    """FQ-ViT's OMSE: every shrink factor quantizes the whole last batch; the first lowest error wins."""
    best, best_error = affine_qparams(observer.low, observer.high, observer.bit_type), float("inf")
    for i in range(90):
        factor = 1 - 0.01 * i
        scale, zero_point = affine_qparams(observer.low * factor, observer.high * factor, observer.bit_type)
        restored = fake_quantize(observer.last, scale, zero_point, observer.bit_type, observer.channel_axis)
        error = (observer.last - restored).pow(2).mean().item()
        if error < best_error:
            best, best_error = (scale, zero_point), error
    return best


def reference_ptf(observer):
    """FQ-ViT's PTF: every factor quantizes the whole last batch; each channel takes its first lowest error."""
    largest, shared_zero = affine_qparams(observer.low.min(), observer.high.max(), observer.bit_type)
    base = largest / 8
    channels = observer.last.reshape(-1, observer.last.shape[-1])
    zero = shared_zero.expand(channels.shape[-1]).contiguous()
    errors = []
    for factor in (1, 2, 4, 8):
        scale = (base * factor).expand(channels.shape[-1]).contiguous()
        restored = fake_quantize(channels, scale, zero, observer.bit_type, channel_axis=-1)
        errors.append((restored - channels).pow(2).mean(dim=0))
    return base * torch.tensor([1.0, 2.0, 4.0, 8.0])[torch.stack(errors).argmin(dim=0)], zero


def calibration_like(seed, shape, kind):
    """Tensors shaped like what the observers see: normal, heavy-tailed, softmax-like, constant, zeros."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=generator) * 3 + 0.5
    if kind == "heavy":
        return torch.randn(shape, generator=generator) * torch.rand(shape, generator=generator).pow(-1.5)
    if kind == "softmax":
        return torch.randn(shape, generator=generator).mul(4).softmax(dim=-1)
    if kind == "gelu":
        return torch.nn.functional.gelu(torch.randn(shape, generator=generator) * 2)
    return torch.full(shape, 0.0 if kind == "zeros" else -1.25)


KINDS = ("normal", "heavy", "softmax", "gelu", "constant", "zeros")
BIT_TYPES = (UINT8, BitType(4), BitType(8, signed=True), BitType(3, signed=True))


def assert_same(got, expected):
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.fixture(params=["compiled", "torch"])
def scoring(request):
    """The observers' error sums in the compiled kernel, and in torch's ops (where no compiler works)."""
    with kernels.disabled() if request.param == "torch" else contextlib.nullcontext():
        yield request.param


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bit_type", BIT_TYPES, ids=str)
@pytest.mark.parametrize("axis", [None, 0, -1])
def test_omse_equals_the_plain_loop(kind, bit_type, axis, scoring):
    for seed in range(3):
        observer = OMSEObserver(bit_type, channel_axis=axis)
        observer.update(calibration_like(seed, (4, 30, 24), kind) * 4)  # a wider first batch: its range is kept
        observer.update(calibration_like(seed + 10, (4, 30, 24), kind))
        assert_same(observer.qparams(), reference_omse(observer))


@pytest.mark.parametrize("kind", ("normal", "heavy", "softmax", "gelu"))
@pytest.mark.parametrize("axis", [None, -1])
def test_omse_equals_the_plain_loop_on_tensors_larger_than_the_sample(kind, axis, scoring):
    observer = OMSEObserver(UINT8, channel_axis=axis)
    observer.update(calibration_like(0, (3, SAMPLE_SIZE // 16, 48), kind))
    assert observer.last.numel() > 2 * SAMPLE_SIZE
    assert_same(observer.qparams(), reference_omse(observer))


def test_omse_ties_keep_the_first_factor():
    observer = OMSEObserver(UINT8)
    observer.update(torch.zeros(5, 7))  # every factor: error 0
    assert_same(observer.qparams(), affine_qparams(torch.tensor(0.0), torch.tensor(0.0), UINT8))
    assert_same(observer.qparams(), reference_omse(observer))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bit_type", BIT_TYPES, ids=str)
def test_ptf_equals_the_plain_loop(kind, bit_type, scoring):
    for seed in range(3):
        x = calibration_like(seed, (6, 40, 32), kind)
        x = x * torch.logspace(-1, 1, 32)  # channel ranges 1 : 100, so that every factor is chosen somewhere
        observer = PTFObserver(bit_type)
        observer.update(x)
        assert_same(observer.qparams(), reference_ptf(observer))


def test_ptf_equals_the_plain_loop_on_tensors_larger_than_the_sample(scoring):
    x = calibration_like(1, (8, 197, 192), "heavy") * torch.logspace(-1, 1, 192)
    observer = PTFObserver(UINT8)
    observer.update(x)
    assert_same(observer.qparams(), reference_ptf(observer))


# -- PTF -----------------------------------------------------------------------------------------
def test_ptf_power_of_two_factors_and_shared_zero_point():
    ramp = torch.linspace(-0.75, 1.25, 1024).reshape(4, 256, 1)
    x = torch.cat([ramp * 1.0, ramp * 2.0, ramp * 8.0], dim=-1)  # channel ranges 1 : 2 : 8, widest [-6, 10]
    observer = PTFObserver(UINT8)
    observer.update(x)
    scale, zero_point = observer.qparams()
    base = (16 / 255) / 8  # the widest range on 255 steps, divided by the largest factor
    torch.testing.assert_close(scale, torch.tensor([1.0, 2.0, 8.0]) * base, rtol=1e-6, atol=0)
    assert zero_point.tolist() == [96, 96, 96]  # round(6 / (16/255)) = round(95.6), shared by all channels


def test_ptf_via_make_observer_gives_factor_1_vs_8():
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(8, 50, 2, generator=generator) * 2 - 1
    x[..., 1] *= 8.1
    observer = make_observer("ptf", UINT8)
    assert isinstance(observer, PTFObserver) and observer.channel_axis == -1
    observer.update(x)
    scale, zero_point = observer.qparams()
    ratio = (scale[1] / scale[0]).item()
    assert ratio == pytest.approx(8.0, rel=1e-6)
    assert zero_point[0].item() == zero_point[1].item()


# -- log2 ----------------------------------------------------------------------------------------
def test_log2_quantizer_levels():
    quantizer = Log2Quantizer(bits=4)
    x = torch.tensor([1.0, 0.5, 0.3, 0.7, 2.0**-15, 2.0**-16, 1e-6, 0.0])
    assert torch.equal(quantizer(x), x)  # mode "off": identity
    quantizer.mode = "quant"
    # 0.3 -> 2^-round(1.74) = 0.25; 0.7 -> 2^-round(0.51) = 0.5; 2^-15 is the smallest 4-bit level
    assert quantizer(x).tolist() == [1.0, 0.5, 0.25, 0.5, 2.0**-15, 0.0, 0.0, 0.0]


# -- names ---------------------------------------------------------------------------------------
def test_make_observer_by_name():
    assert isinstance(make_observer("minmax", UINT8), MinMaxObserver)
    ema = make_observer("ema", UINT8, channel_axis=0)
    assert type(ema) is EMAObserver and ema.channel_axis == 0
    assert isinstance(make_observer("percentile", UINT8), PercentileObserver)
    assert isinstance(make_observer("omse", UINT8), OMSEObserver)


def test_make_observer_unknown_name_lists_the_allowed_names():
    with pytest.raises(UsageError) as error:
        make_observer("kmeans", UINT8)
    assert str(error.value) == "observer 'kmeans' is unknown; allowed: minmax, ema, percentile, omse, ptf"
    assert isinstance(error.value, ValueError)


# -- the quantizer module's modes ----------------------------------------------------------------
def test_uniform_quantizer_modes():
    quantizer = UniformQuantizer(UINT8, MinMaxObserver(UINT8))
    x = torch.linspace(-1.0, 3.0, 101)
    assert torch.equal(quantizer(x), x) and not quantizer.observer.seen  # off
    quantizer.mode = "quant"
    assert torch.equal(quantizer(x), x)  # not calibrated yet: identity
    quantizer.mode = "observe"
    assert torch.equal(quantizer(x), x) and quantizer.observer.seen
    quantizer.finish_calibration()
    assert quantizer.scale.shape == () and quantizer.zero_point.item() == 64
    quantizer.mode = "quant"
    out = quantizer(x)
    assert not torch.equal(out, x) and (out - x).abs().max().item() <= 0.5 * 4 / 255 + 1e-6
    quantizer.mode = "off"
    assert torch.equal(quantizer(x), x)
    quantizer.mode = "quant"
    assert torch.equal(quantizer(x), out)  # parameters survive switching off and back


@pytest.mark.parametrize("observer", [OMSEObserver(UINT8), PTFObserver(UINT8)], ids=["omse", "ptf"])
def test_a_fixed_quantizer_drops_the_batch_it_chose_on(observer):
    quantizer = UniformQuantizer(UINT8, observer, channel_axis=-1 if isinstance(observer, PTFObserver) else None)
    quantizer.mode = "observe"
    quantizer(torch.randn(4, 8, 16))
    assert observer.last is not None
    quantizer.finish_calibration()
    assert observer.last is None  # a calibrated model keeps parameters, not activations
    assert quantizer.scale.numel() in (1, 16)


@pytest.mark.parametrize("observer", [OMSEObserver(UINT8), PTFObserver(UINT8)], ids=["omse", "ptf"])
def test_the_last_batch_is_kept_without_a_copy_and_refused_once_overwritten(observer):
    """The batch is not copied (a fifth of DeiT-Tiny's calibration was copies); a batch that something changed
    in place after it was observed would give parameters for data that never was: refused, naming why."""
    x = torch.randn(4, 8, 16)
    observer.update(x)
    assert observer.last.data_ptr() == x.data_ptr()
    x.mul_(2.0)
    with pytest.raises(RuntimeError, match="changed in place after it was observed"):
        observer.qparams()
    observer.update(torch.randn(4, 8, 16))  # a fresh batch: fine again
    assert observer.qparams()[0].numel() in (1, 16)

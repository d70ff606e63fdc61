"""Integer grids, affine quantization parameters and fake quantization against hand-computed values."""

import pytest
import torch

from evolq.errors import UsageError
from evolq.quant.bits import BitType, check_bits
from evolq.quant.layers import ste_fake_quantize
from evolq.quant.observers import EPS, MinMaxObserver, affine_qparams, fake_quantize
from evolq.quant.quantizer import UniformQuantizer

I32 = torch.int32


# -- grids -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bits, signed, qmin, qmax, name",
    [(2, False, 0, 3, "uint2"), (3, True, -4, 3, "int3"), (4, False, 0, 15, "uint4"), (4, True, -8, 7, "int4"),
     (8, False, 0, 255, "uint8"), (8, True, -128, 127, "int8")],
)
def test_bit_type_grid(bits, signed, qmin, qmax, name):
    bit_type = BitType(bits, signed)
    assert (bit_type.qmin, bit_type.qmax, bit_type.levels, str(bit_type)) == (qmin, qmax, 2**bits, name)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -4, 4.0, True, "8", None])
def test_bit_type_rejects_bits_outside_2_to_8(bits):
    with pytest.raises(UsageError, match=r"bits .* is not allowed; allowed: integers 2\.\.8") as error:
        BitType(bits)
    assert repr(bits) in str(error.value)
    assert "\n" not in str(error.value)


def test_check_bits_names_the_setting():
    assert check_bits("wbits", 3) == 3
    with pytest.raises(UsageError, match=r"^abits 9 is not allowed; allowed: integers 2\.\.8$"):
        check_bits("abits", 9)


# -- fake quantization by hand -----------------------------------------------------------------
# (bit type, scale, zero point, x, expected): q = clamp(round_half_even(x / scale) + zp, qmin, qmax),
# result = (q - zp) * scale. Scales are powers of two, so every expected value is exact in float32.
HAND_CASES = {
    "uint4": (
        BitType(4), 0.5, 3,
        [-2.0, -1.5, -0.3, 0.0, 0.26, 0.25, 0.75, 1.0, 5.9, 6.0, 100.0],
        # q: -1->0, 0, 2, 3, 4, 3 (0.5 rounds to even 0), 5 (1.5 -> 2), 5, 15, 15, 203->15
        [-1.5, -1.5, -0.5, 0.0, 0.5, 0.0, 1.0, 1.0, 6.0, 6.0, 6.0],
    ),
    "int4": (
        BitType(4, signed=True), 0.25, 0,
        [-3.0, -2.0, -0.1, 0.0, 0.13, 1.0, 1.75, 1.9, 5.0],
        # q: -12->-8, -8, 0, 0, 1, 4, 7, 8->7, 20->7
        [-2.0, -2.0, 0.0, 0.0, 0.25, 1.0, 1.75, 1.75, 1.75],
    ),
    "uint8": (
        BitType(8), 0.03125, 128,
        [-5.0, -4.0, -0.01, 0.0, 0.02, 1.0, 3.96875, 4.0, 7.0],
        # q: -32->0, 0, 128, 128, 129, 160, 255, 256->255, 352->255
        [-4.0, -4.0, 0.0, 0.0, 0.03125, 1.0, 3.96875, 3.96875, 3.96875],
    ),
    "int3": (
        BitType(3, signed=True), 0.5, 0,
        [-3.0, -2.0, -1.2, -0.2, 0.3, 0.74, 1.5, 2.0],
        # q: -6->-4, -4, -2, 0, 1, 1, 3, 4->3
        [-2.0, -2.0, -1.0, 0.0, 0.5, 0.5, 1.5, 1.5],
    ),
}


@pytest.mark.parametrize("case", list(HAND_CASES))
def test_fake_quantize_per_tensor_hand_values(case):
    bit_type, scale, zero_point, x, expected = HAND_CASES[case]
    out = fake_quantize(torch.tensor(x), torch.tensor(scale), torch.tensor(zero_point, dtype=I32), bit_type)
    assert out.dtype == torch.float32
    assert out.tolist() == expected


@pytest.mark.parametrize("case", list(HAND_CASES))
def test_fake_quantize_grad_path_gives_the_same_hand_values(case):
    bit_type, scale, zero_point, x, expected = HAND_CASES[case]
    leaf = torch.tensor(x, requires_grad=True)
    out = fake_quantize(leaf, torch.tensor(scale), torch.tensor(zero_point, dtype=I32), bit_type)
    assert out.grad_fn is not None
    assert out.tolist() == expected


def test_fake_quantize_per_channel_hand_values_on_both_axes():
    # uint4; channel 0: scale 0.5, zp 0; channel 1: scale 2, zp 8.
    x = torch.tensor([[-1.0, 0.7, 9.0], [-20.0, 3.0, 5.0]])
    scale, zero_point = torch.tensor([0.5, 2.0]), torch.tensor([0, 8], dtype=I32)
    # row 0: q = -2->0, 1, 18->15; row 1: q = -10+8 -> 0, round(1.5)=2 +8, round(2.5)=2 +8 (half to even)
    expected = [[0.0, 0.5, 7.5], [-16.0, 4.0, 4.0]]
    assert fake_quantize(x, scale, zero_point, BitType(4), channel_axis=0).tolist() == expected
    assert fake_quantize(x.T.contiguous(), scale, zero_point, BitType(4), channel_axis=-1).T.tolist() == expected
    assert fake_quantize(x.T.contiguous(), scale, zero_point, BitType(4), channel_axis=1).T.tolist() == expected


def test_fake_quantize_straight_through_gradient_hand_values():
    bit_type, scale, zero_point, x, _ = HAND_CASES["uint4"]
    leaf = torch.tensor(x, requires_grad=True)
    fake_quantize(leaf, torch.tensor(scale), torch.tensor(zero_point, dtype=I32), bit_type).sum().backward()
    # 1 where round(x / s) + zp lands on the grid, 0 where it is clamped (-2.0 -> -1, 100 -> 203).
    assert leaf.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_fake_quantize_per_channel_straight_through_gradient():
    leaf = torch.tensor([[-1.0, 0.7, 9.0], [-20.0, 3.0, 5.0]], requires_grad=True)
    out = fake_quantize(leaf, torch.tensor([0.5, 2.0]), torch.tensor([0, 8], dtype=I32), BitType(4), channel_axis=0)
    (out * torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])).sum().backward()
    assert leaf.grad.tolist() == [[0.0, 2.0, 0.0], [0.0, 5.0, 6.0]]


def test_fake_quantize_without_grad_mode_takes_the_fast_path():
    leaf = torch.randn(50, requires_grad=True)
    with torch.no_grad():
        out = fake_quantize(leaf, torch.tensor(0.1), torch.tensor(3, dtype=I32), BitType(4))
    assert out.grad_fn is None and not out.requires_grad


# -- the fast path is torch's kernel, bit for bit --------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("axis", [None, 0, -1])
def test_fast_path_is_bit_identical_to_torch_kernels(bits, signed, axis):
    generator = torch.Generator().manual_seed(100 * bits + 10 * signed + (0 if axis is None else 3 + axis))
    bit_type = BitType(bits, signed)
    x = torch.randn(12, 7, 33, generator=generator) * 3
    x[0, 0, :] = torch.linspace(-1000, 1000, 33)  # beyond every grid: clamped
    channels = 1 if axis is None else x.shape[axis]
    scale = torch.rand(channels, generator=generator) * 0.4 + 0.01
    if signed:
        zero_point = torch.zeros(channels, dtype=I32)
    else:
        zero_point = torch.randint(bit_type.qmin, bit_type.qmax + 1, (channels,), generator=generator, dtype=I32)
    if axis is None:
        scale, zero_point = scale[0], zero_point[0]
        reference = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, bit_type.qmin, bit_type.qmax)
    else:
        reference = torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis % x.dim(),
                                                           bit_type.qmin, bit_type.qmax)
    ours = fake_quantize(x, scale, zero_point, bit_type, axis)
    assert torch.equal(ours, reference)
    # the data hits the clamps and many levels, so the comparison is not vacuous
    assert torch.unique(ours).numel() >= 4
    assert (ours - x).abs().max() > 1.0  # some values are clamped


# -- affine quantization parameters --------------------------------------------------------------
def qparams(low, high, bit_type):
    return affine_qparams(torch.tensor(low), torch.tensor(high), bit_type)


def test_affine_qparams_uint8_range():
    scale, zero_point = qparams(-1.0, 3.0, BitType(8))
    assert scale.item() == pytest.approx(4 / 255, rel=1e-6)
    assert zero_point.dtype == I32 and zero_point.item() == 64  # round(1 / (4/255)) = round(63.75)


@pytest.mark.parametrize(
    "low, high, bits, scale, zero_point",
    [
        (2.0, 10.0, 4, 10 / 15, 0),  # all positive: low widened to 0
        (-6.0, -2.0, 4, 6 / 15, 15),  # all negative: high widened to 0, zero point at the top
        (0.0, 0.0, 8, EPS, 0),  # empty range: the smallest scale, not 0
    ],
)
def test_affine_qparams_widens_to_hold_zero(low, high, bits, scale, zero_point):
    s, z = qparams(low, high, BitType(bits))
    assert s.item() == pytest.approx(scale, rel=1e-6)
    assert z.item() == zero_point
    zero = fake_quantize(torch.zeros(3), s, z, BitType(bits))
    assert zero.tolist() == [0.0, 0.0, 0.0]  # 0 is exactly representable


@pytest.mark.parametrize(
    "low, high, bits, scale",
    [(-2.0, 1.0, 8, 2 / 127.5), (-1.0, 7.5, 4, 1.0), (0.5, 3.0, 3, 3 / 3.5), (-3.0, -1.0, 3, 3 / 3.5)],
)
def test_affine_qparams_signed_is_symmetric(low, high, bits, scale):
    s, z = qparams(low, high, BitType(bits, signed=True))
    assert s.item() == pytest.approx(scale, rel=1e-6)
    assert z.item() == 0 and z.dtype == I32


def test_affine_qparams_per_channel():
    scale, zero_point = affine_qparams(torch.tensor([-1.0, 2.0, -6.0]), torch.tensor([3.0, 4.0, -1.0]), BitType(8))
    torch.testing.assert_close(scale, torch.tensor([4 / 255, 4 / 255, 6 / 255]), rtol=1e-6, atol=0)
    assert zero_point.tolist() == [64, 0, 255]


# -- the learnable-scale quantizer used by value_and_grad ------------------------------------------
def test_ste_fake_quantize_value_and_lsq_scale_gradient():
    quantizer = UniformQuantizer(BitType(4), MinMaxObserver(BitType(4), channel_axis=0), channel_axis=0)
    quantizer.zero_point = torch.tensor([3], dtype=I32)
    weight = torch.tensor([[0.3, 1.2, -0.7, 9.0]])
    scale = torch.tensor([0.5], requires_grad=True)
    out = ste_fake_quantize(weight, scale, quantizer)
    # w / s = 0.6, 2.4, -1.4, 18 -> q = 4, 5, 2, 21 -> 15
    assert out.tolist() == [[0.5, 1.0, -0.5, 6.0]]
    out.sum().backward()
    # d/ds: round(w/s) - w/s in range (0.4, -0.4, 0.4), qmax - zp = 12 where clamped
    assert scale.grad.item() == pytest.approx(12.4, abs=1e-5)

"""The compiled kernels: torch's numbers bit for bit or within their stated error, torch's ops wherever they cannot run.

Every clone of the kernels (generic, x86-64-v3, avx512f) gives the same bits, with one thread or two
(tested below), so a bound on the kernels' own error against float64 holds on every machine. Where
the kernels are compared with torch's float32 ops, whose numbers differ between torch's own
AVX-512, AVX2 and generic paths, each difference must be explained by both errors' bounds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from evolq_kernel_cases import outputs

from evolq.quant import kernels
from evolq.quant.bits import BitType
from evolq.quant.grid import Grid

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler on this machine")


@pytest.fixture(scope="module", autouse=True)
def kernels_on():
    """These tests are of the kernels themselves: on, whatever EVOLQ_KERNELS says for the rest of the suite."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "_enabled", True)
        patch.delenv("EVOLQ_KERNELS", raising=False)
        yield


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, the sign of zero included; NaN where NaN."""
    number = ~a.isnan()
    return (a.shape == b.shape and a.dtype == b.dtype and torch.equal(number, ~b.isnan())
            and torch.equal(a[number], b[number]) and torch.equal(a[number].signbit(), b[number].signbit()))


def torch_levels(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    return x.mul(grid.inverse).round_().clamp_(grid.low, grid.high)


U = 2.0**-24  # float32's unit roundoff: a correctly rounded operation is within U relative of exact


def only_rounding_boundaries_moved(levels: torch.Tensor, expected: torch.Tensor, exact: torch.Tensor,
                                   tolerance: torch.Tensor) -> bool:
    """Two roundings of the same values onto a grid agree but where a value lies within ``tolerance`` (in
    levels: both computations' error bounds) of a rounding boundary (a half level) and so may round
    either way; there, by one level. ``exact``: the float64 values in levels."""
    moved = levels != expected
    distance = ((exact - exact.floor()) - 0.5).abs()  # from the nearest half level
    return bool((distance[moved] <= tolerance[moved]).all() and (levels - expected).abs().max() <= 1)


def awkward(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Values on both sides of the clamps, exact halves (ties round to even), signed zeros, inf and NaN."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * 4
    flat = x.view(-1)
    flat[:8] = torch.tensor([0.25, 0.75, -0.25, -0.75, 0.0, -0.0, float("inf"), float("nan")])
    return x


def per_tensor() -> Grid:
    return Grid(inverse=2.0, low=-8.0, high=7.0, scale=0.5)


def per_column(columns: int) -> Grid:
    scale = torch.linspace(0.25, 2.0, columns)
    return Grid(inverse=torch.reciprocal(scale), low=-torch.arange(columns, dtype=torch.float32) - 1,
                high=torch.full((columns,), 15.0), scale=scale)


@needs_compiler
@pytest.mark.parametrize("shape", [(37,), (3, 5, 40), (129, 300), (64, 1024)])  # the last two run threaded
@pytest.mark.parametrize("columns", [False, True])
def test_kernel_gives_torchs_numbers_bit_for_bit(shape, columns):
    x = awkward(shape)
    grid = per_column(shape[-1]) if columns else per_tensor()
    assert kernels.accepts(x)
    expected = torch_levels(x, grid)
    levels = grid.levels(x)
    assert same(levels, expected) and levels.isnan().sum() == 1
    assert same(grid.fake_quantize(x), expected * grid.scale)
    inplace = x.clone()
    assert grid.levels(inplace, inplace=True) is inplace and same(inplace, expected)


@needs_compiler
def test_kernel_hand_values():
    x = torch.tensor([0.25, 0.75, -0.25, -0.75, 3.9, -5.0, float("inf"), float("-inf")])
    assert kernels.accepts(x)
    # halves go to the even level, as torch.round does; the bounds clamp, infinities included
    assert per_tensor().levels(x).tolist() == [0.0, 2.0, -0.0, -2.0, 7.0, -8.0, 7.0, -8.0]
    assert per_tensor().fake_quantize(x).tolist() == [0.0, 1.0, -0.0, -1.0, 3.5, -4.0, 3.5, -4.0]
    assert per_tensor().levels(torch.tensor(0.75)).item() == 2.0  # a 0-dim tensor
    assert per_tensor().levels(torch.empty(0, 8)).shape == (0, 8)


@needs_compiler
def test_kernel_runs_only_where_it_applies():
    grid = per_column(8)
    x = awkward((6, 8))
    assert kernels.accepts(x)
    with kernels.disabled():
        assert not kernels.accepts(x)
        expected = grid.levels(x)
    assert kernels.accepts(x) and same(grid.levels(x), expected)
    strided = x.t().contiguous().t()
    for other in (strided, x.double(), x.bfloat16()):  # torch's ops take these, same values
        assert not kernels.accepts(other)
        assert same(grid.levels(other), torch_levels(other, grid))


@needs_compiler
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("batch, tokens", [(3, 7), (4, 197)])  # the second runs threaded
def test_split_heads_is_torchs_add_round_and_permute(with_bias, batch, tokens):
    heads, head_dim = 3, 16
    width = 3 * heads * head_dim
    product = awkward((batch, tokens, width))
    bias = torch.randn(width, generator=torch.Generator().manual_seed(1)) if with_bias else None
    grid = per_column(width)
    expected = torch_levels(product + bias if with_bias else product, grid)
    expected = expected.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    out = kernels.split_heads(product, bias, grid.packed, heads)
    assert out.shape == (3, batch * heads, tokens, head_dim) and out.is_contiguous()
    assert same(out, expected.reshape(out.shape))


@needs_compiler
def test_gelu_kernel_is_exact_gelu_within_its_stated_error():
    x = torch.linspace(-30, 30, 600_000).reshape(-1, 1000)
    bias = torch.linspace(-1, 1, 1000)
    fine = Grid(inverse=2.0**16, low=-2.0**23, high=2.0**23, scale=2.0**-16).packed  # rounding error 8e-6
    levels = kernels.bias_gelu_levels_(x.clone(), bias, fine)
    exact = torch.nn.functional.gelu((x + bias).double())
    assert (levels.double() * 2.0**-16 - exact).abs().max() < 2.0**-17 + 1e-6  # half a step + the polynomial


@needs_compiler
def test_gelu_kernel_gives_torchs_levels_but_for_rare_neighbours():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 768, generator=generator) * 2
    bias = torch.randn(768, generator=generator) * 0.1
    grid = Grid(inverse=50.0, low=0.0, high=255.0, scale=0.02)
    expected = torch_levels(torch.nn.functional.gelu(x + bias), grid)
    levels = kernels.bias_gelu_levels_(x.clone(), bias, grid.packed)
    hidden = (x + bias).double()  # x + bias is exact in float64, and the kernel's float32 sum within U of it
    exact = torch.nn.functional.gelu(hidden) * grid.inverse
    # The kernel's GELU is within 9e-7 of exact (test above, on every machine). torch's float32 GELU:
    # the rounding of x + bias (U |v|, and GELU's slope is at most 1.13) and of its own few operations,
    # a few U |v| in all: within 1.2e-6 + 4 U |v| (measured 1.04e-6 on [-30, 30], i.e. 0.6 U |v|, on
    # torch's AVX-512, AVX2 and generic paths alike). A value closer than the two to a rounding
    # boundary may round either way.
    tolerance = grid.inverse * (9e-7 + 1.2e-6 + 4 * U * hidden.abs())
    assert only_rounding_boundaries_moved(levels, expected, exact, tolerance)
    assert (levels != expected).float().mean() < 1e-3  # a few of the 393,216 at most (about 10 ppm here)
    assert expected.unique().numel() > 100  # many levels in play: the comparison is not vacuous


@needs_compiler
def test_softmax_kernel_is_softmax_within_float_rounding():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 197, generator=generator) * 6  # 197: rows that are no multiple of the vector width
    fine = Grid(inverse=2.0**22, low=0.0, high=2.0**22, scale=2.0**-22).packed  # rounding error 1.2e-7
    levels = kernels.softmax_levels_(scores.clone(), fine)
    exact = torch.softmax(scores.double(), dim=-1)
    # The kernel's own error, the same on every machine: 2.6e-7 here (its exp within 1e-7 relative, the
    # rounding of x - max amplified by |x - max| up to 40, its sum); torch's float32 softmax: 2.6-3.6e-7
    assert (levels.double() * 2.0**-22 - exact).abs().max() < 2.0**-23 + 3e-7
    grid = Grid(inverse=255.0, low=0.0, high=255.0, scale=1 / 255)
    expected = torch_levels(torch.softmax(scores, dim=-1), grid)
    uint8 = kernels.softmax_levels_(scores.clone(), grid.packed)
    # torch's softmax on any of its paths, from float32 arithmetic: the shift x - max within U |x - max|
    # (times the exp's slope: p), its exp within a few U, a sum of n = 197 terms within (n - 1) U
    # relative in any order, the division within U: within p (|x - max| + n + 4) U. The kernel: 3e-7.
    shift = (scores - scores.max(dim=-1, keepdim=True).values).abs().double()
    tolerance = grid.inverse * (3e-7 + exact * (shift + scores.shape[-1] + 4) * U)
    assert only_rounding_boundaries_moved(uint8, expected, exact * grid.inverse, tolerance)
    assert (uint8 != expected).float().mean() < 1e-3 and expected.unique().numel() > 100
    with_nan = scores[:2].clone()
    with_nan[0, 5] = float("nan")
    out = kernels.softmax_levels_(with_nan, grid.packed)
    assert out[0].isnan().all() and not out[1].isnan().any()  # as torch.softmax: NaN spreads over its row


@needs_compiler
@pytest.mark.parametrize("affine", [True, False])
def test_ptf_layer_norm_kernel_is_torchs_within_float_rounding(affine):
    generator = torch.Generator().manual_seed(0)
    channels = 192
    x = torch.randn(300, channels, generator=generator) * torch.linspace(0.5, 8, channels)
    grid = per_column(channels)
    weight = torch.randn(channels, generator=generator) if affine else None
    bias = torch.randn(channels, generator=generator) if affine else None
    quantized = grid.fake_quantize(x)  # bit for bit torch's (tested above): both norms get the same input
    expected = torch.nn.functional.layer_norm(quantized, (channels,), weight, bias, 1e-6)
    out = kernels.ptf_layer_norm(x, grid.packed, weight, bias, 1e-6)
    # Against float64, each in float32: mean and variance are sums of n terms, within (n - 1) U relative
    # of exact in any order of summation; the mean's error, divided by the deviation, moves every
    # normalized value z; 1 / sqrt and the last multiply-add a few U more. So each output is within
    # (n + 8) U (|z| + mean |x| / std) |w| + 2 U |b| of exact, for the kernel and torch alike.
    q = quantized.double()
    mean, std = q.mean(-1, keepdim=True), (q.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    z = (q - mean) / std
    w = torch.ones(channels, dtype=torch.float64) if weight is None else weight.double()
    b = torch.zeros(channels, dtype=torch.float64) if bias is None else bias.double()
    exact = z * w + b
    bound = (channels + 8) * U * (z.abs() + q.abs().mean(-1, keepdim=True) / std) * w.abs() + 2 * U * b.abs()
    assert ((out.double() - exact).abs() <= bound).all()
    assert ((expected.double() - exact).abs() <= bound).all()
    assert bound.median() < 2e-5 and bound.max() < 5e-4  # tight enough to tell a slightly wrong LayerNorm


def test_a_grid_along_another_axis_leaves_the_kernel_out():
    grid = Grid.of(torch.tensor([0.5, 1.0, 2.0]), torch.zeros(3, dtype=torch.int32), BitType(4, signed=True),
                   channel_axis=0, ndim=2, dtype=torch.float32)
    x = awkward((3, 5))
    assert grid.packed.numel() == 0
    assert same(grid.levels(x), torch_levels(x, grid))


@pytest.mark.parametrize("cause", ["no compiler", "no writable cache"])
def test_where_it_cannot_build_it_warns_and_torch_rounds(cause, monkeypatch, tmp_path):
    if cause == "no compiler":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        cache, expected = tmp_path / "cache", "no-such-compiler"
    else:
        (tmp_path / "a-file").write_text("")
        cache, expected = tmp_path / "a-file" / "evolq", "a-file"  # a folder cannot be made inside a file
    monkeypatch.setattr(kernels, "cache_dir", lambda: cache)
    kernels._library.cache_clear()
    try:
        x = awkward((4, 16))
        with pytest.warns(RuntimeWarning, match=f"{expected}.*torch's ops"):
            assert not kernels.accepts(x)
        assert same(per_tensor().levels(x), torch_levels(x, per_tensor()))
        assert not list(tmp_path.rglob("*.so"))  # no library, not even a half-written one
    finally:
        kernels._library.cache_clear()


@needs_compiler
def test_a_build_is_cached_and_the_environment_switch_turns_it_off(tmp_path):
    script = ("import torch; from evolq.quant import kernels; "
              "print(kernels.accepts(torch.zeros(3)), len(list(kernels.cache_dir().glob('kernels-*.so'))))")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    run = lambda **extra: subprocess.run([sys.executable, "-c", script], env={**env, **extra}, capture_output=True,
                                         text=True, check=True).stdout.split()
    assert run() == ["True", "1"]
    assert run() == ["True", "1"]  # built once, then loaded
    assert run(EVOLQ_KERNELS="off") == ["False", "1"]


@pytest.fixture
def two_threads():
    """The kernels' threaded path (the suite runs on one thread: tests/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def native_outputs() -> dict[str, torch.Tensor]:
    """Every kernel's output from the build this process uses, on two threads."""
    if not kernels.accepts(torch.zeros(1)):
        pytest.skip("the compiled kernels are off or unavailable here")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return outputs(kernels)
    finally:
        torch.set_num_threads(before)


@needs_compiler
def test_threads_change_no_bit(native_outputs, two_threads):
    assert torch.get_num_threads() == 2
    again = outputs(kernels)
    torch.set_num_threads(1)
    single = outputs(kernels)
    assert [name for name in native_outputs if not same(again[name], native_outputs[name])] == []
    assert [name for name in native_outputs if not same(single[name], native_outputs[name])] == []


BUILD_SCRIPT = """
import importlib.util, sys, warnings
import torch
spec = importlib.util.spec_from_file_location("kernels_alone", sys.argv[1])  # kernels.py needs torch only
kernels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernels)
sys.path.insert(0, sys.argv[2])
from evolq_kernel_cases import outputs
torch.set_num_threads(2)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    chosen = kernels.instruction_set()
print(chosen)
if chosen is not None:
    torch.save(outputs(kernels), sys.argv[3])
"""


@needs_compiler
@pytest.mark.parametrize("build", kernels.INSTRUCTION_SETS)
def test_every_build_gives_the_same_bits(build, native_outputs, tmp_path):
    """``EVOLQ_KERNELS=<build>`` compiles that clone alone: each gives the native build's bits, two threads."""
    saved = tmp_path / "outputs.pt"
    arguments = [kernels.__file__, str(Path(__file__).parent), str(saved)]
    done = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, *arguments], env=dict(os.environ, EVOLQ_KERNELS=build),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    chosen = done.stdout.split()[-1]
    if chosen == "None":
        pytest.skip(f"this CPU cannot run the {build} clone")
    assert chosen == build
    theirs = torch.load(saved, weights_only=True)
    assert theirs.keys() == native_outputs.keys()
    assert [name for name in native_outputs if not same(theirs[name], native_outputs[name])] == []


@needs_compiler
def test_without_fma_softmax_and_gelu_are_torchs(monkeypatch):
    """Where fmaf would be glibc's software routine (an x86 CPU without FMA), torch's ops round instead."""
    monkeypatch.setattr(kernels._library(), "fast_fma", False)
    generator = torch.Generator().manual_seed(5)
    scores, hidden = torch.randn(40, 197, generator=generator) * 6, torch.randn(30, 256, generator=generator)
    bias = torch.randn(256, generator=generator)
    grid = Grid(inverse=255.0, low=0.0, high=255.0, scale=1 / 255)
    assert same(kernels.softmax_levels_(scores.clone(), grid.packed), torch_levels(torch.softmax(scores, -1), grid))
    expected = torch_levels(torch.nn.functional.gelu(hidden + bias), grid)
    assert same(kernels.bias_gelu_levels_(hidden.clone(), bias, grid.packed), expected)


@needs_compiler
def test_what_a_kernel_cannot_take_is_refused_or_left_to_torch():
    """The C code reads and writes float32 in place: another dtype or size is a TypeError (or, for the
    approximate kernels, torch's ops), never memory written past a buffer (a bfloat16 hidden layer
    under autocast did that: a heap corruption, found by benchmarks/objective.py --quick)."""
    x = awkward((4, 16))
    with pytest.raises(TypeError, match="quantize"):
        kernels.quantize(x.bfloat16(), per_tensor().packed)
    with pytest.raises(TypeError, match="quantize"):
        kernels.quantize(x, per_column(8).packed)  # a grid for 8 columns, 16 given
    with pytest.raises(TypeError, match="split_heads"):
        kernels.split_heads(awkward((2, 3, 48)), torch.zeros(47), per_column(48).packed, heads=1)
    with pytest.raises(TypeError, match="ptf_layer_norm"):
        kernels.ptf_layer_norm(x, per_column(16).packed, torch.ones(15), torch.zeros(15), 1e-6)
    with pytest.raises(TypeError, match="integer_layer_norm"):
        ones = torch.ones(16)
        kernels.integer_layer_norm(x.double(), ones, ones, 1.0, ones, ones, 1.0)
    with pytest.raises(TypeError, match="squared_errors"):
        kernels.squared_errors(x, torch.stack([per_column(8).packed] * 2))  # grids for 8 columns, 16 given
    with pytest.raises(TypeError, match="squared_errors"):
        kernels.squared_errors(x, torch.stack([per_tensor().packed] * 2), (torch.zeros(2), torch.ones(2)))
    grid = Grid(inverse=20.0, low=-4.0, high=251.0, scale=0.05)
    hidden, bias = torch.randn(8, 256).bfloat16(), torch.randn(256)
    expected = torch_levels(torch.nn.functional.gelu(hidden.clone().add_(bias)), grid)
    assert same(kernels.bias_gelu_levels_(hidden.clone(), bias, grid.packed), expected)
    scores = torch.randn(8, 50).bfloat16()
    assert same(kernels.softmax_levels_(scores.clone(), grid.packed), torch_levels(torch.softmax(scores, -1), grid))


def torch_error_sums(x: torch.Tensor, grid: Grid, keep: torch.Tensor | None = None) -> torch.Tensor:
    """torch's squared fake-quantization errors of ``x`` (rows x columns), summed in float64 (per column where
    the grid is)."""
    terms = (torch_levels(x, grid) * grid.scale - x).pow(2).double()
    terms = terms if keep is None else terms * keep
    return terms.sum(dim=0) if isinstance(grid.scale, torch.Tensor) else terms.sum()


@needs_compiler
@pytest.mark.parametrize("shape", [(37, 1), (100_003, 1), (300, 192), (9, 5)])
@pytest.mark.parametrize("with_tails", [False, True])
def test_squared_errors_are_torchs_terms_summed_within_float64_rounding(shape, with_tails):
    """Every term is torch's float32 number; the kernel sums them in float64 in its own order, so each sum is
    within n * 2^-53 (relative: the terms are never negative) of torch's float64 sum of the same terms."""
    x = awkward(shape)
    x.view(-1)[6:8] = 1.0  # no inf or NaN here: their sums are inf and NaN in any order
    columns = shape[1] > 1
    grids = [per_column(shape[1]) if columns else per_tensor(),
             per_column(shape[1]) if columns else Grid(inverse=0.25, low=0.0, high=15.0, scale=4.0)]
    if columns:
        grids[1] = Grid(grids[1].inverse * 3, grids[1].low, grids[1].high, grids[1].scale / 3)
    params = torch.stack([grid.packed for grid in grids]).contiguous()
    low, high = (torch.full((shape[1] if columns else 1,), bound) for bound in (-3.0, 5.0))
    sums, counts = kernels.squared_errors(x, params, (low, high) if with_tails else None)
    keep = (x < low) | (x > high) if with_tails else None
    expected = torch.stack([torch_error_sums(x, grid, keep) for grid in grids])
    assert sums.dtype == torch.float64 and sums.shape == expected.shape
    assert bool(((sums - expected).abs() <= x.shape[0] * 2.0**-53 * expected).all())
    if with_tails:
        assert torch.equal(counts, keep.sum(dim=0) if columns else keep.sum())
    else:
        assert counts is None

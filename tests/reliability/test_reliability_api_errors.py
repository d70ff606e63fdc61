"""Bad input through the Python API: a ``UsageError`` (a ``ValueError``) or ``RunError`` naming the
value and what is allowed; bad values are caught before the expensive work starts; an objective
that returns NaN during a search counts as the worst value and does not stop the search.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import optimizers
from evolq import BlockObjective, QuantConfig, QuantizedModel, RunError, UsageError, create_model, get_loss
from evolq.checkpoint import SearchCheckpoint
from evolq.data import make_splits
from evolq.files import load_tensors
from evolq.losses import infonce
from evolq.pipeline import RunConfig, run_quantize
from evolq.quant.bits import BitType
from evolq.search import search
from evolq.zoo import default_architecture

DIM = 256  # qkv (192) + proj (64) output channels of the default architecture


# -- names and numbers -----------------------------------------------------------------------
@pytest.mark.parametrize("make, needles", [
    (lambda: create_model("convnext_tiny"), ["'convnext_tiny'", "allowed"]),
    (lambda: QuantConfig.preset("int4"), ["'int4'", "w4a8"]),
    (lambda: QuantConfig(wbits=9), ["wbits 9", "2..8"]),
    (lambda: QuantConfig(abits=1), ["abits 1", "2..8"]),
    (lambda: QuantConfig(softmax_bits=0), ["softmax_bits 0", "2..8"]),
    (lambda: QuantConfig(act_observer="median"), ["'median'", "omse"]),
    (lambda: QuantConfig(softmax="exp"), ["'exp'", "uniform, log2"]),
    (lambda: BitType(16), ["bits 16", "2..8"]),
    (lambda: get_loss("l1"), ["'l1'", "infonce, mse, kl, cosine"]),
    (lambda: RunConfig(preset="w4").quant_config(), ["'w4'", "allowed"]),
    (lambda: RunConfig(wbits=12).quant_config(), ["wbits 12", "2..8"]),
])
def test_bad_names_and_bits(make, needles):
    with pytest.raises(UsageError) as raised:
        make()
    message = str(raised.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_unknown_optimizer_lists_the_known_ones():
    with pytest.raises(optimizers.InputError, match=r"unknown optimizer 'foo'; available: evolq, cmaes, random, gradient"):
        optimizers.make("foo")


@pytest.mark.parametrize("budget", [0, -1, 2.5, True])
def test_non_positive_budget(budget):
    with pytest.raises(ValueError, match="budget"):
        optimizers.minimize(lambda x: float(np.sum(x**2)), np.ones(3), budget=budget)


def test_calibration_size_larger_than_the_data():
    train = torch.utils.data.TensorDataset(torch.zeros(30, 1))
    with pytest.raises(UsageError, match=r"calib size 25 \+ selection size 10 exceeds the 30 training images; allowed"):
        make_splits(train, train, calib_size=25, selection_size=10)


@pytest.mark.parametrize("index", [6, -7, 100, True, 1.0, "0"])
def test_block_index_out_of_range(small, index):
    with pytest.raises(UsageError, match=r"block index .* allowed: 0\.\.5 \(or -6\.\.-1\)"):
        small.qmodel.block(index)
    with pytest.raises(UsageError, match="block index"):
        BlockObjective(small.qmodel, index, small.calib)


@pytest.mark.parametrize("settings, needle", [
    (dict(passes=0), "passes 0"),
    (dict(passes=-1), "passes -1"),
    (dict(passes=1.5), "passes 1.5"),
    (dict(evaluations_per_block=0), "evaluations per block 0"),
    (dict(order="random"), "'random'"),
    (dict(loss="l2"), "'l2'"),
])
def test_search_rejects_bad_settings(small, settings, needle):
    with pytest.raises(UsageError, match=needle):
        search(small.qmodel, small.calib, small.selection, progress=False, **settings)


def test_search_rejects_an_unknown_optimizer(small):
    with pytest.raises(UsageError, match="unknown optimizer 'foo'"):  # optimizers' InputError, as evolq's type
        search(small.qmodel, small.calib, small.selection, optimizer="foo", progress=False)


# -- scale vectors ---------------------------------------------------------------------------
@pytest.mark.parametrize("vector, needle", [
    (np.ones(DIM - 1), "length 256"),
    (np.ones(DIM + 1), "length 256"),
    (np.ones((2, DIM)), "length 256"),
    (np.ones((DIM, 1)), "length 256"),
    ([], "length 256"),
    (5.0, "length 256"),
    (np.r_[np.ones(DIM - 1), np.nan], "non-finite value nan at index 255"),
    (np.r_[np.inf, np.ones(DIM - 1)], "non-finite value inf at index 0"),
    (np.r_[np.ones(9), -np.inf, np.ones(DIM - 10)], "non-finite value -inf at index 9"),
    (np.r_[np.ones(3), 0.0, np.ones(DIM - 4)], "non-positive value 0.0 at index 3"),
    (-np.ones(DIM), "non-positive value -1.0 at index 0"),
    ("0.1", "length 256"),
    ("abc", "not numeric"),
    ({"a": 1}, "not numeric"),
    ([[1.0, 2.0], [3.0]], "not numeric"),
    (None, "length 256"),
])
def test_bad_scale_vectors(small, vector, needle):
    block = small.qmodel.blocks[-1]
    before = block.scales()
    objective = BlockObjective(small.qmodel, block, small.calib)
    for call in (block.set_scales, objective):
        with pytest.raises(UsageError) as raised:
            call(vector)
        assert needle in str(raised.value) and "allowed" in str(raised.value)
        assert np.array_equal(block.scales(), before)  # nothing was written


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("value", [1e39, 1e300, 1e-46, 1e-320])
def test_scales_that_float32_cannot_hold_are_rejected(small, value):
    # Scales are stored as float32: 1e39 would become inf and 1e-46 zero.
    block = small.qmodel.blocks[0]
    before = block.scales()
    vector = before.copy()
    vector[7] = value
    with pytest.raises(UsageError, match="index 7"):
        block.set_scales(vector)
    assert np.array_equal(block.scales(), before)


def test_scale_tensor_that_requires_grad_is_read_as_numbers(small):
    block = small.qmodel.blocks[0]
    wanted = block.scales() * 1.01
    block.set_scales(torch.from_numpy(wanted).requires_grad_(True))
    np.testing.assert_array_equal(block.scales(), wanted.astype(np.float32))


def test_scale_file_for_another_model(small):
    with pytest.raises(UsageError, match="'block0'"):
        small.qmodel.load_scales({"something": torch.ones(3)})
    with pytest.raises(UsageError, match="lacks"):
        small.qmodel.load_quant_state({})


# -- files -----------------------------------------------------------------------------------
class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.mkdir, (self.marker,))


def test_load_tensors_refuses_pickled_objects_without_running_them(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"weight": torch.ones(2), "payload": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(RunError, match="evil.pt"):
        load_tensors(tmp_path / "evil.pt")
    assert not marker.exists()


def test_load_tensors_reads_weights_only_torch_files(tmp_path):
    state = default_architecture().state_dict()
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"state_dict": state}, tmp_path / "wrapped.pt")
    for name in ("plain.pt", "wrapped.pt"):
        loaded = load_tensors(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"not a checkpoint at all"])
def test_corrupted_search_checkpoint(small, tmp_path, content):
    (tmp_path / "checkpoint.safetensors").write_bytes(content)
    with pytest.raises(RunError, match="corrupted or truncated"):
        SearchCheckpoint(tmp_path, {"seed": 0}).load(small.qmodel)


def test_search_checkpoint_of_another_configuration(small, tmp_path):
    best = dict(pass_index=0, selection_top1=0.0, selection_loss=1.0, scales=small.qmodel.scales())
    SearchCheckpoint(tmp_path, {"seed": 0, "passes": 2}).save(small.qmodel, 1, [], [], best)
    with pytest.raises(UsageError, match=r"written with passes=2, this run has passes=3; allowed"):
        SearchCheckpoint(tmp_path, {"seed": 0, "passes": 3}).load(small.qmodel)


# -- early failure ---------------------------------------------------------------------------
class Calibrated(Exception):
    """Raised instead of calibrating: the run got past its input checks."""


@pytest.fixture
def no_calibration(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise Calibrated()

    monkeypatch.setattr(QuantizedModel, "calibrate", refuse)


@pytest.mark.parametrize("settings", [
    pytest.param(dict(preset="w4b8"), id="preset"),
    pytest.param(dict(calib_size=0), id="calib_size"),
    pytest.param(dict(calib_size=1200), id="calib_size_too_large"),
    pytest.param(dict(model="convnext_tiny"), id="model"),
    pytest.param(dict(optimizer="foo"), id="optimizer"),
    pytest.param(dict(loss="l2"), id="loss"),
    pytest.param(dict(passes=0), id="passes"),
    pytest.param(dict(evaluations_per_block=0), id="evaluations_per_block"),
    pytest.param(dict(order="sideways"), id="order"),
    pytest.param(dict(eval_size=0), id="eval_size"),
    pytest.param(dict(out="under-a-file"), id="out"),
])
def test_bad_input_fails_before_calibration(checkpoint, fmnist, tmp_path, no_calibration, settings):
    (tmp_path / "file").write_text("")
    settings = dict(settings)
    unwritable = settings.pop("out", None) is not None
    out = tmp_path / "file" / "run" if unwritable else tmp_path / "out"
    config = RunConfig(checkpoint=checkpoint, data_dir=str(fmnist), **{"calib_size": 20, "selection_size": 20, **settings})
    with pytest.raises(RunError if unwritable else UsageError):
        run_quantize(config, out=out, progress=False)


# -- NaN objectives --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["evolq", "cmaes", "random", "gradient", "ng:OnePlusOne"])
def test_minimize_counts_nan_as_the_worst_value(name):
    calls = []

    def f(x):
        calls.append(1)
        return math.nan if len(calls) % 2 == 0 else float(np.sum((x - 0.5) ** 2))

    f.value_and_grad = lambda x: (f(x), np.full_like(x, math.nan) if len(calls) % 2 == 0 else 2 * (x - 0.5))
    result = optimizers.minimize(f, np.ones(4), budget=12, optimizer=name, seed=0)
    assert result.evaluations == 12 == len(calls)
    values = result.history["value"].to_numpy()
    assert not np.isnan(values).any() and np.isinf(values[1::2]).all()
    assert math.isfinite(result.value) and result.value <= values[0]


@pytest.mark.parametrize("name", ["evolq", "random", "cmaes", "gradient"])
def test_search_goes_on_when_the_loss_turns_nan(small, name):
    calls = []

    def flaky(quant, fp):  # every third call NaN, still on the autograd graph for "gradient"
        calls.append(1)
        value = infonce(quant, fp)
        return value * math.nan if len(calls) % 3 == 0 else value

    found = search(small.qmodel, small.calib, small.selection, optimizer=name, passes=1, evaluations_per_block=3,
                   loss=flaky, seed=0, progress=False)
    assert found.evaluations == len(found.history) == 6 * 3
    values = found.history["value"].to_numpy()
    assert not np.isnan(values).any() and np.isinf(values).any()
    for block in small.qmodel.blocks:
        scales = block.scales()
        assert np.isfinite(scales).all() and (scales > 0).all()


def test_objective_nan_from_the_model_is_returned_not_raised(small, monkeypatch):
    objective = BlockObjective(small.qmodel, 0, small.calib)
    monkeypatch.setattr(objective, "loss", lambda quant, fp: torch.tensor(math.nan))
    assert math.isnan(objective(objective.x0))


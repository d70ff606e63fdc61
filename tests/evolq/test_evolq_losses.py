"""Every loss on inputs whose value is known by hand."""

import math

import pytest
import torch

from evolq.errors import UsageError
from evolq.losses import INFONCE_TEMPERATURE, LOSSES, cosine, get_loss, infonce, kl, mse


def test_infonce_on_orthonormal_rows_is_hand_computable():
    eye = torch.eye(4)
    # normalize(q) @ normalize(k).T / T = I / 3; each row's CE = log(e^(1/3) + 3) - 1/3; times 2T = 6
    assert INFONCE_TEMPERATURE == 3.0
    assert infonce(eye, eye).item() == pytest.approx(6.883641203779294, rel=1e-6)
    assert infonce(5 * eye, 0.5 * eye).item() == pytest.approx(6.883641203779294, rel=1e-6)  # scale-free


def test_infonce_other_temperature_and_batch_size():
    eye = torch.eye(3)
    # T = 1, N = 3: 2 * (log(e + 2) - 1)
    assert infonce(eye, eye, temperature=1.0).item() == pytest.approx(2 * (math.log(math.e + 2) - 1), rel=1e-6)


def test_infonce_prefers_matching_pairs():
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    shuffled = logits[torch.roll(torch.arange(16), 1)]
    assert infonce(logits, logits) < infonce(logits, shuffled)
    assert infonce(logits, logits).item() > 0  # never zero: other rows share the softmax


def test_mse_kl_cosine_are_zero_for_identical_inputs():
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    for loss in (mse, kl, cosine):
        assert loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6), loss.__name__


def test_mse_known_value():
    assert mse(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)).item() == 2.5
    assert mse(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.zeros(2, 2)).item() == 1.25


def test_kl_is_fp_against_quantized_known_value():
    quant = torch.tensor([[0.0, 0.0]])  # q = (0.5, 0.5)
    fp = torch.tensor([[math.log(3.0), 0.0]])  # p = (0.75, 0.25)
    # KL(p || q) = 0.75 ln 1.5 + 0.25 ln 0.5
    assert kl(quant, fp).item() == pytest.approx(0.13081203594113697, rel=1e-5)
    # the other direction, KL(q || p) = 0.5 ln(2/3) + 0.5 ln 2 = 0.1438..., is not what is computed
    assert kl(fp, quant).item() == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2), rel=1e-5)
    assert kl(quant.repeat(3, 1), fp.repeat(3, 1)).item() == pytest.approx(0.13081203594113697, rel=1e-5)  # batch mean


def test_cosine_known_values():
    assert cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(1.0)
    assert cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])).item() == pytest.approx(
        0.29289321881345254, rel=1e-6)
    assert cosine(torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([[1.0, 0.0], [0.0, -1.0]])).item() == \
        pytest.approx(1.0)  # mean of 0 and 2


def test_get_loss_by_name_and_passthrough():
    assert list(LOSSES) == ["infonce", "mse", "kl", "cosine"]
    for name, fn in LOSSES.items():
        assert get_loss(name) is fn

    def custom(q, k):
        return (q - k).abs().mean()

    assert get_loss(custom) is custom


def test_get_loss_unknown_name_lists_the_allowed():
    with pytest.raises(UsageError) as error:
        get_loss("huber")
    assert str(error.value) == "loss 'huber' is unknown; allowed: infonce, mse, kl, cosine"

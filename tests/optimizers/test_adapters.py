"""What the cma, nevergrad and gradient optimizers add to the shared loop."""

import math
import threading
import time

import numpy as np
import pytest

from optimizers import CMAES, Adam, Nevergrad, minimize


def test_cmaes_evaluates_generations_as_batches_and_updates(objective):
    f = objective("sphere", batch=True)
    opt = CMAES(popsize=6)
    opt.minimize(f, f.x0, 1 + 3 * 6, seed=0)
    assert f.batches == [6, 6, 6]
    assert opt.es_.countiter == 3 and not opt.pending_ and not opt.told_


def test_cmaes_starts_with_evolq_spread_and_its_own_random_stream(objective):
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    opt = CMAES(eps=1e-3).start(np.full(5, 0.5), seed=1, value0=1.0)
    samples = np.array([opt.ask() for _ in range(opt.es_.popsize * 40)])
    assert np.random.rand() == expected  # numpy's global state untouched
    assert samples.std(axis=0) == pytest.approx(np.full(5, 1e-3 / math.sqrt(3)), rel=0.2)


def test_cmaes_full_covariance_option():
    assert CMAES(diagonal=False).start(np.ones(3), value0=1.0).es_.opts["CMA_diagonal"] is False


def test_cmaes_reflects_negative_samples(objective):
    opt = CMAES(eps=0.5).start(np.full(4, 0.01), seed=0, value0=1.0)
    asked = np.array(opt.ask_batch())
    genotypes = np.array([y for _, y in opt.pending_])
    assert (genotypes < 0).any() and (asked >= 0).all()
    np.testing.assert_array_equal(asked, np.abs(genotypes))


def test_nevergrad_does_not_rescore_x0_and_knows_the_budget(objective):
    f = objective("sphere")
    opt = Nevergrad("OnePlusOne")
    result = opt.minimize(f, f.x0, 20, seed=0)
    assert f.calls == result.evaluations == 20
    assert sum(np.array_equal(p, f.x0) for p in f.points) == 1
    assert opt.x0_told_ and opt.ng_ is None  # closed after the run
    assert opt.start(f.x0, value0=1.0, budget=20).ng_.budget == 20


def test_nevergrad_workers_ask_batches(objective):
    f = objective("sphere", batch=True)
    Nevergrad("TwoPointsDE", num_workers=4).minimize(f, f.x0, 9, seed=0)
    assert f.batches == [4, 4] and f.calls == 9


def test_nevergrad_mutation_scale_is_eps():
    opt = Nevergrad("RandomSearch", eps=1e-2).start(np.full(200, 1.0), seed=0, value0=1.0)
    step = opt.ask() - 1.0
    assert 0.5e-2 < step.std() < 2e-2


def test_gradient_needs_value_and_grad():
    with pytest.raises(ValueError, match=r"^optimizer 'gradient' needs an objective with value_and_grad\(x\)"):
        minimize(lambda x: 1.0, np.ones(2), 5, optimizer="gradient")


def test_gradient_counts_each_value_and_grad_call(objective):
    f = objective("sphere")
    result = minimize(f, f.x0, 12, optimizer="gradient")
    assert f.calls == result.evaluations == 12
    np.testing.assert_array_equal(f.points[0], f.x0)


def test_gradient_takes_adam_steps_and_stays_positive():
    class Linear:
        """f = sum(x): the gradient pushes every coordinate below 0."""

        def __call__(self, x):
            return float(np.sum(x))

        def value_and_grad(self, x):
            return self(x), np.ones_like(x)

    x0 = np.array([5e-4, 1.0])
    result = minimize(Linear(), x0, 12, optimizer="gradient", lr=1e-4)
    steps = np.diff(result.history["value"])
    np.testing.assert_allclose(steps[:4], -2e-4)  # Adam's first steps are lr per coordinate
    assert result.x[0] == 1e-12 and result.x[1] == pytest.approx(1.0 - 11e-4)


def test_gradient_backs_off_from_a_nan_gradient():
    opt = Adam(lr=0.1).start(np.array([1.0]), value0=1.0)
    opt.tell(opt.ask(), 1.0, np.array([1.0]))
    assert opt.ask()[0] == pytest.approx(0.9)
    opt.tell(opt.ask(), math.nan, np.array([np.nan]))
    assert opt.ask()[0] == 1.0 and opt.step_size_ == 0.05  # back to the best point, half the step


def test_nevergrad_thread_based_optimizer_leaves_no_thread_behind():
    def others():
        return [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]

    before = others()
    opt = Nevergrad("Powell")  # scipy's Powell, run by nevergrad in a non-daemon thread
    opt.start(np.full(3, 0.35), value0=1.0, budget=25)
    opt.tell(opt.ask(), 0.5)
    assert len(others()) > len(before)
    opt.close()
    deadline = time.monotonic() + 10
    while len(others()) > len(before) and time.monotonic() < deadline:
        time.sleep(0.01)
    left = others()
    vars(opt).pop("ng_", None)  # if close() failed, still let this test process exit
    assert left == before  # a thread left running would keep Python from exiting


def test_nevergrad_failure_is_one_runtime_error(monkeypatch):
    opt = Nevergrad("OnePlusOne").start(np.ones(3), value0=1.0)

    def broken():
        raise TypeError("inside nevergrad")

    monkeypatch.setattr(opt.ng_, "ask", broken)
    with pytest.raises(RuntimeError, match=r"nevergrad's OnePlusOne failed in ask\(\): TypeError: inside nevergrad"):
        opt.ask()
    assert opt.ng_ is None

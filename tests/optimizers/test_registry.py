"""Optimizers by name: make, available, register, and one-line errors."""

import numpy as np
import pytest

import optimizers
from optimizers import CMAES, Adam, EvolutionarySearch, Nevergrad, Optimizer, RandomSearch, make, register
from optimizers import registry


def test_available_lists_the_registered_names():
    assert optimizers.available() == ["evolq", "cmaes", "random", "gradient"]
    every = optimizers.available(variants=True)
    assert {"ng:OnePlusOne", "ng:TwoPointsDE", "ng:NGOpt", "ng:PSO"} <= set(every)


@pytest.mark.parametrize("name, cls", [("evolq", EvolutionarySearch), ("cmaes", CMAES),
                                       ("random", RandomSearch), ("gradient", Adam)])
def test_make_builds_each_class(name, cls):
    opt = make(name)
    assert type(opt) is cls and opt.name == name


def test_make_passes_options():
    opt = make("evolq", eps=1e-4, population=20)
    assert (opt.eps, opt.population, opt.tournament) == (1e-4, 20, 10)
    assert make("ng:PSO", num_workers=4).get_params() == {"optimizer": "PSO", "eps": 1e-3, "num_workers": 4}


@pytest.mark.parametrize("name", ["xyz", "", "ng:", "evolq:x", "CMAES"])
def test_unknown_name_lists_what_is_available(name):
    with pytest.raises(ValueError) as error:
        make(name)
    message = str(error.value)
    assert message.startswith(f"unknown optimizer {name!r}; available: evolq, cmaes, random, gradient, "
                              "ng:<nevergrad name> (e.g. ng:OnePlusOne")
    assert "\n" not in message


def test_unknown_nevergrad_name_suggests_close_ones():
    with pytest.raises(ValueError, match=r"unknown optimizer 'ng:TwoPointDE'.*did you mean ng:TwoPointsDE"):
        make("ng:TwoPointDE")


def test_unknown_option_lists_the_options():
    with pytest.raises(ValueError, match="optimizer 'cmaes' has no option 'sigma'; its options: eps, diagonal, popsize"):
        make("cmaes", sigma=0.1)
    with pytest.raises(ValueError, match="has no option 'optimizer'"):
        make("ng:OnePlusOne", optimizer="PSO")


@pytest.mark.parametrize("name, options, word", [
    ("evolq", {"eps": 0.0}, "eps must be a finite number > 0, got 0.0"),
    ("evolq", {"population": 3}, r"tournament must be <= population \(3\), got 10"),
    ("cmaes", {"popsize": 1}, "popsize must be an integer >= 2, got 1"),
    ("cmaes", {"diagonal": "yes"}, "diagonal must be True or False"),
    ("random", {"eps_mode": "rel"}, "eps_mode must be one of 'absolute', 'relative', got 'rel'"),
    ("gradient", {"lr": -1}, "lr must be a finite number > 0, got -1"),
    ("gradient", {"betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\)"),
    ("ng:OnePlusOne", {"num_workers": 0}, "num_workers must be an integer >= 1, got 0"),
    ("ng:OnePlusOne", {"eps": float("inf")}, "eps must be a finite number > 0"),
])
def test_bad_option_values_name_the_value_and_what_is_allowed(name, options, word):
    with pytest.raises(optimizers.InputError, match=word):  # a ValueError, told apart from bugs by its type
        make(name, **options)


def test_register_adds_a_named_optimizer(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register("centre")
    class Centre(Optimizer):
        """Always proposes x0 / 2."""

        def _ask(self):
            return self.x0_ / 2

    assert "centre" in optimizers.available()
    result = optimizers.minimize(lambda x: float(np.sum(x)), np.ones(2), 3, optimizer="centre")
    assert result.value == 1.0 and result.info["optimizer"] == "centre"
    with pytest.raises(ValueError, match="already registered"):
        register("centre")(Centre)


def test_minimize_accepts_an_instance():
    opt = RandomSearch(eps=0.1)
    result = optimizers.minimize(lambda x: float(np.sum(x)), np.ones(2), 5, optimizer=opt, seed=0)
    assert result.evaluations == 5 and opt.best_value_ == result.value
    with pytest.raises(ValueError, match="need an optimizer name"):
        optimizers.minimize(lambda x: 0.0, np.ones(2), 5, optimizer=opt, eps=1.0)


def test_nevergrad_class_is_named_by_its_optimizer():
    assert Nevergrad("NGOpt").name == "ng:NGOpt"


def test_package_needs_neither_torch_nor_evolq():
    import subprocess
    import sys

    code = ("import sys, optimizers; optimizers.minimize(lambda x: 1.0, [1.0], 3); "
            "print(sorted(m for m in ('torch', 'evolq', 'nevergrad', 'cma') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

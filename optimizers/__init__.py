"""Gradient-free optimizers over a float vector, for any objective `f(x) -> float`.

Ask/tell `Optimizer`s by name (`make("evolq")`, `make("ng:OnePlusOne")`) or class, and
`minimize(f, x0, budget, optimizer="evolq")`. Needs neither torch nor evolq.
"""

from optimizers.base import InputError, Optimizer, Result
from optimizers.registry import available, make, minimize, register
from optimizers.evolutionary import EvolutionarySearch
from optimizers.cmaes import CMAES
from optimizers.random_search import RandomSearch
from optimizers.gradient import Adam
from optimizers.nevergrad_adapter import Nevergrad
from optimizers.rescaled import Rescaled

__all__ = [
    "InputError", "Optimizer", "Result", "minimize", "make", "available", "register",
    "EvolutionarySearch", "CMAES", "RandomSearch", "Adam", "Nevergrad", "Rescaled",
]

# --- comparison harness (optimizers.compare, optimizers.problems) goes below this line ---
from optimizers.compare import compare
from optimizers.problems import make_problem, problem_names

__all__ += ["compare", "make_problem", "problem_names"]

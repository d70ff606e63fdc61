"""Evol-Q's evolutionary search, as the released code does it (the defaults), read top to bottom.

Start: a population of `population` copies of x0, each carrying x0's value.
Each step:
  1. draw `tournament` members uniformly at random WITH replacement;
     the one with the lowest value is the parent (ties: the first drawn);
  2. child = abs(parent + U(-eps, eps)), element-wise (abs keeps scales non-negative);
  3. evaluate the child;
  4. append it, sort the population by value (stable), drop the last member:
     a child that ties the worst is dropped, since it sorts after the older member.
The best is population[0]. x0 is scored once (or not at all when its value is given),
and a member's value is never re-scored.

Opt-in extras, off by default: `eps_mode="relative"` scales the noise by |parent|
(a coordinate at 0 takes absolute steps, so a start at 0 still moves); `children_per_step > 1`
asks several children per step, each from its own tournament on the same population, to
evaluate them together. From a start with negative values (or with `nonnegative=False`
given to `minimize`) the children are parent + U(-eps, eps), without abs().
"""

from __future__ import annotations

import numpy as np

from optimizers.base import InputError, Optimizer, check_choice, check_int, check_positive
from optimizers.registry import register

EPS_MODES = ("absolute", "relative")


def mutate(rng: np.random.Generator, parent: np.ndarray, eps: float, eps_mode: str,
           nonnegative: bool = True) -> np.ndarray:
    """abs(parent + U(-eps, eps)) element-wise (no abs() unless `nonnegative`); in "relative"
    mode the noise is scaled by |parent|, and by 1 where the parent is 0."""
    noise = rng.uniform(-eps, eps, size=parent.shape)
    if eps_mode == "relative":
        noise *= np.where(parent == 0, 1.0, np.abs(parent))
    child = parent + noise
    return np.abs(child) if nonnegative else child


@register("evolq")
class EvolutionarySearch(Optimizer):
    """Tournament selection, uniform mutation and replace-the-worst, as in Evol-Q.

    population: members kept (15); tournament: members drawn per parent, with
    replacement (10); eps: mutation half-width (1e-3, use 1e-4 for 8-bit weights);
    eps_mode: "absolute" or "relative"; children_per_step: children asked per step (1).
    """

    def __init__(self, population: int = 15, tournament: int = 10, eps: float = 1e-3,
                 eps_mode: str = "absolute", children_per_step: int = 1):
        self.population = check_int("population", population, 1)
        self.tournament = check_int("tournament", tournament, 1)
        if self.tournament > self.population:
            raise InputError(f"tournament must be <= population ({self.population}), got {tournament!r}")
        self.eps = check_positive("eps", eps)
        self.eps_mode = check_choice("eps_mode", eps_mode, EPS_MODES)
        self.children_per_step = check_int("children_per_step", children_per_step, 1)

    def _reset(self) -> None:
        self.members_ = np.tile(self.x0_, (self.population, 1))
        self.values_ = np.full(self.population, self.value0_, dtype=float)

    def _ask(self) -> np.ndarray:
        drawn = self.rng_.integers(0, self.population, size=self.tournament)
        parent = self.members_[drawn[np.argmin(self.values_[drawn])]]  # argmin: first drawn on ties
        return mutate(self.rng_, parent, self.eps, self.eps_mode, self.nonnegative_)

    def _ask_batch(self) -> list[np.ndarray]:
        return [self._ask() for _ in range(self.children_per_step)]

    def _tell(self, x: np.ndarray, value: float, grad: object = None) -> None:
        members = np.vstack([self.members_, x])
        values = np.append(self.values_, value)
        keep = np.argsort(values, kind="stable")[:-1]
        self.members_, self.values_ = members[keep], values[keep]

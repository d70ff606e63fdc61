"""Random search: the baseline that any smarter optimizer has to beat.

Each candidate is drawn uniformly from the eps box around the best point so far, with
abs() to keep it non-negative: abs(best + U(-eps, eps)), the same mutation as Evol-Q's
(`optimizers.evolutionary.mutate`, with its rules for eps_mode and negative starts), but
always from the current best and without a population.
"""

from __future__ import annotations

import numpy as np

from optimizers.base import Optimizer, check_choice, check_int, check_positive
from optimizers.evolutionary import EPS_MODES, mutate
from optimizers.registry import register


@register("random")
class RandomSearch(Optimizer):
    """Uniform samples around the best point so far.

    eps: box half-width (1e-3); eps_mode: "absolute" or "relative" (noise times |best|, 1 where 0);
    batch_size: candidates asked at once, all around the same best (1).
    """

    def __init__(self, eps: float = 1e-3, eps_mode: str = "absolute", batch_size: int = 1):
        self.eps = check_positive("eps", eps)
        self.eps_mode = check_choice("eps_mode", eps_mode, EPS_MODES)
        self.batch_size = check_int("batch_size", batch_size, 1)

    def _ask(self) -> np.ndarray:
        return mutate(self.rng_, self.best_x_, self.eps, self.eps_mode, self.nonnegative_)

    def _ask_batch(self) -> list[np.ndarray]:
        return [self._ask() for _ in range(self.batch_size)]

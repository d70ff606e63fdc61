"""Adam on the objective's own gradient: the reference point for the gradient-free optimizers.

The objective must offer `value_and_grad(x) -> (value, gradient)`; each call is one
evaluation. Scales stay positive: after each step x = max(x, floor) (not from a start with
negative values, or with nonnegative=False). The first ask is
x0 even when its value is known, because its gradient is needed.
A NaN/inf value or gradient sends the search back to the best point with half the step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from optimizers.base import InputError, Optimizer, check_positive
from optimizers.registry import register


@register("gradient")
class Adam(Optimizer):
    """Adam (Kingma & Ba) with learning rate `lr` (1e-4), `betas` (0.9, 0.999), `adam_eps` (1e-8)
    in the denominator, and `floor` (1e-12), the smallest value a coordinate may take."""

    needs_gradient = True

    def __init__(self, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 adam_eps: float = 1e-8, floor: float = 1e-12):
        self.lr = check_positive("lr", lr)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise InputError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.adam_eps = check_positive("adam_eps", adam_eps)
        self.floor = check_positive("floor", floor)

    def _reset(self) -> None:
        self.x_ = self.x0_.copy()
        self.step_size_ = self.lr
        self._zero_moments()

    def _zero_moments(self) -> None:
        self.m_ = np.zeros_like(self.x0_)
        self.v_ = np.zeros_like(self.x0_)
        self.t_ = 0

    def _ask(self) -> np.ndarray:
        return self.x_.copy()

    def _tell(self, x: np.ndarray, value: float, grad: Any = None) -> None:
        if grad is None:
            raise InputError(f"optimizer '{self.name}' needs the gradient: tell(x, value, grad)")
        grad = np.asarray(grad, dtype=float)
        if grad.shape != x.shape:
            raise InputError(f"gradient shape {grad.shape} does not match x shape {x.shape}")
        if not (np.isfinite(value) and np.all(np.isfinite(grad))):
            self.x_ = self.best_x_.copy()
            self.step_size_ *= 0.5
            self._zero_moments()
            return
        beta1, beta2 = self.betas
        self.t_ += 1
        self.m_ = beta1 * self.m_ + (1 - beta1) * grad
        self.v_ = beta2 * self.v_ + (1 - beta2) * grad**2
        m_hat = self.m_ / (1 - beta1**self.t_)
        v_hat = self.v_ / (1 - beta2**self.t_)
        step = x - self.step_size_ * m_hat / (np.sqrt(v_hat) + self.adam_eps)
        self.x_ = np.maximum(step, self.floor) if self.nonnegative_ else step

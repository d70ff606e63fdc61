"""Any optimizer of nevergrad's registry, as "ng:<name>" (e.g. ng:OnePlusOne, ng:TwoPointsDE).

Parametrization: `ng.p.Array(init=x0, lower=0)` with `set_mutation(sigma=eps)`: nevergrad's
mutations start at an absolute step of eps (1e-3) around x0 and never go below 0 (no lower
bound from a start with negative values, or with nonnegative=False).
The run's budget is passed to nevergrad (some of its optimizers plan with it), and the
candidates go through nevergrad's own ask/tell. `num_workers` candidates are asked at
once (nevergrad's num_workers), so they can be evaluated as a batch.
x0's value is never re-scored: when nevergrad asks for x0 (OnePlusOne starts there) it is
told the known value and asked again. nevergrad is imported only when used (~3 s).
`close()` (called by `minimize`) drops nevergrad's optimizer and with it any thread it runs.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any

import numpy as np

from optimizers.base import InputError, Optimizer, check_int, check_positive, pop_match
from optimizers.registry import register, unknown_name_message


def _nevergrad_registry() -> Any:
    import nevergrad as ng

    return ng.optimizers.registry


@register("ng:")
class Nevergrad(Optimizer):
    """nevergrad's `optimizer` (a registry name); eps: initial mutation step (1e-3);
    num_workers: candidates asked at once (1)."""

    variant_hint = "ng:<nevergrad name> (e.g. ng:OnePlusOne, ng:TwoPointsDE, ng:NGOpt, ng:PSO)"

    def __init__(self, optimizer: str = "OnePlusOne", eps: float = 1e-3, num_workers: int = 1):
        registry = _nevergrad_registry()
        if optimizer not in registry:
            similar = difflib.get_close_matches(str(optimizer), list(registry), n=3)
            hint = f" (did you mean {', '.join('ng:' + c for c in similar)}?)" if similar else ""
            raise InputError(unknown_name_message(f"ng:{optimizer}") + hint)
        self.optimizer = optimizer
        self.name = f"ng:{optimizer}"
        self.eps = check_positive("eps", eps)
        self.num_workers = check_int("num_workers", num_workers, 1)

    @staticmethod
    def variants() -> list[str]:
        """Every nevergrad registry name."""
        return sorted(_nevergrad_registry())

    def _reset(self) -> None:
        import nevergrad as ng

        parametrization = ng.p.Array(init=self.x0_, lower=0.0 if self.nonnegative_ else None)
        parametrization.set_mutation(sigma=self.eps)
        parametrization.random_state = np.random.RandomState(self.rng_.integers(2**32))
        self.ng_ = _nevergrad_registry()[self.optimizer](
            parametrization=parametrization, budget=self.budget_, num_workers=self.num_workers)
        self.pending_: list[tuple[np.ndarray, Any]] = []
        self.x0_told_ = False

    def _call(self, method: str, *args: Any) -> Any:
        """nevergrad's ask or tell. A failure inside nevergrad comes back as a RuntimeError
        without nevergrad's frames: they can hold a scipy thread that keeps Python from exiting."""
        from nevergrad.common.errors import LossTooLargeWarning

        try:
            with warnings.catch_warnings():  # nevergrad clips inf (our NaN/inf), as intended
                warnings.simplefilter("ignore", LossTooLargeWarning)
                return getattr(self.ng_, method)(*args)
        except Exception as error:  # re-raised below, outside this block
            message = f"nevergrad's {self.optimizer} failed in {method}(): {type(error).__name__}: {error}"
        self.close()
        raise RuntimeError(message)

    def _ask(self) -> np.ndarray:
        candidate = self._call("ask")
        if not self.x0_told_ and np.array_equal(candidate.value, self.x0_):
            self.x0_told_ = True
            self._call("tell", candidate, self.value0_)
            candidate = self._call("ask")
        x = np.array(candidate.value, dtype=float)
        self.pending_.append((x, candidate))
        return x.copy()

    def _ask_batch(self) -> list[np.ndarray]:
        return [self._ask() for _ in range(self.num_workers)]

    def close(self) -> None:
        """Drop nevergrad's optimizer: its scipy-based ones (ng:Powell, ng:SQP, ...) run in a
        thread that stops only when the optimizer is deleted, and would keep Python from exiting."""
        self.ng_ = None
        self.pending_ = []

    def _tell(self, x: np.ndarray, value: float, grad: Any = None) -> None:
        candidate = pop_match(self.pending_, x)
        if candidate is None:  # a point nevergrad did not ask for
            candidate = self.ng_.parametrization.spawn_child(new_value=x)
        self._call("tell", candidate, value)


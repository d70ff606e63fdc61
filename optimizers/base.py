"""The ask/tell `Optimizer` base class, the run loop every optimizer shares, and its `Result`.

An objective is any callable `f(x: np.ndarray) -> float`. It may also offer
`f.batch(X) -> values` (several candidates at once), `f.value_and_grad(x) -> (value, grad)`
(for gradient optimizers) and an `f.x0` attribute (a default start vector).
"""

from __future__ import annotations

import inspect
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

Objective = Callable[[np.ndarray], float]
Callback = Callable[[int, np.ndarray, float, float], Any]

HISTORY_COLUMNS = ["evaluation", "value", "best", "seconds"]


class InputError(ValueError):
    """A caller's input that is not allowed (a name, option, budget, start vector, objective's answer).

    One line naming the value and what is allowed. A ``ValueError``, so ``except ValueError``
    still catches it; its own type lets a caller (the ``evolq`` CLI) tell bad input apart from
    a bug without ``optimizers`` importing anything of the caller's.
    """


@dataclass
class Result:
    """Best point of a run, its value, the evaluations spent and one history row per evaluation."""

    x: np.ndarray
    value: float
    evaluations: int
    history: pd.DataFrame
    info: dict = field(default_factory=dict)


def clean_value(value: Any) -> float:
    """The objective value as a float; NaN and +-inf become +inf (the worst), so they never win."""
    value = float(value)
    return value if math.isfinite(value) else math.inf


def check_positive(name: str, value: Any) -> float:
    """`value` as a float if it is a finite number > 0, else a one-line InputError."""
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise InputError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, minimum: int) -> int:
    """`value` as an int if it is an integer >= minimum, else a one-line InputError."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not (ok and value >= minimum):
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """`value` if it is one of `choices`, else a one-line InputError listing them."""
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def as_vector(x: Any) -> np.ndarray:
    """A finite, non-empty 1-D float copy of the start vector `x`."""
    vector = np.array(x, dtype=float)
    if vector.ndim != 1 or vector.size == 0 or not np.all(np.isfinite(vector)):
        raise InputError(f"x0 must be a non-empty 1-D vector of finite numbers, got shape {vector.shape}")
    return vector


def search_nonnegative(x0: np.ndarray, nonnegative: bool | None) -> bool:
    """Whether a run from `x0` keeps every coordinate >= 0; None decides from x0 (True where x0 >= 0)."""
    if nonnegative is None:
        return bool(np.all(x0 >= 0))
    if not isinstance(nonnegative, (bool, np.bool_)):
        raise InputError(f"nonnegative must be True, False or None, got {nonnegative!r}")
    negative = np.flatnonzero(x0 < 0)
    if nonnegative and negative.size:
        raise InputError(f"x0 has a negative value {float(x0[negative[0]])} at index {negative[0]}; nonnegative=True "
                         "needs x0 >= 0 (or pass nonnegative=False to search all real values)")
    return bool(nonnegative)


def option_names(cls: type) -> list[str]:
    """The keyword options a class's constructor takes, in order."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    return [p.name for p in parameters if p.kind in kinds]


def pop_match(pending: list[tuple[np.ndarray, Any]], x: np.ndarray) -> Any:
    """Remove and return the payload asked with point `x` from `pending`; None if `x` was not asked."""
    for i, (asked, payload) in enumerate(pending):
        if np.array_equal(asked, x):
            del pending[i]
            return payload
    return None


class Optimizer(ABC):
    """Minimizes an objective over float vectors, by ask/tell or by `minimize`.

    Configured by plain constructor keywords (stored under the same names); what a run
    learns ends in an underscore: `best_x_`, `best_value_`, `value0_`, `rng_`, `nonnegative_`.
    Until x0's value is known, `ask` returns x0 and the first `tell` is taken as its score.
    Subclasses implement `_ask`, and where needed `_reset`, `_ask_batch`, `_tell` and `close`.
    """

    name = "?"  # set by registry.register
    needs_gradient = False

    def start(self, x0: Any, seed: int | None = None, value0: float | None = None,
              budget: int | None = None, nonnegative: bool | None = None) -> "Optimizer":
        """Reset the state to start from x0; `value0` is x0's known value (then x0 is not re-scored).

        `budget` is the number of evaluations the caller plans to spend, for optimizers
        that plan with it (nevergrad's); it is not enforced here. `nonnegative`: keep every
        candidate >= 0 (Evol-Q's scales: mutations are reflected at 0, as its abs() does),
        or search all real values; None (default) keeps them >= 0 exactly when x0 is >= 0.
        """
        self.x0_ = as_vector(x0)
        self.nonnegative_ = search_nonnegative(self.x0_, nonnegative)
        self.rng_ = np.random.default_rng(seed)
        self.budget_ = None if budget is None else check_int("budget", budget, 1)
        self.best_x_ = self.x0_.copy()
        self.best_value_ = math.inf
        self.value0_: float | None = None
        if value0 is not None:
            self.best_value_ = clean_value(value0)
            self.value0_ = self.best_value_
            self._reset()
        return self

    def ask(self) -> np.ndarray:
        """One candidate to evaluate (x0 itself while its value is unknown)."""
        return self.x0_.copy() if self.value0_ is None else self._ask()

    def ask_batch(self) -> list[np.ndarray]:
        """Candidates that may be evaluated together; `[self.ask()]` unless the optimizer proposes more."""
        return [self.x0_.copy()] if self.value0_ is None else self._ask_batch()

    def tell(self, x: Any, value: float, grad: Any = None) -> None:
        """Report the value (and gradient, if any) of an evaluated point; NaN/inf count as +inf."""
        x = np.array(x, dtype=float)
        value = clean_value(value)
        if self.value0_ is None and not np.array_equal(x, self.x0_):
            raise InputError("the first tell must be x0's value (ask returned x0); or pass value0 to start")
        if value < self.best_value_:
            self.best_x_, self.best_value_ = x.copy(), value
        if self.value0_ is None:
            self.value0_ = value
            self._reset()
            if grad is None:  # a gradient that came with x0's score still makes a step
                return
        self._tell(x, value, grad)

    def _reset(self) -> None:
        """Set up the search state once x0_ and value0_ are known."""

    @abstractmethod
    def _ask(self) -> np.ndarray:
        """One new candidate."""

    def _ask_batch(self) -> list[np.ndarray]:
        return [self._ask()]

    def _tell(self, x: np.ndarray, value: float, grad: Any) -> None:
        """Learn from one evaluated candidate (value already cleaned)."""

    def close(self) -> None:
        """Release what a run holds beyond its results (threads, pools); `minimize` calls it at the end."""

    def get_params(self) -> dict[str, Any]:
        """The constructor keywords and their values."""
        return {name: getattr(self, name) for name in option_names(type(self))}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    def minimize(self, f: Objective, x0: Any, budget: int, seed: int | None = None,
                 callback: Callback | None = None, *, value0: float | None = None,
                 nonnegative: bool | None = None) -> Result:
        """Minimize `f` from `x0` (None: `f.x0`) with at most `budget` evaluations, x0's first score included.

        With `value0` (x0's known value) x0 is not scored and costs nothing. `nonnegative`:
        see `start`; `Result.info["nonnegative"]` says which it was. Batches go
        to `f.batch` when there is more than one candidate and `f` has it; the last batch
        is cut to the budget. `callback(evaluation, x, value, best)` runs after each
        evaluation; a true return value stops the run after the current batch.
        """
        budget = check_int("budget", budget, 1)
        if x0 is None:
            x0 = getattr(f, "x0", None)
            if x0 is None:
                raise InputError("x0 is None and the objective has no x0 attribute; pass a start vector")
        if self.needs_gradient and not callable(getattr(f, "value_and_grad", None)):
            raise InputError(f"optimizer '{self.name}' needs an objective with value_and_grad(x) -> "
                             f"(value, gradient); {type(f).__name__} has none")
        self.start(x0, seed=seed, value0=value0, budget=budget, nonnegative=nonnegative)
        t0 = time.perf_counter()
        rows: list[tuple[int, float, float, float]] = []
        stop = False
        try:
            while len(rows) < budget and not stop:
                batch = self.ask_batch()[: budget - len(rows)]
                if not batch:
                    raise RuntimeError(f"optimizer '{self.name}' asked for no candidates")
                values, grads = evaluate(f, batch, self.needs_gradient)
                for x, value, grad in zip(batch, values, grads):
                    self.tell(x, value, grad)
                    row = (len(rows), clean_value(value), self.best_value_, time.perf_counter() - t0)
                    rows.append(row)
                    if callback is not None and callback(row[0], x, row[1], row[2]):
                        stop = True
        finally:
            self.close()
        info = {"optimizer": self.name, "options": self.get_params(), "seed": seed,
                "value0": self.value0_, "nonnegative": self.nonnegative_, "stopped_by_callback": stop}
        return Result(x=self.best_x_.copy(), value=self.best_value_, evaluations=len(rows),
                      history=pd.DataFrame(rows, columns=HISTORY_COLUMNS), info=info)


def evaluate(f: Objective, batch: list[np.ndarray], gradient: bool) -> tuple[list, list]:
    """Values (and gradients, or Nones) of the candidates in `batch`, one objective evaluation each."""
    if gradient:
        pairs = [f.value_and_grad(x.copy()) for x in batch]  # type: ignore[attr-defined]
        return [v for v, _ in pairs], [np.asarray(g, dtype=float) for _, g in pairs]
    if len(batch) > 1 and callable(getattr(f, "batch", None)):
        values = np.asarray(f.batch(np.stack(batch)), dtype=float).reshape(-1)  # type: ignore[attr-defined]
        if values.size != len(batch):
            raise InputError(f"f.batch returned {values.size} values for {len(batch)} candidates")
        return list(values), [None] * len(batch)
    return [f(x.copy()) for x in batch], [None] * len(batch)

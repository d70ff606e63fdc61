"""Evaluate an objective on a grid spanned by directions: through ``f.batch`` in chunks, else one by one.

Objectives follow the project's protocol: ``f(x) -> float`` and optionally
``f.batch(X) -> array of shape (n,)``. Batching lets an objective run several candidates in one
forward pass. Points ``x0 + c @ D`` are built one chunk at a time, so a large grid over a long
vector never holds more than ``batch_size`` points in memory.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm.auto import tqdm


def evaluate_grid(
    f: Callable[[np.ndarray], float],
    x0: np.ndarray,
    directions: np.ndarray,
    coefficients: np.ndarray,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "evaluations",
) -> np.ndarray:
    """Return ``f(x0 + coefficients[k] @ directions)`` for every row k, as float64.

    ``directions`` has shape ``(m, dim)``, ``coefficients`` shape ``(n, m)``.
    """
    if not callable(f):
        raise ValueError(f"objective {f!r} is not callable; pass a function f(x) -> float")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r} is not allowed; use a positive integer")
    batch = getattr(f, "batch", None)
    step = batch_size if callable(batch) else 1
    values = np.empty(len(coefficients))
    with tqdm(total=len(coefficients), desc=desc, unit="eval", disable=not progress) as bar:
        for start in range(0, len(coefficients), step):
            chunk = x0 + coefficients[start : start + step] @ directions
            result = batch(chunk) if callable(batch) else [f(chunk[0])]
            values[start : start + len(chunk)] = _as_values(result, len(chunk))
            bar.update(len(chunk))
    return values


def _as_values(result: object, n: int) -> np.ndarray:
    """Check that an objective returned ``n`` numbers and return them as floats."""
    try:
        values = np.asarray(result, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"objective returned {result!r}; it must return numbers") from None
    if values.size != n:
        raise ValueError(f"objective returned {values.size} number(s) for {n} point(s); it must return {n}")
    return values

"""Optimizers by name: `register` a class, `make` one with options, list what is `available`.

A name ending in ':' registers a family: `make("ng:OnePlusOne")` builds the "ng:" class with
"OnePlusOne" as its first argument. A family class describes itself with `variant_hint`
(shown in errors) and `variants()` (every valid suffix).
"""

from __future__ import annotations

from typing import Any, Callable

from optimizers.base import Callback, InputError, Objective, Optimizer, Result, option_names

_REGISTRY: dict[str, type[Optimizer]] = {}


def register(name: str) -> Callable[[type[Optimizer]], type[Optimizer]]:
    """Class decorator: make an Optimizer subclass available as `name`."""

    def decorate(cls: type[Optimizer]) -> type[Optimizer]:
        if name in _REGISTRY:
            raise InputError(f"optimizer name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available(variants: bool = False) -> list[str]:
    """Registered names, in registration order; `variants=True` also lists every family member
    (e.g. all of nevergrad's ~500 optimizers as "ng:<name>", which imports nevergrad)."""
    names = [name for name in _REGISTRY if not name.endswith(":")]
    if variants:
        for family, cls in _REGISTRY.items():
            if family.endswith(":"):
                names += [family + v for v in cls.variants()]  # type: ignore[attr-defined]
    return names


def unknown_name_message(name: str) -> str:
    """One line: the unknown name and what is available."""
    listed = [n if not n.endswith(":") else cls.variant_hint  # type: ignore[attr-defined]
              for n, cls in _REGISTRY.items()]
    return f"unknown optimizer {name!r}; available: {', '.join(listed)}"


def make(name: str, **options: Any) -> Optimizer:
    """A new optimizer of the registered `name`, configured by `options` (its constructor keywords)."""
    if not isinstance(name, str):
        raise InputError(f"optimizer name must be a string, got {name!r}")
    family, colon, variant = name.partition(":")
    cls = _REGISTRY.get(family + colon)
    if cls is None or (colon and not variant):
        raise InputError(unknown_name_message(name))
    allowed = option_names(cls)[1 if colon else 0:]  # a family's first argument is the variant
    for key in options:
        if key not in allowed:
            raise InputError(f"optimizer {name!r} has no option {key!r}; its options: {', '.join(allowed)}")
    return cls(variant, **options) if colon else cls(**options)


def minimize(f: Objective, x0: Any, budget: int, optimizer: str | Optimizer = "evolq",
             seed: int | None = None, callback: Callback | None = None, *,
             value0: float | None = None, nonnegative: bool | None = None, **options: Any) -> Result:
    """Minimize `f` from `x0` within `budget` evaluations with the optimizer named `optimizer`
    (or an Optimizer instance), configured by `options`; see `Optimizer.minimize`."""
    if isinstance(optimizer, Optimizer):
        if options:
            raise InputError(f"options {sorted(options)} need an optimizer name, not an instance")
    else:
        optimizer = make(optimizer, **options)
    return optimizer.minimize(f, x0, budget, seed=seed, callback=callback, value0=value0, nonnegative=nonnegative)

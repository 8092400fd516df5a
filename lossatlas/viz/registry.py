"""The figure table: each viz module registers what it draws under a figure name.

``@paper_figure_of(name)`` registers one matplotlib Figure, ``@plotly_figures_of(name)`` a list of plotly figures. A
name is the ``figure`` a probe declares or ``TRAINING``; ``lossatlas.viz.figures`` draws by name from these tables.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

TRAINING = "training"  # the run's per-step log (RunReader.log()), the one figure that no probe stores
# name -> fn(results, *, step=None[, lr=None]) -> Figure; for TRAINING fn(log) -> Figure
PAPER: dict[str, Callable[..., Any]] = {}
# name -> fn(results[, lr=None]) -> list of plotly figures or None (results sorted by step); for TRAINING fn(log)
PLOTLY: dict[str, Callable[..., list]] = {}


def _register(table: dict[str, Callable[..., Any]], name: str) -> Callable[[F], F]:
    def add(fn: F) -> F:
        old = table.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise TypeError(f"figure name {name!r} is registered twice ({old.__qualname__}, {fn.__qualname__})")
        table[name] = fn
        return fn

    return add


def paper_figure_of(name: str) -> Callable[[F], F]:
    """Decorator: the function draws the paper figure called ``name``."""
    return _register(PAPER, name)


def plotly_figures_of(name: str) -> Callable[[F], F]:
    """Decorator: the function returns the interactive figures called ``name``."""
    return _register(PLOTLY, name)


def call(fn: Callable[..., Any], *args: Any, lr: Any = None, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, plus ``lr`` when ``fn`` takes it (the figures that draw 2/η)."""
    if "lr" in inspect.signature(fn).parameters:
        kwargs["lr"] = lr
    return fn(*args, **kwargs)

"""Draw a figure by name, from the table that the viz modules fill (lossatlas.viz.registry).

A name is the ``figure`` a probe declares (drawn from its Results) or "training" (drawn from the run's per-step
log). Every viz module is imported here, so a figure registered in any of them is known.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from lossatlas.viz._results import ResultLike, as_list, pick_step
from lossatlas.viz.interactive import scalars_plotly
from lossatlas.viz.registry import PAPER, PLOTLY, TRAINING, call

for _module in pkgutil.iter_modules([str(Path(__file__).parent)]):  # each module registers the figures it draws
    importlib.import_module(f"{__package__}.{_module.name}")

# every figure name: "training", then the probes' figures
KINDS: tuple[str, ...] = (TRAINING, *sorted(set(PAPER) - {TRAINING}))


def check_kind(kind: str) -> str:
    """``kind`` if viz draws a figure of that name; ValueError listing the known names otherwise."""
    if kind not in PAPER:
        raise ValueError(f"unknown figure kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return kind


def _log(log: Mapping[str, np.ndarray] | None) -> Mapping[str, np.ndarray]:
    if log is None:
        raise ValueError(f"the {TRAINING!r} figure needs the run's log (RunReader.log())")
    return log


def paper_figure(kind: str, results: ResultLike | Sequence[ResultLike] | None = None, *,
                 log: Mapping[str, np.ndarray] | None = None, step: int | None = None, lr: Any = None) -> Figure:
    """The matplotlib figure called ``kind``: of ``results`` (over steps), or of ``log`` for "training".

    ``step`` picks one checkpoint (default: across steps where the figure has a timeline, else the last step);
    ``lr`` (a number or (steps, lrs)) draws 2/η where the figure has an eigenvalue timeline.
    """
    draw = PAPER[check_kind(kind)]
    if kind == TRAINING:
        return draw(_log(log))
    if results is None:
        raise ValueError(f"the {kind!r} figure needs its Results")
    return call(draw, results, step=step, lr=lr)


def interactive_figures(kind: str, results: ResultLike | Sequence[ResultLike] | None = None, *,
                        log: Mapping[str, np.ndarray] | None = None, step: int | None = None, lr: Any = None) -> list:
    """The plotly figures called ``kind``: timelines across steps, then the picked or last checkpoint's.

    Empty when nothing drawable is stored. A name without figures gets every stored scalar vs step.
    """
    if kind == TRAINING:
        figs = PLOTLY[TRAINING](_log(log))
        return [f for f in figs if f is not None]
    if results is None:
        raise ValueError(f"the {kind!r} figure needs its Results")
    results = as_list(results)
    if step is not None:
        results = [pick_step(results, step)]
    draw = PLOTLY.get(kind)
    figs = call(draw, results, lr=lr) if draw is not None else [scalars_plotly(results, f"{kind}: stored scalars vs step")]
    return [f for f in figs if f is not None]

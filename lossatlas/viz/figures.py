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
                 log: Mapping[str, np.ndarray] | None = None, step: int | None = None, lr: Any = None,
                 label: str | None = None) -> Figure:
    """The matplotlib figure called ``kind``: of ``results`` (over steps), or of ``log`` for "training".

    ``step`` picks one checkpoint (default: across steps where the figure has a timeline, else the last step);
    ``lr`` (a number or (steps, lrs)) draws 2/η where the figure has an eigenvalue timeline. ``label`` (the
    configuration's readable label, ``lossatlas.store.labels``) becomes the figure's title, above any title
    the figure has: every figure says which settings it shows.
    """
    draw = PAPER[check_kind(kind)]
    if kind == TRAINING:
        return _titled(draw(_log(log)), label)
    if results is None:
        raise ValueError(f"the {kind!r} figure needs its Results")
    return _titled(call(draw, results, step=step, lr=lr), label)


def _titled(fig: Figure, label: str | None) -> Figure:
    """``fig`` with ``label`` as its suptitle (joined to an existing one with a line break)."""
    if label:
        old = fig.get_suptitle()
        fig.suptitle(f"{label}\n{old}" if old else label, fontsize="medium")  # constrained layout makes room
    return fig


def _titled_plotly(figs: list, label: str | None) -> list:
    """Each plotly figure's title prefixed with ``label`` (``label — title``)."""
    if not label:
        return figs
    for f in figs:
        old = f.layout.title.text if f.layout.title is not None else None
        f.update_layout(title=f"{label} — {old}" if old else label)
    return figs


def interactive_figures(kind: str, results: ResultLike | Sequence[ResultLike] | None = None, *,
                        log: Mapping[str, np.ndarray] | None = None, step: int | None = None, lr: Any = None,
                        label: str | None = None) -> list:
    """The plotly figures called ``kind``: timelines across steps, then the picked or last checkpoint's.

    Empty when nothing drawable is stored. A name without figures gets every stored scalar vs step. ``label``
    (the configuration's readable label) heads each figure's title.
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
    return _titled_plotly([f for f in figs if f is not None], label)

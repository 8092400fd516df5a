"""Which figure draws which kind of result: the one table that ``plot``, ``report`` and the tests iterate.

A *kind* is a probe name (the Results it stored) or "training" (the run's per-step log).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from lossatlas.viz import curvature, interactive, landscape, representations, sharpness, training
from lossatlas.viz._results import ResultLike, as_list, pick_step

KINDS: tuple[str, ...] = ("training", "loss", "sharpness", "hessian", "collapse", "uniformity", "surface",
                          "interpolate", "trajectory")
# the command that stores each kind (what the user runs when it is missing)
COMMANDS: dict[str, str] = {
    "training": "lossatlas train (or record the run with lossatlas.Recorder)",
    "loss": "lossatlas loss RUN --steps all",
    "sharpness": "lossatlas sharpness RUN --steps all",
    "hessian": "lossatlas hessian RUN --steps all",
    "collapse": "lossatlas collapse RUN --steps all",
    "uniformity": "lossatlas uniformity RUN --steps all",
    "surface": "lossatlas surface RUN --step last",
    "interpolate": "lossatlas interpolate RUN --step 0 --to-step LAST",
    "trajectory": "lossatlas trajectory RUN",
}
# report section of each kind (unknown probes go to "other")
SECTIONS: dict[str, str] = {
    "training": "overview", "loss": "overview", "hessian": "curvature", "sharpness": "sharpness",
    "surface": "landscape", "interpolate": "landscape", "trajectory": "landscape",
    "collapse": "representations", "uniformity": "representations",
}


def check_kind(kind: str) -> str:
    """``kind`` if it is known; ValueError listing the known kinds otherwise."""
    if kind not in KINDS:
        raise ValueError(f"unknown figure kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return kind


def paper_figure(kind: str, results: ResultLike | Sequence[ResultLike] | None = None, *,
                 log: Mapping[str, np.ndarray] | None = None, step: int | None = None, lr: Any = None) -> Figure:
    """The matplotlib figure of ``kind``: ``results`` (over steps) for a probe kind, ``log`` for "training".

    ``step`` picks one checkpoint (default: across steps where the kind has a timeline, else the last step);
    ``lr`` (a number or (steps, lrs)) draws 2/η on the eigenvalue timeline.
    """
    check_kind(kind)
    if kind == "training":
        if log is None:
            raise ValueError("the 'training' figure needs the run's log (RunReader.log())")
        return training.training_figure(log)
    if results is None:
        raise ValueError(f"the {kind!r} figure needs its Results")
    draw: Callable[..., Figure] = {
        "loss": sharpness.loss_figure,
        "sharpness": sharpness.sharpness_figure,
        "collapse": representations.collapse_figure,
        "uniformity": representations.uniformity_figure,
        "surface": landscape.surface_figure,
        "interpolate": landscape.interpolation_figure,
        "trajectory": landscape.trajectory_figure,
    }.get(kind)  # type: ignore[assignment]
    if kind == "hessian":
        return curvature.hessian_figure(results, step=step, lr=lr)
    return draw(results, step=step)


def interactive_figures(kind: str, results: ResultLike | Sequence[ResultLike] | None = None, *,
                        log: Mapping[str, np.ndarray] | None = None, step: int | None = None, lr: Any = None) -> list:
    """The plotly figures of ``kind`` (timelines across steps, then the picked or last checkpoint's figures);
    empty when nothing drawable is stored. Unknown probe names get every scalar vs step."""
    if kind == "training":
        if log is None:
            raise ValueError("the 'training' figure needs the run's log (RunReader.log())")
        figs = [interactive.training_plotly(log), interactive.layer_heatmap_plotly(log)]
        return [f for f in figs if f is not None]
    if results is None:
        raise ValueError(f"the {kind!r} figure needs its Results")
    results = as_list(results)
    if step is not None:
        results = [pick_step(results, step)]
    last = results[-1]
    many = len(results) > 1
    if kind == "hessian":
        figs = [interactive.eigenvalues_plotly(results, lr) if many else None,
                interactive.spectrum_plotly(last), interactive.block_spectra_plotly(last)]
    elif kind == "sharpness":
        figs = [interactive.sharpness_plotly(results), interactive.sharpness_plotly([last]) if many else None]
    elif kind == "loss":
        figs = [interactive.loss_plotly(results)]
    elif kind == "collapse":
        figs = [interactive.collapse_plotly(results), interactive.collapse_plotly([last]) if many else None]
    elif kind == "uniformity":
        figs = [interactive.uniformity_plotly(results), interactive.uniformity_plotly([last]) if many else None]
    elif kind == "surface":
        figs = [interactive.surface_plotly(last)]
    elif kind == "interpolate":
        figs = [interactive.interpolation_plotly(last)]
    elif kind == "trajectory":
        figs = [interactive.trajectory_plotly(last)]
    else:
        figs = [interactive.scalars_plotly(results, f"{kind}: stored scalars vs step")]
    return [f for f in figs if f is not None]

"""Sharpness figures: every stored measure vs step, or one checkpoint's measures side by side.

Also the "loss" probe's loss/accuracy vs step.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from lossatlas.viz._results import ResultLike, as_list, pick_step, scalar, scalar_names, series, steps_of
from lossatlas.viz.registry import paper_figure_of
from lossatlas.viz.style import log_if_decades, new_figure, note, paper_style

# gradient and Fisher–Rao norms, then perturbation sharpness, then curvature; "loss" is the clean loss, not a sharpness
MEASURE_LABELS: dict[str, str] = {
    "grad_norm": "‖∇L‖₂",
    "fisher_rao": "Fisher–Rao ‖θ‖_fr",
    "keskar": "Keskar ε-sharpness (%)",
    "sam": "SAM (1 step)",
    "adaptive_sam": "ASAM (1 step)",
    "m_sharpness": "m-sharpness",
    "worst_case": "worst case (APGD)",
    "adaptive_worst_case": "adaptive worst case",
    "average_case": "average case",
    "adaptive_average_case": "adaptive average case",
    "lambda_max": "λ_max",
    "trace": "tr(H)",
}


def sharpness_measures(results: Sequence[ResultLike]) -> list[str]:
    """The measures held by ``results``: scalars other than the clean loss and the ``*_stderr`` companions."""
    return [n for n in scalar_names(results) if n != "loss" and not n.endswith("_stderr")]


def draw_sharpness_vs_step(ax, results: Sequence[ResultLike]) -> bool:
    """Each sharpness measure vs step (±1 stderr band for Monte-Carlo ones); log y when all positive and spread."""
    results = as_list(results)
    steps = steps_of(results)
    names = sharpness_measures(results)
    if not names:
        note(ax, "no sharpness measures stored\n(lossatlas sharpness)")
        return False
    shown = []
    for i, name in enumerate(names):
        v = series(results, name)
        ax.plot(steps, v, marker="o", color=f"C{i % 8}", label=MEASURE_LABELS.get(name, name))
        se = series(results, f"{name}_stderr")
        if np.isfinite(se).any():
            ax.fill_between(steps, v - se, v + se, color=f"C{i % 8}", alpha=0.2, lw=0)
        shown.append(v)
    log_if_decades(ax, np.concatenate(shown), decades=1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness (measure's units)")
    ax.set_title("sharpness vs step")
    ax.legend(fontsize=5, ncols=2)
    return True


def draw_sharpness_bars(ax, result: ResultLike) -> bool:
    """One checkpoint's measures as horizontal bars with stderr whiskers (log x when positive and spread)."""
    names = sharpness_measures([result])
    if not names:
        note(ax, "no sharpness measures stored\n(lossatlas sharpness)")
        return False
    vals = np.array([scalar(result, n) for n in names])
    err = np.array([scalar(result, f"{n}_stderr") or 0.0 for n in names])
    y = np.arange(len(names))
    ax.barh(y, vals, xerr=err, color=[f"C{i % 8}" for i in range(len(names))], height=0.6)
    ax.set_yticks(y, [MEASURE_LABELS.get(n, n) for n in names])
    ax.invert_yaxis()
    log_if_decades(ax, vals, axis="x", decades=1.0)
    ax.set_xlabel("sharpness (measure's units)")
    ax.set_title(f"sharpness, step {result.step}")
    return True


@paper_figure_of("sharpness")
def sharpness_figure(results: ResultLike | Sequence[ResultLike], *, step: int | None = None) -> Figure:
    """The "sharpness" kind: measures vs step (several steps, no ``step``) or one checkpoint's measures."""
    results = as_list(results)
    with paper_style():
        fig, axes = new_figure()
        if step is None and len(results) > 1:
            draw_sharpness_vs_step(axes[0, 0], results)
        else:
            draw_sharpness_bars(axes[0, 0], pick_step(results, step))
    return fig


@paper_figure_of("loss")
def loss_figure(results: ResultLike | Sequence[ResultLike], *, step: int | None = None) -> Figure:
    """The "loss" kind: evaluated loss (left axis) and accuracy (right axis) vs step."""
    results = as_list(results)
    if step is not None:
        results = [pick_step(results, step)]
    steps = steps_of(results)
    with paper_style():
        fig, axes = new_figure()
        ax = axes[0, 0]
        loss = series(results, "loss")
        ax.plot(steps, loss, marker="o", color="C0", label="loss")
        log_if_decades(ax, loss, decades=1.0)
        ax.set_xlabel("step")
        ax.set_ylabel("loss", color="C0")
        acc = series(results, "accuracy")
        if np.isfinite(acc).any():
            ax2 = ax.twinx()
            ax2.spines["right"].set_visible(True)
            ax2.plot(steps, 100 * acc, marker="s", color="C1", label="accuracy")
            ax2.set_ylabel("accuracy (%)", color="C1")
        ax.set_title("evaluated loss and accuracy")
    return fig
